"""Tool calling for every generation, one plan shared by `Model.chat` and the server: how a request's tools and
tool_choice become a prompt, a constraint and a reader of the reply.

- Gemma 1/2/3 (gemma3_json.py): tools in Google's documented prompt format; calls are JSON, constrained by a JSON Schema
  ("required", a named function) or a Lark grammar of "a call or text" ("auto"); read by gemma3_json.JsonCallReader.
- Gemma 4 (gemma4.py): declarations, calls and results in its own template; calls in its native syntax,
  constrained by a Lark grammar built from each function's JSON Schema, generation stopping at <|tool_response>
  (a stop token of every Gemma 4 generation, see generate.stop_ids); read from token ids by gemma4.CallReader.
- tool_choice "none": Gemma 1/2/3 leave the tools out of the prompt; Gemma 4 keeps the declarations (the history
  may hold calls) and bans <|tool_call>, so the reply is text.

OpenAI's tool_choice: "auto" (the default) lets the model answer or call, "required" makes it call, and
{"type": "function", "function": {"name": ...}} makes it call that function; parallel_tool_calls (default true)
allows up to calls.MAX_CALLS calls in one reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .. import chat_templates
from ..errors import GemmaError
from ..sampling import LogitsProcessor
from . import gemma3_json, gemma4
from .calls import ReplyDelta, ToolCall, checked_tools, chosen


class ReplyReader(Protocol):
    """Turns a reply into ReplyDeltas as it is generated (gemma3_json.JsonCallReader, gemma4.CallReader)."""

    def feed(self, text: str, ids: Sequence[int]) -> list[ReplyDelta]: ...

    def finish(self, reason: str) -> tuple[list[ReplyDelta], str]: ...

    def calls(self) -> list[ToolCall]: ...


@dataclass
class ToolPlan:
    """One request's tools: the mode ("none", "auto", "required"), the tools a call may use, and the declarations
    Gemma 4's template shows."""

    family: str  # the chat template: "gemma4" or "gemma3" (Gemma 1/2/3)
    mode: str = "none"
    tools: list[dict[str, Any]] = field(default_factory=list)  # calls.checked_tools' shape: what a call may use
    declared: list[Mapping[str, Any]] | None = None  # OpenAI tools as given (Gemma 4's declarations)
    parallel: bool = True
    thinking: bool = False

    def messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The conversation for the chat template: Gemma 1/2/3 get tools, calls and results as plain turns."""
        if self.family == "gemma4":
            return [dict(m) for m in messages]
        return gemma3_json.plain_messages(messages, self.tools if self.mode != "none" else None, self.parallel)

    def encode(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt ids (GemmaError for a conversation the template refuses)."""
        return chat_templates.encode(tokenizer, self.messages(messages), family=self.family,
                                    tools=self.declared if self.family == "gemma4" else None,
                                    thinking=self.thinking)

    def constraint(self, tokenizer: Any) -> dict[str, Any]:
        """Model.constraint() arguments for the reply, {} when it is free text."""
        if self.mode == "none":
            return {}
        if self.family == "gemma4":
            return {"lark": gemma4.call_grammar(self.tools, gemma4.Markers.of(tokenizer),
                                                      required=self.mode == "required", parallel=self.parallel,
                                                      thinking=self.thinking)}
        if self.mode == "required":
            return {"json_schema": gemma3_json.call_schema(self.tools, self.parallel)}
        return {"lark": gemma3_json.auto_grammar(self.tools, self.parallel)}

    def banned(self, tokenizer: Any) -> list[int]:
        """Token ids the reply may not contain: Gemma 4's <|tool_call> when tools are declared but not to be used."""
        if self.family == "gemma4" and self.mode == "none" and self.declared:
            return [gemma4.Markers.of(tokenizer).call]
        return []

    def reader(self, tokenizer: Any) -> ReplyReader | None:
        """A fresh reader of one reply, or None when calls are not read back (mode "none")."""
        if self.mode == "none":
            return None
        if self.family == "gemma4":
            return gemma4.CallReader(tokenizer, gemma4.Markers.of(tokenizer))
        return gemma3_json.JsonCallReader(self.mode)


def plan(tokenizer: Any, tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any = None, *,
         parallel: bool = True, thinking: bool = False) -> ToolPlan:
    """The ToolPlan of a request; GemmaError for bad tools or tool_choice (the tool schemas are compiled once
    here, so a schema the grammar cannot express fails before anything is generated)."""
    family = chat_templates.template_for(tokenizer)
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise GemmaError("tool_choice needs 'tools' to choose from")
        return ToolPlan(family, thinking=thinking)
    checked = checked_tools(tools)
    mode, usable = chosen(checked, tool_choice)
    out = ToolPlan(family, mode, usable, list(tools) if family == "gemma4" else None, parallel, thinking)
    if family == "gemma4":
        out.constraint(tokenizer)  # a schema Gemma 4's argument grammar cannot express: GemmaError now
    return out


class BanTokens(LogitsProcessor):
    """Forbids a few token ids in every step (e.g. Gemma 4's <|tool_call> with tool_choice "none")."""

    stage = "mask"

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = torch.tensor(list(ids), dtype=torch.long)

    def process(self, logits: Tensor) -> Tensor:
        return logits.index_fill(0, self.ids.to(logits.device), float("-inf"))


def assemble(deltas: Sequence[ReplyDelta]) -> tuple[str, str, list[dict[str, Any]]]:
    """(reasoning, content, OpenAI tool_calls) of a whole reply from its deltas, joined as OpenAI's clients join a
    stream: so a non-streamed reply is exactly what its stream reassembles to (a call cut short stays partial)."""
    calls: list[dict[str, Any]] = []
    for d in deltas:
        if d.call is None:
            continue
        if d.call.id is not None:
            calls.append({"id": d.call.id, "type": "function",
                          "function": {"name": d.call.name, "arguments": d.call.arguments}})
        else:
            calls[d.call.index]["function"]["arguments"] += d.call.arguments
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas), calls
