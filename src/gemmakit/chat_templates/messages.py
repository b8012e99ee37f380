"""What every chat template shares: the message shape, the system roles and a message's content as text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import GemmaError

SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer clients call the system message "developer"

Message = Mapping[str, Any]


def content_text(content: Any, *, where: str) -> str:
    """The text of a message's content: a string, or OpenAI content parts [{"type": "text", "text": ...}].

    Parts are trimmed one by one and joined, as Gemma 3's template does; images are refused (text models only).
    """
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        texts = []
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
            texts.append(part["text"].strip())
        return "".join(texts)
    raise GemmaError(
        f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )
