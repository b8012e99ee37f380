"""The --draft PATH / --draft-tokens N options that run, chat and serve share (speculative.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..errors import GemmaError

DraftOpt = Annotated[str | None, typer.Option("--draft", help="A Gemma 4 assistant drafter (HF folder) that "
                                              "proposes tokens for the model to verify: same output, faster.")]
DraftTokensOpt = Annotated[int, typer.Option("--draft-tokens", help="Tokens the drafter proposes per round at "
                                             "most (fewer while it is rejected).")]


def load_draft(path: str | None) -> Any:
    """The drafter at `path`, or None; a clear error when the path holds a model that is not a drafter."""
    if path is None:
        return None
    from ..draft import Drafter
    from ..loader import load

    drafter = load(path, progress=False)
    if not isinstance(drafter, Drafter):
        raise GemmaError(f"{path} is a model, not an assistant drafter (gemma4_assistant); pass the "
                         "-assistant folder that belongs to the model")
    return drafter
