"""gemmakit convert -m MODEL -o OUT: write a model (optionally with a LoRA adapter merged) as GGUF or HF."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..errors import GemmaError
from ..loader import load
from ..lora.adapter import merge as merge_lora
from ..weights.writers import GGUF_TYPES, write_gguf, write_hf


def convert(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .gguf file (or folder with --to hf).")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="GGUF, HF folder or .ckpt (default: embedded)")
    ] = None,
    to: Annotated[str, typer.Option(help="gguf or hf.")] = "gguf",
    qtype: Annotated[
        str, typer.Option("--type", "-t", help=f"GGUF tensor type: {', '.join(GGUF_TYPES)}.")
    ] = "f16",
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="Merge this LoRA adapter first.")
    ] = None,
    variant: Annotated[
        str | None, typer.Option(help="Variant of a gemma_pytorch .ckpt, e.g. gemma-2b.")
    ] = None,
) -> None:
    """Convert a model to GGUF (f32, f16 or q8_0; llama.cpp reads it) or to a Hugging Face folder.

    Examples:  gemmakit convert -m path/to/hf-folder -o model.Q8_0.gguf --type q8_0
               gemmakit convert --adapter runs/faq -o faq.f16.gguf          (embedded base + adapter)
               gemmakit convert -m model.gguf --to hf -o hf-folder/
    """
    if to not in ("gguf", "hf"):
        raise GemmaError(f"--to must be gguf or hf, not {to!r}")
    m = load(model, dtype="float32", device="cpu", quant=None, variant=variant, adapter=adapter)
    if adapter is not None:
        merge_lora(m.module)
    state = m.module.state_dict()
    if to == "hf":
        write_hf(out, state, m.config, m.tokenizer)
    else:
        bar = Progress(
            TextColumn("writing"),
            BarColumn(),
            MofNCompleteColumn(),
            transient=True,
            console=Console(stderr=True),
        )
        task = bar.add_task("write", total=None)
        with bar:
            write_gguf(
                out,
                state,
                m.config,
                m.tokenizer,
                qtype=qtype,
                on_tensor=lambda i, n: bar.update(task, completed=i + 1, total=n),
            )
    Console(stderr=True).print(f"wrote {out}")
