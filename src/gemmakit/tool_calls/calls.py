"""What every call format shares: OpenAI's tools and tool_choice checked, and the calls of a reply as they are
read (ToolCall, the streamed CallDelta / ReplyDelta pieces, CallLog). The formats are gemma3_json.py (Gemma 1/2/3's
JSON calls) and gemma4.py (Gemma 4's native tokens)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import GemmaError

CHOICES = ("auto", "none", "required")
MAX_CALLS = 8  # parallel calls in one reply: a bound, so a small model cannot list calls until the budget ends


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""
    text: str | None = None  # the arguments' JSON text as it was streamed (json.dumps(arguments) when None)

    def openai(self) -> dict[str, Any]:
        """As OpenAI's message.tool_calls[i]: arguments as JSON text."""
        args = self.text if self.text is not None else json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}


@dataclass(frozen=True)
class CallDelta:
    """A piece of a call as it is generated: the first piece of each call carries its id and name (and empty
    arguments), the next ones the following text of its arguments' JSON, as OpenAI streams tool_calls."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def openai(self) -> dict[str, Any]:
        """As an element of OpenAI's streamed delta.tool_calls."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ReplyDelta:
    """A piece of a reply: reasoning (Gemma 4's thinking), content, or a piece of a call; one of them is set."""

    reasoning: str = ""
    content: str = ""
    call: CallDelta | None = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallLog:
    """The calls of one reply as they are read: opened with a name, their arguments' JSON text appended."""

    def __init__(self) -> None:
        self.items: list[list[Any]] = []  # [id, name, arguments text, complete]

    def open(self, name: str) -> ReplyDelta:
        self.items.append([new_call_id(), name, "", False])
        return ReplyDelta(call=CallDelta(len(self.items) - 1, "", self.items[-1][0], name))

    def add(self, text: str) -> ReplyDelta | None:
        if not text or not self.items:
            return None
        self.items[-1][2] += text
        return ReplyDelta(call=CallDelta(len(self.items) - 1, text))

    def close(self) -> None:
        if self.items:
            self.items[-1][3] = True

    def calls(self) -> list[ToolCall]:
        """The complete calls, in order."""
        return [ToolCall(name, json.loads(text or "{}"), id, text or "{}") for id, name, text, done in self.items
                if done]

    def finish_reason(self, reason: str) -> str:
        """"tool_calls" when the reply ended normally with every call complete, else the reply's own reason."""
        return "tool_calls" if reason == "stop" and self.items and all(c[3] for c in self.items) else reason


def merged(deltas: Sequence[ReplyDelta | None]) -> list[ReplyDelta]:
    """Adjacent pieces of the same kind (reasoning, content, or the arguments of one call) joined into one."""
    out: list[ReplyDelta] = []
    for d in deltas:
        if d is None or not (d.reasoning or d.content or d.call):
            continue
        last = out[-1] if out else None
        if last and d.reasoning and last.reasoning:
            out[-1] = ReplyDelta(reasoning=last.reasoning + d.reasoning)
        elif last and d.content and last.content:
            out[-1] = ReplyDelta(content=last.content + d.content)
        elif last and d.call and last.call and d.call.id is None and last.call.id is None \
                and last.call.index == d.call.index:  # the opening piece (id, name) stays on its own, as OpenAI's
            out[-1] = ReplyDelta(call=CallDelta(d.call.index, last.call.arguments + d.call.arguments))
        else:
            out.append(d)
    return out


def checked_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI `tools` validated: [{"type": "function", "function": {"name", "description"?, "parameters"?}}].
    Each parameters schema must itself be a valid JSON Schema of an object (checked by compiling it)."""
    from ..grammar import compile_grammar

    if not isinstance(tools, Sequence) or isinstance(tools, str) or not tools:
        raise GemmaError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    out, names = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, Mapping) or t.get("type") != "function" or not isinstance(t.get("function"), Mapping):
            raise GemmaError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name) or len(name) > 64:
            raise GemmaError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in names:
            raise GemmaError(f"{where}: two tools are named {name!r}; names must be unique")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise GemmaError(f"{where}.function.parameters must be a JSON Schema of type 'object'")
        try:
            compile_grammar(json_schema=params)
        except GemmaError as e:
            raise GemmaError(f"{where}.function.parameters: {e}") from None
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise GemmaError(f"{where}.function.description must be a string")
        out.append({"name": name, "description": desc or "", "parameters": dict(params)})
    return out


def chosen(tools: list[dict[str, Any]], choice: Any) -> tuple[str, list[dict[str, Any]]]:
    """(mode, the tools a call may use) for an OpenAI tool_choice: "auto", "none", "required" or
    {"type": "function", "function": {"name": ...}} (mode "required" with that one tool)."""
    if choice is None:
        return "auto", tools
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise GemmaError(f"tool_choice must be one of {', '.join(CHOICES)} or a named function, got {choice!r}")
        return choice, tools
    name = choice.get("function", {}).get("name") if isinstance(choice, Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or not isinstance(name, str):
        raise GemmaError("tool_choice must be 'auto', 'none', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")
    named = [t for t in tools if t["name"] == name]
    if not named:
        raise GemmaError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(t['name'] for t in tools)})")
    return "required", named
