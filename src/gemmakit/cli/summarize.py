"""gemmakit summarize FILE: a summary of a document of any length, streamed."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..loader import load
from .run import ModelOpt


def summarize(
    file: Annotated[str, typer.Argument(help="A .txt, .md or .pdf document (.pdf needs gemmakit[pdf]).")],
    model: ModelOpt = None,
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter folder (PEFT format) to apply.")] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", help="Tokens per model call: chunk + prompt + summary "
                                            "(default min(2048, the model's context)).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens per summary.")] = 200,
    refine: Annotated[bool, typer.Option(help="Carry one running summary through the chunks instead of "
                                         "map-reduce.")] = False,
    chat: Annotated[bool, typer.Option(help="Prompt through the chat template (instruction-tuned models).")] = False,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Same seed, same text (with -t > 0).")] = None,
) -> None:
    """Summarize a document longer than the context: chunks cut at paragraphs and sentences, summarized one by
    one (a progress bar per chunk), then combined; the final summary streams to stdout.

    Examples:  gemmakit summarize report.md
               gemmakit summarize paper.pdf -m gemma-3-1b-it.gguf --chat --refine
    """
    from ..recipes.documents import read_document
    from ..recipes.summarize import summarize as run_summary

    text = read_document(file)
    m = load(model, adapter=adapter)
    err = Console(stderr=True)
    with Progress(TextColumn("summarizing chunks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("chunks", total=None)

        def on_chunk(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def on_text(piece: str) -> None:
            if bar.live.is_started:
                bar.stop()  # the final summary streams below the finished chunks
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = run_summary(text, model=m, context=ctx, max_new_tokens=max_new_tokens,
                             mode="refine" if refine else "map-reduce", chat=chat, temperature=temperature,
                             seed=seed, on_chunk=on_chunk, on_text=on_text)
    sys.stdout.write("\n")
    err.print(f"[dim]{len(result.chunks)} chunk(s) of {file}, {'refine' if refine else 'map-reduce'}[/]")
