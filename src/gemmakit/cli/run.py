"""gemmakit run "PROMPT": stream a continuation."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import GemmaError
from ..loader import load
from ..sampling import SamplingParams
from ..watermark.synthid import Watermark
from .draft_opts import DraftOpt, DraftTokensOpt, load_draft

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="GGUF file, HF folder or .ckpt (default: embedded)")]


def run(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 (or below 1e-5) = greedy.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    min_p: Annotated[float | None, typer.Option(help="Drop tokens below min_p x the top probability.")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="> 1 discourages repeats.")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same text.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string (repeatable).")] = None,
    lookup: Annotated[int, typer.Option(help="Prompt-lookup speculative decoding: draft up to N tokens (greedy).")] = 0,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = 8,
    quant: Annotated[str, typer.Option(help="auto (fast path for quantized GGUF), q8, or none (exact fp32).")] = "auto",
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter folder (PEFT format) to apply.")] = None,
    variant: Annotated[str | None, typer.Option(help="Variant of a gemma_pytorch .ckpt, e.g. gemma-2b.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    stats: Annotated[bool, typer.Option(help="Print tokens/s to stderr at the end.")] = True,
    json_schema: Annotated[Path | None, typer.Option("--json-schema", help="Constrain the output to this JSON "
                                                     "Schema (a .json file).")] = None,
    grammar: Annotated[Path | None, typer.Option("--grammar", help="Constrain the output to this grammar file: "
                                                 "Lark, or GBNF as llama.cpp writes it.")] = None,
    watermark: Annotated[str | None, typer.Option(help="SynthID-Text keys file: watermark the text "
                                                  "(gemmakit watermark keygen/detect).")] = None,
) -> None:
    """Stream a continuation of PROMPT.

    Examples:  gemmakit run "The capital of France is"
               gemmakit run -m gemma-2b.gguf "Once upon a time" -t 0.8 --top-p 0.95 --seed 1
               gemmakit run "A user record: " --json-schema user.schema.json -n 200
               gemmakit run "Answer yes or no: is ice cold? " --grammar yesno.gbnf
    """
    constraint = {"json_schema": _read(json_schema, "JSON Schema"), "grammar": _read(grammar, "grammar")}
    # bad numbers (-t nan, a seed beyond 64 bits) fail before the model loads
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed)
    err = Console(stderr=True)
    m = load(model, device=device, variant=variant, quant=None if quant == "none" else quant,
             adapter=adapter)
    processors = Watermark(watermark) if watermark else None
    t0 = time.perf_counter()
    sys.stdout.write(prompt)
    for piece in m.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop=stop, lookup=lookup,
                          logits_processors=processors, draft=load_draft(draft), draft_tokens=draft_tokens,
                          **{k: v for k, v in constraint.items() if v is not None}):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    result = m.last_result
    if stats and result is not None:
        n = len(result.token_ids)
        err.print(f"[dim]{n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s), finish: {result.finish_reason}[/]")


def _read(path: Path | None, what: str) -> str | None:
    """A constraint file's text (the JSON Schema stays text: grammar.py parses it and names what is wrong)."""
    if path is None:
        return None
    if not path.is_file():
        raise GemmaError(f"{path}: no such file; pass the path of a {what} file")
    return path.read_text(encoding="utf-8")
