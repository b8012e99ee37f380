"""Structured output and tools for the server: response_format and tools/tool_choice turned into a prompt and a
constraint, and the model's reply turned back into OpenAI's message, tool_calls and stream deltas.

- `response_format` {"type": "json_object"} constrains the reply to a JSON object; {"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}} to the schema (always enforced, whatever `strict` says).
- `tools`, `tool_choice` and `parallel_tool_calls` go through tool_calls/, the plan Model.chat uses too: the prompt
  (Gemma 4's native function-calling tokens; Gemma 1/2/3 the documented prompt format of tool_calls/gemma3_json.py), the grammar of
  the calls (each function's JSON Schema), and a reader of the reply. "none" leaves the reply free text.
- The reply is read as it is generated (Gemma 4's from its token ids, since text drops control tokens): streamed,
  each call goes out as OpenAI does, a delta with its id, type and name, then its arguments' JSON text piece by
  piece; not streamed, the message is those deltas joined, so both give the same call. A reply with complete calls
  ends with finish_reason "tool_calls".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import tool_calls
from ..errors import GemmaError
from ..tool_calls.calls import ReplyDelta
from . import schemas


@dataclass
class ChatPlan:
    """How one chat request is rendered, constrained and read back."""

    messages: list[dict[str, Any]]  # as the request gave them
    tools: tool_calls.ToolPlan  # family, tool mode, thinking
    constraint: dict[str, Any] = field(default_factory=dict)  # keyword arguments of Model.constraint()

    @property
    def family(self) -> str:
        return self.tools.family

    @property
    def mode(self) -> str:
        return self.tools.mode

    @property
    def thinking(self) -> bool:
        return self.tools.thinking

    def encode(self, tokenizer: Any) -> list[int]:
        return self.tools.encode(tokenizer, self.messages)


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


def plan_chat(body: schemas.ChatRequest, tokenizer: Any, thinking: bool = False) -> ChatPlan:
    """The prompt, constraint and tool mode of a chat request (ParamError, a 400, for bad tools or formats).
    `thinking` is the server's default of Gemma 4's thinking mode for requests that do not choose."""
    from ..chat_templates import template_for

    family = template_for(tokenizer)
    think = body.thinking(thinking and family == "gemma4")
    if think and family != "gemma4":
        raise schemas.ParamError("chat_template_kwargs", f"the model `{body.model}` has no thinking mode (a Gemma 4 "
                                 "chat template option)")
    constraint = response_constraint(body)
    try:
        tools = tool_calls.plan(tokenizer, body.tools, body.tool_choice, parallel=body.parallel_tool_calls is not False,
                             thinking=think)
    except GemmaError as e:
        param = "tool_choice" if not body.tools else "tools"
        raise schemas.ParamError(param, str(e)) from None
    if tools.mode != "none":
        if constraint:
            raise schemas.ParamError("response_format", "response_format cannot be combined with tools; the reply "
                                     "is either a tool call or text in that format (use tool_choice='none')")
        if body.stops():  # as Model.chat: a stop string inside a call's arguments would cut the call
            raise schemas.ParamError("stop", "stop strings cannot be combined with tools: the reply ends at the end "
                                     "of the turn or after its tool calls, and a stop string inside a call's "
                                     "arguments would cut the call; drop 'stop' or use tool_choice='none'")
        constraint = tools.constraint(tokenizer)
    return ChatPlan([dict(m) for m in body.messages], tools, constraint)


def reader(plan: ChatPlan, tokenizer: Any) -> tool_calls.ReplyReader:
    """A reader of one choice's reply: the plan's tool-call reader, or plain text (and Gemma 4's reasoning as the
    engine split it) when no calls are read back."""
    return plan.tools.reader(tokenizer) or _TextReader()


class _TextReader:
    """A reply read as the engine delivers it: its text is content (calls are not read back)."""

    def feed(self, text: str, ids: Sequence[int]) -> list[ReplyDelta]:
        return [ReplyDelta(content=text)] if text else []

    def finish(self, reason: str) -> tuple[list[ReplyDelta], str]:
        return [], reason

    def calls(self) -> list:
        return []


def deltas(reader: tool_calls.ReplyReader, text: str, reasoning: str, ids: Sequence[int], finish: str | None,
           tool_mode: str) -> tuple[list[ReplyDelta], str | None]:
    """The reply deltas of one engine event, and the choice's finish reason once it ends. A tool-call reader
    reads reasoning from the ids itself; otherwise the engine's reasoning comes first."""
    out: list[ReplyDelta] = [] if tool_mode != "none" or not reasoning else [ReplyDelta(reasoning=reasoning)]
    out += reader.feed(text, ids)
    if finish is not None:
        closing, finish = reader.finish(finish)
        out += closing
    return out, finish


def openai_delta(d: ReplyDelta) -> dict[str, Any]:
    """A reply delta as OpenAI's chat.completion.chunk delta (reasoning_content as llama.cpp's server sends it)."""
    if d.call is not None:
        return {"tool_calls": [d.call.openai()]}
    return {"reasoning_content": d.reasoning} if d.reasoning else {"content": d.content}


def chat_message(reply: Sequence[ReplyDelta]) -> dict[str, Any]:
    """The OpenAI assistant message of a whole reply: its deltas joined, as OpenAI's clients join a stream."""
    reasoning, content, calls = tool_calls.assemble(reply)
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else ""), "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if reasoning:  # Gemma 4's thinking, as llama.cpp's server returns it
        message["reasoning_content"] = reasoning
    return message
