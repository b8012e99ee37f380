"""Function calling for Gemma 1/2/3: the tool prompt format, the grammar of a call, and calls read back from text.

Gemma 1/2/3 have no tool tokens; Google documents function calling for them as a prompt format ("Function calling
with Gemma", https://ai.google.dev/gemma/docs/capabilities/function-calling): the instructions below and the
functions' JSON definitions come before the user's request, and the model answers with a JSON call
`{"name": function name, "parameters": dictionary of argument name and its value}` and no other text. For tool
results we follow Google's agentic guide (https://ai.google.dev/gemma/docs/meme-generator, "Gemma is expecting
to get its result back wrapped with ```tool_output```"): each result goes back as a user turn in a ```tool_output
fence. Parallel calls are a JSON list of such calls. Gemma 4 has native function-calling tokens; its template is
chat_templates/gemma4.py (tools rendered there, not here).

Nothing here trusts the model: when a call is required, the output is constrained (grammar.py) to the schema
`call_schema()` builds, so the name is one of the tools and the parameters validate against that tool's schema.

Replies are read as they are generated (`JsonCallReader`): a reply that starts with '{' or '[' is calls, and each
call's id and name go out as soon as its name is complete, then its arguments' JSON text piece by piece, as
OpenAI streams `tool_calls`; the same deltas, joined, are the non-streamed reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..chat_templates.messages import texts
from ..errors import GemmaError
from .calls import MAX_CALLS, CallLog, ReplyDelta, ToolCall, merged

INSTRUCTIONS = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the "
    "format of\n{fmt}\nYou SHOULD NOT include any other text in the response if you call a function\n"
)
ONE_CALL = '{"name": function name, "parameters": dictionary of argument name and its value}'
MANY_CALLS = f"[{ONE_CALL}, ...]"
def call_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON Schema of the model's answer when it must call: one call (or a list of calls when parallel) whose
    name is a tool's and whose parameters validate against that tool's schema, closed to undeclared keys (as
    Gemma 4's calls and OpenAI's strict mode are): a key the function does not take would break the call."""
    from ..grammar import closed

    one = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
            "properties": {"name": {"const": t["name"]}, "parameters": closed(t["parameters"])}} for t in tools]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    return {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_CALLS} if parallel else call


def auto_grammar(tools: list[dict[str, Any]], parallel: bool) -> str:
    """Lark for tool_choice="auto": a call as call_schema() wants it, or plain text that does not start like one."""
    schema = json.dumps(call_schema(tools, parallel))
    return f'start: call | text\ncall: %json {schema}\ntext: /[^\\[{{](.|\\n)*/\n'


def prompt_block(tools: list[dict[str, Any]], parallel: bool) -> str:
    """The instructions and the functions' JSON definitions, as Google's guide puts them before the request."""
    defs = json.dumps(tools, indent=2, ensure_ascii=False)
    return INSTRUCTIONS.format(fmt=MANY_CALLS if parallel else ONE_CALL) + defs + "\n\n"


def render_calls(calls: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """An assistant message's OpenAI tool_calls as the text the model writes for them."""
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise GemmaError("each assistant tool_calls entry needs {'function': {'name': ..., 'arguments': ...}}")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except json.JSONDecodeError:
                raise GemmaError(f"tool call {fn['name']!r}: arguments are not valid JSON") from None
        out.append({"name": fn["name"], "parameters": args})
    return json.dumps(out if parallel or len(out) > 1 else out[0], ensure_ascii=False)


def plain_messages(messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None, parallel: bool
                   ) -> list[dict[str, Any]]:
    """An OpenAI conversation with tools, tool calls and tool results as the system/user/assistant messages of
    Gemma 1/2/3's template: the tool block opens the first user turn, calls are the assistant's JSON text,
    consecutive tool results form one user turn of ```tool_output fences, and a user message right after them
    joins that turn."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise GemmaError(f"messages[{i}] must be an object with a 'role'")
        role = m["role"]
        if role == "tool":
            body = "".join(texts(m.get("content"), f"messages[{i}]", optional=True))
            fence = f"```tool_output\n{body}\n```"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + fence
            else:
                out.append({"role": "user", "content": fence, "_tool": True})
        elif role == "user" and out and out[-1].get("_tool"):
            # The user speaks right after the tool results (OpenAI accepts it): the results are already the user's
            # turn here, so the message joins it, in order, instead of breaking the alternation.
            out[-1]["content"] += "\n\n" + "".join(texts(m.get("content"), f"messages[{i}]", optional=True))
        elif role == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": render_calls(m["tool_calls"], parallel)})
        else:
            out.append(dict(m))
    if tools:
        first = next((k for k, m in enumerate(out) if m["role"] == "user"), None)
        if first is None:
            raise GemmaError("the conversation needs a user message before tools can be offered")
        out[first] = {**out[first], "content": prompt_block(tools, parallel)
                      + "".join(texts(out[first].get("content"), f"messages[{first}]", optional=True))}
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls in a complete reply, or None when the reply is plain text (it does not start with '{' or '[') or
    its calls are not complete."""
    reader = JsonCallReader("auto")
    reader.feed(text)
    _, reason = reader.finish("stop")
    return reader.calls() if reason == "tool_calls" else None


class JsonCallReader:
    """Reads a Gemma 1/2/3 reply as it streams: content, or (when it starts with '{' or '[', or always with mode
    "required") calls `{"name": ..., "parameters": {...}}` / a list of them, as ReplyDeltas. Each call's first
    delta (id, name) goes out once its name is complete; the parameters' JSON text follows as it is generated."""

    def __init__(self, mode: str) -> None:
        self.state = "calls" if mode == "required" else "undecided"  # -> "content" or "calls"
        self.held = ""
        self.log = CallLog()
        self.scan = _JsonCalls(self.log)

    def feed(self, text: str, ids: Sequence[int] = ()) -> list[ReplyDelta]:
        if self.state == "undecided":
            self.held += text
            head = self.held.lstrip()
            if not head:
                return []
            self.state = "calls" if head[0] in "{[" else "content"
            text, self.held = self.held, ""
        if self.state == "content":
            return [ReplyDelta(content=text)] if text else []
        return merged(self.scan.feed(text))

    def finish(self, reason: str) -> tuple[list[ReplyDelta], str]:
        """The closing deltas and the finish reason: "tool_calls" when the reply was complete calls."""
        if self.state == "undecided":
            return ([ReplyDelta(content=self.held)] if self.held else []), reason
        return [], self.log.finish_reason(reason) if self.state == "calls" else reason

    def calls(self) -> list[ToolCall]:
        return self.log.calls()


class _JsonCalls:
    """A character scanner over '{"name": ..., "parameters": ...}' or '[{...}, ...]': finds each call object, its
    name and the raw JSON text of its parameters, without waiting for the end of the document."""

    def __init__(self, log: CallLog) -> None:
        self.log = log
        self.depth, self.call_depth = 0, 0  # container nesting; that of call objects (1, or 2 inside a list)
        self.in_str = self.esc = False
        self.key: str | None = None  # a key being read (its JSON text), at call depth
        self.field: str | None = None  # the key whose value is being read
        self.value: str | None = None  # that value's text so far
        self.pending = ""  # parameters read before the name (sent once the call is opened)
        self.opened = False

    def feed(self, text: str) -> list[ReplyDelta | None]:
        out: list[ReplyDelta | None] = []
        for c in text:
            self._char(c, out)
        return out

    def _char(self, c: str, out: list[ReplyDelta | None]) -> None:
        if not self.call_depth:
            if c.isspace():
                return
            self.call_depth = 1 if c == "{" else 2
        if self.in_str:
            self._string_char(c, out)
            return
        at_call = self.depth == self.call_depth
        if self.value is not None and at_call and c in ",}":
            self._end_value(out)
        if self.value is not None:
            if self.value or not c.isspace():
                self._put(c, out)
                self.in_str = c == '"'
                self.depth += (c in "{[") - (c in "}]")
            return
        if c == '"':
            self.in_str = True
            self.key = '"' if at_call else None
        elif c == ":" and at_call:
            self.value = ""
        elif c in "{[":
            self.depth += 1
            if self.depth == self.call_depth:
                self.field, self.pending, self.opened = None, "", False
        elif c in "}]":
            if at_call and self.opened:
                self.log.close()
            self.depth -= 1

    def _string_char(self, c: str, out: list[ReplyDelta | None]) -> None:
        if self.key is not None:
            self.key += c
        elif self.value is not None:
            self._put(c, out)
        if self.esc:
            self.esc = False
        elif c == "\\":
            self.esc = True
        elif c == '"':
            self.in_str = False
            if self.key is not None:
                self.field, self.key = json.loads(self.key), None

    def _put(self, c: str, out: list[ReplyDelta | None]) -> None:
        self.value = (self.value or "") + c
        if self.field == "parameters":
            if self.opened:
                out.append(self.log.add(c))
            else:
                self.pending += c

    def _end_value(self, out: list[ReplyDelta | None]) -> None:
        if self.field == "name" and not self.opened:
            out.append(self.log.open(json.loads(self.value or '""')))
            self.opened = True
            out.append(self.log.add(self.pending))
            self.pending = ""
        self.field = self.value = None
