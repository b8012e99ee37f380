"""gemmakit eval perplexity FILE | gemmakit eval tasks --tasks ...: how good the model is on text or benchmarks."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import GemmaError
from ..loader import load
from .run import ModelOpt

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Evaluate a model: perplexity, lm-eval tasks.")


@app.command("perplexity")
def perplexity(
    file: Annotated[str, typer.Argument(help="UTF-8 text file to score.")],
    model: ModelOpt = None,
    window: Annotated[int | None, typer.Option(help="Tokens per window (default min(2048, context)).")] = None,
    stride: Annotated[int | None, typer.Option(help="Tokens between window starts (default window/2).")] = None,
    reference: Annotated[bool, typer.Option("--reference", help="The exact fp32 path (quant=None) instead of "
                                            "the fast path.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter folder (PEFT format) to apply.")] = None,
) -> None:
    """Strided sliding-window perplexity, as the transformers guide computes it (same window and stride, same
    number).

    Examples:  gemmakit eval perplexity wiki.test.txt
               gemmakit eval perplexity notes.md -m gemma-2-2b.gguf --window 1024 --stride 512 --json
    """
    from ..evaluate.perplexity import perplexity_of_file

    err = Console(stderr=True)
    m = load(model, quant=None if reference else "auto", adapter=adapter)
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("scoring", total=None)
        result = perplexity_of_file(m, file, window=window, stride=stride,
                                    on_progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        print(json.dumps({**result.to_dict(), "model": m.source, "path": "reference" if reference else "fast"}))
        return
    out = Console()
    out.print(f"[bold]{file}[/]  ({m.source}, {'reference' if reference else 'fast'} path)")
    out.print(f"tokens scored   {result.tokens}")
    out.print(f"perplexity      {result.perplexity:.4f}")
    out.print(f"bits per byte   {result.bits_per_byte:.4f}")
    out.print(f"window/stride   {result.window}/{result.stride} ({result.windows} windows)")


@app.command("tasks")
def tasks(
    task_names: Annotated[str, typer.Option("--tasks", help="Comma-separated lm-eval task names.")],
    model: ModelOpt = None,
    quant: Annotated[str, typer.Option(help="auto (fast path for quantized GGUF), q8, or none (exact fp32).")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 8,
    limit: Annotated[float | None, typer.Option(help="Examples per task (a count, or a fraction < 1).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples per prompt.")] = None,
    include_path: Annotated[str | None, typer.Option(help="Folder of extra task YAMLs (local tasks).")] = None,
    apply_chat_template: Annotated[bool, typer.Option(help="Render prompts with the chat template.")] = False,
    output: Annotated[str | None, typer.Option(help="Write lm-eval's full results JSON to this file.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for few-shot sampling and any sampled generation.")] = 1234,
) -> None:
    """Run lm-evaluation-harness tasks on a gemmakit model (needs: pip install 'gemmakit[eval]').

    The same as `lm_eval --model gemmakit --model_args pretrained=MODEL,quant=auto --tasks ...`, with a batch
    size of 8 and the model loaded once.

    Examples:  gemmakit eval tasks --tasks hellaswag --limit 100
               gemmakit eval tasks --tasks my_task --include-path tasks/ -m gemma-2-2b-it.gguf --apply-chat-template
    """
    from ..evaluate.tasks import run_tasks

    results, table = run_tasks(task_names, model=model, quant=quant, batch_size=batch_size, limit=limit,
                               num_fewshot=num_fewshot, include_path=include_path,
                               apply_chat_template=apply_chat_template, output=output, seed=seed)
    print(table)
    if not results.get("results"):
        raise GemmaError("lm-eval returned no results; check the task names (lm_eval ls tasks)")
