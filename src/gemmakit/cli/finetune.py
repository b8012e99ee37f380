"""gemmakit finetune DATA.jsonl -m MODEL -o OUT: LoRA/QLoRA fine-tuning, also under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import GemmaError
from ..loader import load
from ..lora.adapter import TARGETS, LoRAConfig
from ..train import dist as D
from ..train.trainer import TrainConfig, train_dtype
from ..train.trainer import finetune as run_finetune


def finetune(
    data: Annotated[Path, typer.Argument(help="JSONL: {messages}, {prompt, completion} or {text} per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the adapter, logs and checkpoints.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="GGUF, HF folder or .ckpt (default: embedded)")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default: --epochs over the data).")
    ] = None,
    epochs: Annotated[
        float, typer.Option(help="Passes over the training data when --max-steps is not given.")
    ] = 1.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-4,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps before the cosine decay.")] = 10,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / rank).")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    targets: Annotated[
        str, typer.Option(help=f"Comma-separated modules to adapt, from: {','.join(TARGETS)}.")
    ] = ("q_proj,k_proj,v_proj,o_proj"),
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Rows per micro-batch per process.")
    ] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    seq_len: Annotated[
        int, typer.Option(help="Examples are cut to this many tokens (the cut is reported).")
    ] = 512,
    pack: Annotated[bool, typer.Option(help="Pack several examples into each seq-len row.")] = False,
    quant: Annotated[str | None, typer.Option(help="QLoRA: int8 or int4 weight-only frozen base.")] = None,
    val_split: Annotated[float, typer.Option(help="Fraction of the data held out for eval loss.")] = 0.0,
    val_data: Annotated[Path | None, typer.Option(help="A separate JSONL for eval loss.")] = None,
    eval_every: Annotated[int, typer.Option(help="Eval loss every N steps (0: at the end).")] = 0,
    save_every: Annotated[
        int, typer.Option(help="Checkpoint every N steps (0: only at the end / Ctrl-C).")
    ] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in OUT.")] = False,
    grad_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in backward (less memory).")
    ] = False,
    fsdp: Annotated[
        bool, typer.Option(help="Under torchrun: shard the frozen base over the processes.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seeds the adapter init, data order and dropout.")] = 0,
    dtype: Annotated[
        str,
        typer.Option(
            help="Frozen base dtype: auto (bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX, else float32), "
            "float32 or bfloat16. Adapters, optimizer and loss are float32 either way."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    variant: Annotated[
        str | None, typer.Option(help="Variant of a gemma_pytorch .ckpt, e.g. gemma-2b.")
    ] = None,
    plot: Annotated[bool, typer.Option(help="Also write OUT/loss.png (needs matplotlib).")] = False,
) -> None:
    """Fine-tune LoRA adapters on a JSONL file; writes OUT/adapter_config.json + adapter_model.safetensors (PEFT).

    Examples:  gemmakit finetune examples/gemmakit_faq.jsonl -o runs/faq --max-steps 100 --seq-len 256
               gemmakit finetune data.jsonl -m gemma-3-1b.gguf -o runs/q --quant int8 --val-split 0.1
               torchrun --nproc_per_node=2 -m gemmakit finetune data.jsonl -m model/ -o runs/ddp
    Ctrl-C finishes the current step and saves a checkpoint; --resume continues from it.
    """
    world = D.setup(device)
    console = Console(stderr=True, quiet=not world.main)
    try:
        dtype = train_dtype(dtype, world.device)
        cfg = TrainConfig(
            lr=lr,
            warmup_steps=warmup,
            max_steps=max_steps,
            epochs=epochs,
            batch_size=batch_size,
            grad_accum=grad_accum,
            seq_len=seq_len,
            pack=pack,
            val_split=val_split,
            eval_every=eval_every,
            save_every=save_every,
            quant=quant,
            grad_checkpointing=grad_checkpointing,
            fsdp=fsdp,
            seed=seed,
            dtype=dtype,
            lora=LoRAConfig(
                r=rank,
                alpha=alpha,
                dropout=dropout,
                targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
            ),
        )
        if fsdp and not world.distributed:
            raise GemmaError("--fsdp shards over processes; run it under torchrun --nproc_per_node=N")
        m = load(model, dtype=dtype, device=world.device, quant=None, variant=variant, progress=world.main)
        if m.tokenizer is None:
            raise GemmaError(
                "this model has no tokenizer to encode the data with; pass a model folder that has one"
            )
        bar = Progress(
            TextColumn("fine-tuning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tok_s]:.0f} tok/s"),
            TimeRemainingColumn(),
            console=console,
            disable=not world.main,
        )
        task = bar.add_task("train", total=None, loss=float("nan"), tok_s=0.0)

        def on_step(rec: dict) -> None:
            bar.update(task, completed=rec["step"], total=rec["total"], loss=rec["loss"], tok_s=rec["tok_s"])
            if "val_loss" in rec:
                console.print(
                    f"step {rec['step']}: train loss {rec['loss']:.4f}, eval loss {rec['val_loss']:.4f}"
                )

        with bar:
            result = run_finetune(
                m.module,
                m.tokenizer,
                data,
                out,
                cfg,
                world=world,
                resume=resume,
                progress=on_step,
                base_name=m.source,
            )
        s = result.data
        console.print(
            f"data: {s.examples} examples {s.shapes}, {s.truncated} truncated to {seq_len} tokens "
            f"({s.tokens_cut} tokens cut), {s.dropped} dropped"
        )
        if result.history:
            first, last = result.history[0], result.history[-1]
            console.print(
                f"loss {first['loss']:.4f} -> {last['loss']:.4f} over {result.steps} steps"
                + (f", eval loss {last['val_loss']:.4f}" if "val_loss" in last else "")
            )
        if plot and world.main and result.history:
            from ..train.plot import plot_loss

            plot_loss(result.history, out / "loss.png")
        state = "interrupted; saved a checkpoint (continue with --resume)" if result.interrupted else "done"
        console.print(f"{state}: adapter in {out}/ (load it with gemmakit.load(..., adapter='{out}'))")
    finally:
        D.teardown(world)
