"""gemmakit cache: what is on disk under GEMMAKIT_CACHE (~/.cache/gemmakit), and `clear` to empty it."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from .. import disk_cache
from ..disk_cache import cache_dir

app = typer.Typer(no_args_is_help=False, invoke_without_command=True, add_completion=False,
                  help="Show the cache folder's contents (`gemmakit cache`) or empty it (`gemmakit cache clear`).")


@app.callback()
def show(ctx: typer.Context) -> None:
    """List the cache folder's entries and sizes.

    Examples:  gemmakit cache
               gemmakit cache clear
    """
    if ctx.invoked_subcommand is not None:
        return
    table = Table(title=str(cache_dir()), show_header=True)
    for col in ("entry", "size", "what"):
        table.add_column(col)
    total = 0
    for name, size, what in disk_cache.usage():
        table.add_row(name, f"{size / 2**20:.1f} MiB", what)
        total += size
    table.add_row("total", f"{total / 2**20:.1f} MiB", "")
    Console().print(table)


@app.command()
def clear() -> None:
    """Remove everything in the cache folder (each entry is rebuilt when next needed)."""
    freed = disk_cache.clear()
    Console().print(f"freed {freed / 2**20:.1f} MiB in {cache_dir()}")
