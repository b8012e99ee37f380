"""Gemma chat turns: the official templates per generation, rendered and tokenized (spec §5.7). No torch here.

Every generation uses the same turn format:

    <bos><start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{content}<end_of_turn>\\n...

Gemma 3's template has no system turn either: it prepends the system text (untrimmed) + "\\n\\n" to the first user
turn. Gemma 1/2's official template rejects a system message outright; since OpenAI clients nearly always send
one, we fold it into the first user turn exactly as Gemma 3 does instead of failing.

Token ids are built so that message text cannot forge control tokens: only the template's own markers
(<bos>, <start_of_turn>, <end_of_turn>) become control ids; everything else is tokenized as plain text. Between
two markers transformers tokenizes the text as one piece too, so the ids equal `apply_chat_template` whenever the
messages contain no control-token text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .errors import GemmaError

FAMILIES = ("gemma", "gemma2", "gemma3")
SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer clients call the system message "developer"
BOS, START, END = "<bos>", "<start_of_turn>", "<end_of_turn>"

Message = Mapping[str, Any]


class TextTokenizer(Protocol):
    def encode(self, text: str, *, bos: bool = True, special: bool = False) -> list[int]: ...


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


def _system_text(content: Any, where: str) -> str:
    """System text goes in untrimmed (Gemma 3 template); from parts, their texts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        content_text(content, where=where)  # validates the parts
        return "".join(part["text"] for part in content)
    raise GemmaError(
        f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )


def turns(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(role, text) per turn, role "user" or "model", the system text folded into the first user turn.

    Roles must alternate user/assistant starting with user, as every Gemma template demands.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise GemmaError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise GemmaError(f"messages[{i}] must be an object with 'role' and 'content'")
    prefix, start = "", 0
    if messages[0]["role"] in SYSTEM_ROLES:
        prefix, start = _system_text(messages[0]["content"], "messages[0]") + "\n\n", 1
    out: list[tuple[str, str]] = []
    for i, m in enumerate(messages[start:], start):
        role = m["role"]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role in SYSTEM_ROLES:
            raise GemmaError(
                f"messages[{i}] is a {role} message; Gemma has no system turn, so only the first "
                "message may be one (it is folded into the first user turn)"
            )
        if role not in ("user", "assistant"):
            raise GemmaError(f"messages[{i}] has role {role!r}; Gemma chat takes system, user and assistant")
        if role != expected:
            raise GemmaError(
                f"messages[{i}] has role {role!r} but {expected!r} was expected: conversation roles "
                "must alternate user/assistant/user/assistant/..."
            )
        text = content_text(m["content"], where=f"messages[{i}]")
        if not out:
            text = prefix + text
        out.append(("model" if role == "assistant" else "user", text))
    if not out:
        raise GemmaError("the conversation needs at least one user message")
    return out


def segments(messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_control_marker) pieces, in order."""
    out: list[tuple[str, bool]] = [(BOS, True)]
    for role, text in turns(messages):
        out += [(START, True), (f"{role}\n{text}", False), (END, True), ("\n", False)]
    if add_generation_prompt:
        out += [(START, True), ("model\n", False)]
    return out


def render(messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
    """The prompt as text, equal to transformers' `apply_chat_template(..., tokenize=False)` (with <bos>)."""
    return "".join(text for text, _ in segments(messages, add_generation_prompt=add_generation_prompt))


def encode(
    tokenizer: TextTokenizer,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Prompt token ids: markers as control tokens, message text as plain text (so it cannot forge markers)."""
    ids: list[int] = []
    for text, control in segments(messages, add_generation_prompt=add_generation_prompt):
        ids += tokenizer.encode(text, bos=False, special=control)
    return ids


def fit(
    messages: Sequence[Message],
    count: Callable[[Sequence[Message]], int],
    budget: int,
) -> tuple[list[Message], int]:
    """Drop the oldest user/assistant exchanges until count(messages) <= budget; -> (kept, exchanges dropped).

    A leading system message and the last user turn are always kept; if even they do not fit, GemmaError.
    """
    kept = list(messages)
    head = 1 if kept and kept[0].get("role") in SYSTEM_ROLES else 0
    dropped = 0
    while count(kept) > budget:
        if len(kept) - head <= 1:
            raise GemmaError(
                f"the last message alone needs {count(kept)} tokens but only {budget} fit in the "
                "context; shorten it (or the system prompt)"
            )
        del kept[head : head + 2]  # one user message and the reply to it
        dropped += 1
    return kept, dropped
