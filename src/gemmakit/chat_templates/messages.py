"""What every chat template shares: the message shape, the system roles and a message's content as text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import GemmaError

SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer clients call the system message "developer"

Message = Mapping[str, Any]


def texts(content: Any, where: str, *, optional: bool = False) -> list[str]:
    """The text pieces of a message's content, checked: a string is one piece, OpenAI content parts
    [{"type": "text", "text": ...}] one each, and None (where `optional`, as an assistant's content beside its tool
    calls) none. Anything else is refused by name, images included: gemmakit serves text models. Every template
    and the tool formats read content through here; each decides itself what to trim."""
    if content is None and optional:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or "type" not in part:
                raise GemmaError(f"{where}.content[{i}] must be an object with a 'type'")
            if part["type"] != "text":
                raise GemmaError(
                    f"{where}.content[{i}] has type {part['type']!r}; gemmakit serves text-only "
                    "models, so only 'text' parts are accepted"
                )
            if not isinstance(part.get("text"), str):
                raise GemmaError(f"{where}.content[{i}].text must be a string")
            out.append(part["text"])
        return out
    raise GemmaError(
        f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )


def content_text(content: Any, *, where: str) -> str:
    """The text of a message's content, each piece trimmed and then joined, as Gemma 3's template does."""
    return "".join(t.strip() for t in texts(content, where))
