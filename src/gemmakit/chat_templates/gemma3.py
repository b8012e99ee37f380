"""The Gemma 1, 2 and 3 chat template (spec §5.7): one turn format for the three generations.

    <bos><start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{content}<end_of_turn>\\n...

Gemma 3's template has no system turn either: it prepends the system text (untrimmed) + "\\n\\n" to the first user
turn. Gemma 1/2's official template rejects a system message outright; since OpenAI clients nearly always send
one, we fold it into the first user turn exactly as Gemma 3 does instead of failing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import GemmaError
from .messages import SYSTEM_ROLES, Message, content_text, texts

BOS, START, END = "<bos>", "<start_of_turn>", "<end_of_turn>"


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
        prefix, start = "".join(texts(messages[0]["content"], "messages[0]")) + "\n\n", 1  # untrimmed, as Gemma 3's
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
