"""gemmakit verify: check that a model loads and computes right (tokenizer, logits, fast path, transformers)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .run import ModelOpt


def verify(
    model: ModelOpt = None,
    transformers: Annotated[bool, typer.Option(help="Compare with transformers on the same checkpoint (when "
                                               "installed; loading a GGUF there takes ~1 min for 270M).")] = True,
    fast: Annotated[bool, typer.Option(help="Compare the fast path with the reference path.")] = True,
) -> None:
    """Run parity checks on built-in texts and print a verdict; exits 1 when a check fails.

    Examples:  gemmakit verify
               gemmakit verify -m gemma-2-2b-it.Q4_K_M.gguf --no-transformers
    """
    from ..evaluate.verify import verify as run_checks

    err = Console(stderr=True)
    with err.status("verifying") as status:
        report = run_checks(model, transformers=transformers, fast=fast,
                            on_step=lambda s: status.update(f"verifying: {s}"))
    table = Table(title=f"gemmakit verify: {report.source}")
    for col in ("check", "measured", "limit", "result"):
        table.add_column(col)
    for c in report.checks:
        result = "[green]ok[/]" if c.ok else "[dim]skipped[/]" if c.ok is None else "[bold red]FAIL[/]"
        table.add_row(c.name, c.value, c.limit, result)
    out = Console()
    out.print(table)
    for c in report.checks:
        if c.note:
            out.print(f"[dim]{c.name}:[/] {c.note}")
    if report.ok:
        out.print("[bold green]verdict: the model computes as it should[/]")
        return
    names = ", ".join(c.name for c in report.failures)
    out.print(f"[bold red]verdict: FAILED[/] ({names})")
    raise typer.Exit(1)
