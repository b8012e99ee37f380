"""Structured output and tools for the server: response_format and tools/tool_choice turned into a prompt and a
constraint, and the model's reply turned back into OpenAI's message, tool_calls and stream deltas.

- `response_format` {"type": "json_object"} constrains the reply to a JSON object; {"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}} to the schema (always enforced, whatever `strict` says).
- `tools` with `tool_choice` "required" or a named function constrain the reply to a call (grammar.py over
  tools.call_schema: a known name, parameters valid for that function); "auto" lets the model answer in text or
  call, a reply that starts like a call being held to the call grammar; "none" leaves tools out of the prompt.
  `parallel_tool_calls` (default true) lets the reply be a list of calls.
- The prompt: Gemma 4's own function-calling tokens through its template (chat_gemma4.py); Gemma 1/2/3 the
  documented prompt format of tools.py. A reply with calls is answered with `tool_calls` and finish_reason
  "tool_calls"; streamed, each call is one delta with its id, type and name, then one with its arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import chat as chat_template
from .. import tools as toolfmt
from ..errors import GemmaError
from . import schemas


@dataclass
class ChatPlan:
    """How one chat request is rendered and constrained."""

    messages: list[dict[str, Any]]  # for the chat template
    family: str
    template_tools: list[dict[str, Any]] | None = None  # OpenAI tools for Gemma 4's native declarations
    constraint: dict[str, Any] = field(default_factory=dict)  # keyword arguments of Model.constraint()
    mode: str = "none"  # tool mode: "none" (no calls read back), "auto" or "required"
    thinking: bool = False  # Gemma 4's thinking mode (chat_template_kwargs.enable_thinking, reasoning_effort)

    def encode(self, tokenizer: Any) -> list[int]:
        return chat_template.encode(tokenizer, self.messages, family=self.family, tools=self.template_tools,
                                    thinking=self.thinking)


def response_constraint(body: schemas.Sampling) -> dict[str, Any]:
    """Model.constraint() arguments for `response_format`, or {} for plain text."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"json_schema": {"type": "object"}}
    spec = fmt.json_schema
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise schemas.ParamError("response_format", "response_format json_schema needs "
                                 "{'name': ..., 'schema': {...}, 'strict': ...}")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict | bool):
        raise schemas.ParamError("response_format", "response_format.json_schema.schema must be a JSON Schema object")
    return {"json_schema": schema}


def plan_chat(body: schemas.ChatRequest, tokenizer: Any) -> ChatPlan:
    """The prompt and constraint of a chat request (ParamError, a 400, for bad tools or formats)."""
    family = chat_template.template_for(tokenizer)
    constraint = response_constraint(body)
    messages = [dict(m) for m in body.messages]
    tools: list[dict[str, Any]] = []
    mode = "none"
    if body.tools:
        try:
            tools = toolfmt.checked_tools(body.tools)
            mode, tools = toolfmt.chosen(tools, body.tool_choice)
        except GemmaError as e:
            raise schemas.ParamError("tools", str(e)) from None
    elif body.tool_choice not in (None, "none", "auto"):
        raise schemas.ParamError("tool_choice", "tool_choice needs 'tools' to choose from")
    parallel = body.parallel_tool_calls is not False
    if mode != "none" and constraint:
        raise schemas.ParamError("response_format", "response_format cannot be combined with tools; the reply "
                                 "is either a tool call or text in that format (use tool_choice='none')")
    if mode == "required":
        constraint = {"json_schema": toolfmt.call_schema(tools, parallel)}
    elif mode == "auto":
        constraint = {"grammar": toolfmt.auto_grammar(tools, parallel)}
    if family == "gemma4":
        if mode != "none":
            raise schemas.ParamError("tools", "tool calls with Gemma 4 are rendered by its template but not yet "
                                     "read back by this server; use a Gemma 1/2/3 model or tool_choice='none'")
        return ChatPlan(messages, family, body.tools if body.tools else None, constraint, mode)
    try:
        plain = toolfmt.plain_messages(messages, tools if mode != "none" else None, parallel)
    except GemmaError as e:
        raise schemas.ParamError("messages", str(e)) from None
    return ChatPlan(plain, family, None, constraint, mode)


def chat_message(text: str, finish_reason: str | None, mode: str) -> tuple[dict[str, Any], str | None]:
    """(OpenAI assistant message, finish_reason) for a complete reply: tool_calls when it is a call."""
    calls = toolfmt.parse_calls(text) if mode != "none" and finish_reason == "stop" else None
    if calls:
        return {"role": "assistant", "content": None, "refusal": None,
                "tool_calls": [c.openai() for c in calls]}, "tool_calls"
    return {"role": "assistant", "content": text, "refusal": None}, finish_reason


class CallStream:
    """Turns one streamed reply into delta dicts: content as it comes, unless the reply starts like a tool call
    ('{' or '['), which is held back and sent as OpenAI's tool_calls deltas once complete."""

    def __init__(self, mode: str) -> None:
        self.mode, self.held, self.decided = mode, "", mode == "none"
        self.calling = mode == "required"

    def feed(self, text: str) -> Iterable[dict[str, Any]]:
        if self.calling:
            self.held += text
            return
        if not self.decided:
            self.held += text
            head = self.held.lstrip()
            if not head:
                return
            self.decided, self.calling = True, head[0] in "{["
            if self.calling:
                return
            text, self.held = self.held, ""
        if text:
            yield {"content": text}

    def finish(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        """The closing deltas and the finish reason."""
        if not self.calling and not self.decided and self.held:
            return [{"content": self.held}], reason
        calls = toolfmt.parse_calls(self.held) if self.calling and reason == "stop" else None
        if not calls:
            return ([{"content": self.held}] if self.held else []), reason
        deltas = []
        for i, c in enumerate(calls):
            call = c.openai()
            deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": {"name": c.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]}}]})
        return deltas, "tool_calls"
