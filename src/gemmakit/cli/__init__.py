"""The gemmakit command line: one file per command, each a thin call into the library."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from ..errors import GemmaError
from . import (
    ask,
    bench,
    cache,
    chat,
    convert,
    embed,
    finetune,
    guard,
    info,
    merge,
    run,
    serve,
    summarize,
    verify,
    watermark,
)
from . import eval as eval_cmd

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Run Google's Gemma models locally. Without -m, commands use the embedded Gemma 3 270M.")


@app.callback()
def options(
    threads: Annotated[
        int | None,
        typer.Option(envvar="GEMMAKIT_THREADS", help="CPU threads for the command (default: one per core). Use "
                     "fewer when other programs keep cores busy: every thread waits for the slowest one."),
    ] = None,
) -> None:
    """Options for every command, given before it: gemmakit --threads 1 run "..."."""
    if threads is not None:
        if threads < 1:
            raise GemmaError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)

app.command("run")(run.run)
app.command("info")(info.info)
app.command("chat")(chat.chat)
app.command("serve")(serve.serve)
app.command("finetune")(finetune.finetune)
app.command("merge")(merge.merge)
app.command("convert")(convert.convert)
app.command("embed")(embed.embed)
app.command("bench")(bench.bench)
app.command("guard")(guard.guard)
app.add_typer(watermark.app, name="watermark")
app.add_typer(eval_cmd.app, name="eval")
app.command("verify")(verify.verify)
app.command("summarize")(summarize.summarize)
app.command("ask")(ask.ask)
app.add_typer(cache.app, name="cache")


def main() -> None:
    try:
        app()
    except GemmaError as e:  # bad input: one clear line, no traceback
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
