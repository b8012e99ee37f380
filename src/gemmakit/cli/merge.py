"""gemmakit merge -m MODEL --adapter A -o OUT: fold a LoRA adapter into the weights, write an HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..loader import load
from ..lora.adapter import merge as merge_lora
from ..weights.writers import write_hf


def merge(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="LoRA adapter folder (PEFT format).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to write config.json + model.safetensors to.")
    ],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base: GGUF, HF folder or .ckpt (default: embedded)")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 tensors in the output.")] = "float32",
    variant: Annotated[
        str | None, typer.Option(help="Variant of a gemma_pytorch .ckpt, e.g. gemma-2b.")
    ] = None,
) -> None:
    """Merge ADAPTER into the base model and write a Hugging Face folder (transformers and gemmakit load it).

    Example:  gemmakit merge --adapter runs/faq -o runs/faq-merged
              gemmakit convert -m runs/faq-merged -o faq.Q8_0.gguf --type q8_0
    """
    m = load(model, dtype="float32", device="cpu", quant=None, variant=variant, adapter=adapter)
    merge_lora(m.module)
    write_hf(out, m.module.state_dict(), m.config, m.tokenizer, dtype=dtype)
    Console(stderr=True).print(f"merged {adapter} into {m.source}: {out}/")
