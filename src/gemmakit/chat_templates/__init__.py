"""Gemma chat turns: the official templates per generation, rendered and tokenized (spec §5.7). No torch here.

One file per turn format: gemma3.py (Gemma 1, 2 and 3 share one) and gemma4.py (a system role, a thinking mode and
function calling; its reasoning is split from the reply by reasoning.py). The template is chosen by the tokenizer
(`template_for`), as a checkpoint's chat template ships with its tokenizer.

Token ids are built so that message text cannot forge control tokens: only the template's own markers
(<bos>, <start_of_turn>, <end_of_turn>) become control ids; everything else is tokenized as plain text. Between
two markers transformers tokenizes the text as one piece too, so the ids equal `apply_chat_template` whenever the
messages contain no control-token text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..errors import GemmaError
from . import gemma3, gemma4
from .gemma3 import END, turns
from .messages import SYSTEM_ROLES, Message, content_text
from .reasoning import ReasoningSplitter, reasoning_splitter

__all__ = ["END", "FAMILIES", "SYSTEM_ROLES", "Message", "ReasoningSplitter", "TextTokenizer", "content_text",
           "encode", "fit", "reasoning_splitter", "render", "segments", "template_for", "turns"]

FAMILIES = ("gemma", "gemma2", "gemma3", "gemma4")  # template names: Gemma 1/2/3 share one


class TextTokenizer(Protocol):
    def encode(self, text: str, *, bos: bool = True, special: bool = False) -> list[int]: ...


def template_for(tokenizer: Any) -> str:
    """The chat template a tokenizer belongs to: "gemma4" when it has Gemma 4's <|turn> marker, else "gemma3"
    (the Gemma 1/2/3 turn format; their templates differ only in system handling, unified here)."""
    token_id = getattr(tokenizer, "token_id", None)
    return "gemma4" if token_id is not None and token_id(gemma4.TURN) is not None else "gemma3"


def segments(
    messages: Sequence[Message],
    *,
    family: str = "gemma3",
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_control_marker) pieces, in order, in `family`'s template."""
    if family == "gemma4":
        return gemma4.segments(messages, tools=tools, thinking=thinking,
                                    add_generation_prompt=add_generation_prompt)
    if family not in FAMILIES:
        raise GemmaError(f"unknown chat template {family!r}; expected one of {', '.join(FAMILIES)}")
    if tools:
        raise GemmaError(f"tool declarations need Gemma 4's chat template; the {family} template has none")
    if thinking:
        raise GemmaError(f"thinking is a Gemma 4 template option; the {family} template has no thinking mode")
    return gemma3.segments(messages, add_generation_prompt=add_generation_prompt)


def render(
    messages: Sequence[Message],
    *,
    family: str = "gemma3",
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt as text, equal to transformers' `apply_chat_template(..., tokenize=False)` (with <bos>) under the
    official template of `family`; `tools` (OpenAI's function declarations) and `thinking` are Gemma 4's."""
    return "".join(text for text, _ in segments(messages, family=family, tools=tools, thinking=thinking,
                                                  add_generation_prompt=add_generation_prompt))


def encode(
    tokenizer: TextTokenizer,
    messages: Sequence[Message],
    *,
    family: str = "gemma3",
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Prompt token ids: markers as control tokens, message text as plain text (so it cannot forge markers)."""
    ids: list[int] = []
    for text, control in segments(messages, family=family, tools=tools, thinking=thinking,
                                  add_generation_prompt=add_generation_prompt):
        piece = tokenizer.encode(text, bos=False, special=control)
        if control and len(piece) != 1:
            raise GemmaError(f"this tokenizer has no {text} token, which the {family} chat template needs; "
                             "use the tokenizer that came with the model")
        ids += piece
    return ids


def fit(
    messages: Sequence[Message],
    count: Callable[[Sequence[Message]], int],
    budget: int,
) -> tuple[list[Message], int]:
    """Drop the oldest exchanges (a user message and what answers it) until count(messages) <= budget;
    -> (kept, exchanges dropped).

    A leading system message and the last user turn are always kept; if even they do not fit, GemmaError.
    """
    kept = list(messages)
    head = 1 if kept and kept[0].get("role") in SYSTEM_ROLES else 0
    dropped = 0
    while count(kept) > budget:
        nxt = next((j for j in range(head + 1, len(kept)) if kept[j].get("role") == "user"), None)
        if nxt is None:
            raise GemmaError(
                f"the last message alone needs {count(kept)} tokens but only {budget} fit in the "
                "context; shorten it (or the system prompt)"
            )
        del kept[head:nxt]  # one user message and the replies (and tool results) to it
        dropped += 1
    return kept, dropped
