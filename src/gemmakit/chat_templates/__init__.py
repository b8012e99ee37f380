"""Gemma chat turns: the official templates per generation, rendered and tokenized (spec §5.7). No torch here.

Gemma 4 has its own turn format, with a system role, a thinking mode and function calling (gemma4.py); the
template is chosen by the tokenizer (`template_for`), as a checkpoint's chat template ships with its tokenizer.
Gemma 1, 2 and 3 use the same turn format:

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

from ..errors import GemmaError
from . import gemma4

FAMILIES = ("gemma", "gemma2", "gemma3", "gemma4")  # template names: Gemma 1/2/3 share one
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
    out: list[tuple[str, bool]] = [(BOS, True)]
    for role, text in turns(messages):
        out += [(START, True), (f"{role}\n{text}", False), (END, True), ("\n", False)]
    if add_generation_prompt:
        out += [(START, True), ("model\n", False)]
    return out


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


def reasoning_splitter(tokenizer: Any) -> gemma4.ReasoningSplitter | None:
    """A splitter of generated text into reasoning and reply for a Gemma 4 tokenizer; None for other tokenizers."""
    token_id = getattr(tokenizer, "token_id", None)
    start = token_id(gemma4.CHANNEL) if token_id is not None else None
    end = token_id(gemma4.CHANNEL_END) if token_id is not None else None
    return gemma4.ReasoningSplitter(start, end) if start is not None and end is not None else None


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
