"""gemmakit convert -m MODEL -o OUT: write a model (optionally with a LoRA adapter merged) as GGUF, HF, a keras-hub
preset or a Flax/Orbax checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..draft import Drafter
from ..draft_gguf import write_drafter_gguf
from ..errors import GemmaError
from ..loader import _tokenizer_near, load
from ..lora.adapter import merge as merge_lora
from ..weights.keras import write_keras_preset
from ..weights.orbax import write_orbax
from ..weights.writers import GGUF_TYPES, write_gguf, write_hf

TARGETS = ("gguf", "hf", "keras-preset", "orbax")


def convert(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .gguf file (a folder with --to hf/keras-preset/orbax).")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="GGUF, HF folder, keras-hub preset, Orbax checkpoint or .ckpt "
                                                      "(default: embedded)")
    ] = None,
    to: Annotated[str, typer.Option(help="gguf, hf, keras-preset or orbax.")] = "gguf",
    qtype: Annotated[
        str, typer.Option("--type", "-t", help=f"GGUF tensor type: {', '.join(GGUF_TYPES)}.")
    ] = "f16",
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="Merge this LoRA adapter first.")
    ] = None,
    variant: Annotated[
        str | None, typer.Option(help="Variant of a gemma_pytorch .ckpt or Orbax checkpoint, e.g. gemma-2b.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    dtype: Annotated[
        str, typer.Option(help="float32 or bfloat16 tensors in an hf, keras-preset or orbax output.")
    ] = "float32",
) -> None:
    """Convert a model to GGUF (f32, f16 or q8_0; llama.cpp reads it), a Hugging Face folder, a keras-hub preset
    (keras_hub.models.GemmaCausalLM.from_preset reads it) or a Flax/Orbax checkpoint (gm.ckpts.load_params).

    Examples:  gemmakit convert -m path/to/hf-folder -o model.Q8_0.gguf --type q8_0
               gemmakit convert --adapter runs/faq -o faq.f16.gguf          (embedded base + adapter)
               gemmakit convert -m model.gguf --to hf -o hf-folder/
               gemmakit convert -m runs/faq-merged --to keras-preset -o faq-keras/   (a merged LoRA, to Keras)
               gemmakit convert -m kaggle/gemma2-2b-flax/gemma2-2b --to orbax -o flax-copy/
    """
    if to not in TARGETS:
        raise GemmaError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    check_output(out, to, force=force)  # before the conversion, which takes minutes
    m = load(model, dtype="float32", device="cpu", quant=None, variant=variant, adapter=adapter)
    if isinstance(m, Drafter):  # a Gemma 4 assistant: llama.cpp's gemma4-assistant GGUF (draft_gguf.py)
        if to != "gguf":
            raise GemmaError(f"an assistant drafter converts to gguf only (its Hugging Face folder is the source); "
                             f"drop --to {to}")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_drafter_gguf(out, m, _tokenizer_near(Path(model)) if model else None, qtype=qtype)
        Console(stderr=True).print(f"wrote {out}")
        return
    if adapter is not None:
        merge_lora(m.module)
    state = m.module.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    if to == "hf":
        write_hf(out, state, m.config, m.tokenizer, dtype=dtype)
    elif to == "keras-preset":
        write_keras_preset(out, state, m.config, m.tokenizer, dtype=dtype)
    elif to == "orbax":
        write_orbax(out, state, m.config, m.tokenizer, dtype=dtype)
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


def check_output(out: Path, to: str, *, force: bool) -> None:
    """GemmaError unless `out` can be written: a file for GGUF, a folder otherwise; an existing model is replaced
    only with --force; missing folders are created, so the nearest existing one must be a writable folder."""
    if to == "gguf" and out.is_dir():
        raise GemmaError(f"-o {out} is a folder; give a file name, e.g. -o {out / 'model.gguf'}")
    if to != "gguf" and out.exists() and not out.is_dir():
        raise GemmaError(f"-o {out} is a file; --to {to} writes a folder: give a folder name")
    existing = {"gguf": [out], "hf": [out / "config.json", out / "model.safetensors"],
                "keras-preset": [out / "config.json", out / "model.weights.h5"],
                "orbax": [out / "_METADATA", out / "manifest.ocdbt"]}[to]
    if not force and any(p.exists() for p in existing):
        raise GemmaError(f"-o {out} already holds a model; pass --force to overwrite it or choose another path")
    folder = out if to != "gguf" else out.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise GemmaError(f"-o {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GemmaError(f"-o {out}: the folder {folder} is not writable; choose another path")
