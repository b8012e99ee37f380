"""Function calling for Gemma 1/2/3: the tool prompt format, the grammar of a call, and calls read back from text.

Gemma 1/2/3 have no tool tokens; Google documents function calling for them as a prompt format ("Function calling
with Gemma", https://ai.google.dev/gemma/docs/capabilities/function-calling): the instructions below and the
functions' JSON definitions come before the user's request, and the model answers with a JSON call
`{"name": function name, "parameters": dictionary of argument name and its value}` and no other text. For tool
results we follow Google's agentic guide (https://ai.google.dev/gemma/docs/meme-generator, "Gemma is expecting
to get its result back wrapped with ```tool_output```"): each result goes back as a user turn in a ```tool_output
fence. Parallel calls are a JSON list of such calls. Gemma 4 has native function-calling tokens; its template is
chat_gemma4.py (tools rendered there, not here).

Nothing here trusts the model: when a call is required, the output is constrained (grammar.py) to the schema
`call_schema()` builds, so the name is one of the tools and the parameters validate against that tool's schema.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import GemmaError

INSTRUCTIONS = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the "
    "format of\n{fmt}\nYou SHOULD NOT include any other text in the response if you call a function\n"
)
ONE_CALL = '{"name": function name, "parameters": dictionary of argument name and its value}'
MANY_CALLS = f"[{ONE_CALL}, ...]"
CHOICES = ("auto", "none", "required")
MAX_CALLS = 8  # parallel calls in one reply: a bound, so a small model cannot list calls until the budget ends


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    def openai(self) -> dict[str, Any]:
        """As OpenAI's message.tool_calls[i]: arguments as JSON text."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def checked_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI `tools` validated: [{"type": "function", "function": {"name", "description"?, "parameters"?}}].
    Each parameters schema must itself be a valid JSON Schema of an object (checked by compiling it)."""
    from .grammar import compile_grammar

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


def call_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON Schema of the model's answer when it must call: one call (or a list of calls when parallel) whose
    name is a tool's and whose parameters validate against that tool's schema."""
    one = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
            "properties": {"name": {"const": t["name"]}, "parameters": t["parameters"]}} for t in tools]
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
    consecutive tool results form one user turn of ```tool_output fences."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise GemmaError(f"messages[{i}] must be an object with a 'role'")
        role = m["role"]
        if role == "tool":
            body = _text(m.get("content"), f"messages[{i}]")
            fence = f"```tool_output\n{body}\n```"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + fence
            else:
                out.append({"role": "user", "content": fence, "_tool": True})
        elif role == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": render_calls(m["tool_calls"], parallel)})
        else:
            out.append(dict(m))
    if tools:
        first = next((k for k, m in enumerate(out) if m["role"] == "user"), None)
        if first is None:
            raise GemmaError("the conversation needs a user message before tools can be offered")
        out[first] = {**out[first], "content": prompt_block(tools, parallel) + _text(out[first].get("content"),
                                                                                    f"messages[{first}]")}
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    raise GemmaError(f"{where}.content must be a string or a list of text parts")


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls in a reply, or None when the reply is plain text (it does not start with '{' or '[')."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return None
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                and isinstance(item.get("parameters", {}), dict)):
            return None
        calls.append(ToolCall(item["name"], item.get("parameters", {}), f"call_{uuid.uuid4().hex[:24]}"))
    return calls or None
