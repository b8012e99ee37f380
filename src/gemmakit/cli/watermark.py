"""gemmakit watermark keygen / detect: SynthID-Text keys, and the detector's scores, p-value and verdict."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import GemmaError
from ..watermark.detector import DEFAULT_FPR, detect
from ..watermark.synthid import WatermarkConfig

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="SynthID-Text watermarking: make keys, check texts. Generate with --watermark KEYS.json "
                       "on run, chat and serve.")

KeysOpt = Annotated[Path, typer.Option("--keys", "-k", help="The keys file (SynthIDTextWatermarkingConfig "
                                                             "fields, JSON).")]


@app.command()
def keygen(
    path: Annotated[Path, typer.Argument(help="Where to write the keys (JSON, readable by you only).")],
    depth: Annotated[int, typer.Option(help="Tournament layers (one key each).")] = 30,
    ngram_len: Annotated[int, typer.Option(help="Tokens per n-gram (context ngram_len - 1).")] = 5,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write fresh secret keys: random keys and table seed from the operating system's random source.

    Example:  gemmakit watermark keygen ~/.config/gemmakit/keys.json
    """
    if path.exists() and not force:
        raise GemmaError(f"{path} exists; pass --force to replace it (text watermarked with the old keys will "
                         "no longer be detected with the new ones)")
    WatermarkConfig.generate(depth=depth, ngram_len=ngram_len).save(path)
    Console(stderr=True).print(f"wrote {path} ({depth} keys, ngram_len {ngram_len}); keep it secret", highlight=False)


@app.command("detect")
def detect_cmd(
    source: Annotated[str, typer.Argument(help="A text file, or '-' for stdin.")],
    keys: KeysOpt,
    model: Annotated[str | None, typer.Option("--model", "-m", help="The model whose tokenizer generated "
                                              "the text (default: the embedded one); weights are not read.")] = None,
    fpr: Annotated[float, typer.Option(help="False-positive rate of the verdict: the chance that text "
                                       "without the watermark is called watermarked.")] = DEFAULT_FPR,
    ids: Annotated[bool, typer.Option("--ids", help="The input is token ids (a JSON list), not text.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Print the mean and weighted-mean g-value scores, the tokens scored, a p-value and a verdict.

    The text is tokenized as plain text without <bos> (as the model generated it; transformers:
    tokenizer(text, add_special_tokens=False)). Give only the generated text: a prompt in front dilutes the score.

    Examples:  gemmakit run --watermark keys.json -t 0.8 "Write about tides" > out.txt
               gemmakit watermark detect out.txt --keys keys.json
               echo "[818, 1177, ...]" | gemmakit watermark detect - --keys keys.json --ids --json
    """
    if source == "-":
        raw = sys.stdin.read()
    else:
        p = Path(source)
        if not p.is_file():
            raise GemmaError(f"{p}: no such file; give a text file or '-' for stdin")
        raw = p.read_text(encoding="utf-8")
    text: str | list[int] = raw
    if ids:
        try:
            text = json.loads(raw)
        except json.JSONDecodeError as e:
            raise GemmaError(f"--ids expects a JSON list of token ids ({e})") from None
        if not isinstance(text, list) or not all(isinstance(t, int) for t in text):
            raise GemmaError("--ids expects a JSON list of token ids, e.g. [818, 1177, 532]")
    result = detect(text, keys, model=model, fpr=fpr)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    console = Console(highlight=False)
    verdict = "[bold]watermarked[/]" if result.watermarked else "not watermarked"
    console.print(f"mean g-value           {result.mean:.4f}\n"
                  f"weighted mean g-value  {result.weighted_mean:.4f}\n"
                  f"scored tokens          {result.scored} of {result.tokens}\n"
                  f"p-value                {result.p_value:.3g} ({result.null} null distribution)\n"
                  f"verdict                {verdict} at fpr {fpr:g}")
