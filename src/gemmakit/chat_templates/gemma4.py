"""Gemma 4's chat template (native system turn, thinking mode, function calling); its reasoning is reasoning.py's.

The reference is Google's official Gemma 4 chat template, the `chat_template.jinja` of the instruction-tuned E2B/E4B
checkpoints (the revision that also takes OpenAI-style `tool` messages), 17466 bytes, md5
8c34cf93c7a7815b3fdb300a009c4c17. Found as: the `tokenizer.chat_template` of a Gemma 4 family GGUF, quoted verbatim
with line numbers in LocalAI's Gemma 4 renderer, and as "the REAL Gemma4 (E4B) chat template" in NVIDIA
Megatron's SFT tokenizer; the text rebuilt from it has that md5 (tests/data/gemma4_chat_template.jinja, which the
tests render with transformers' jinja environment). Older revisions are llama.cpp's models/templates/gemma4.jinja.
Each function below names the template macro or lines it mirrors, quirks included (a missing closing brace when a
schema has no "type", sorted keys, "None" for null), so the prompt is the template's token for token.

    <bos><|turn>system\\n[<|think|>\\n]{system}[<|tool>declaration:...<tool|>...]<turn|>\\n
    <|turn>user\\n{text}<turn|>\\n
    <|turn>model\\n[<|tool_call>call:f{k:v}<tool_call|>[<|tool_response>response:f{...}<tool_response|>]]{text}<turn|>\\n
    <|turn>model\\n[<|channel>thought\\n<channel|>]          <- generation prompt; the empty thought when thinking is off

Strings inside declarations, calls and responses are quoted with the <|"|> token. Only the template's own markers
become control tokens; all message text (and every value quoted inside <|"|>) is plain text, so it cannot forge one.
Deviations, each a refusal or a documented normalisation rather than a different prompt: a `tool` message with no
assistant `tool_calls` before it (the template drops it silently) and non-text content parts are refused; OpenAI's
JSON-string `arguments` are decoded to an object first, as vLLM and llama.cpp do before templating.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import GemmaError
from .messages import texts

BOS, TURN, TURN_END, THINK = "<bos>", "<|turn>", "<turn|>", "<|think|>"
CHANNEL, CHANNEL_END, THOUGHT = "<|channel>", "<channel|>", "thought\n"
TOOL, TOOL_END, CALL, CALL_END = "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>"
RESPONSE, RESPONSE_END, QUOTE = "<|tool_response>", "<tool_response|>", '<|"|>'
ROLES = ("system", "developer", "user", "assistant", "tool")
_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")
_UNDEF: Any = object()  # a missing key: renders as "" and is false, like jinja's Undefined

Message = Mapping[str, Any]


class _Out:
    """The prompt as (text, is_control_marker) pieces; adjacent text pieces merge (tokenized as one, like HF)."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, bool]] = []

    def text(self, s: str) -> None:
        if s:
            if self.parts and not self.parts[-1][1]:
                self.parts[-1] = (self.parts[-1][0] + s, False)
            else:
                self.parts.append((s, False))

    def mark(self, s: str) -> None:
        self.parts.append((s, True))

    def quoted(self, s: str) -> None:
        self.mark(QUOTE)
        self.text(s)
        self.mark(QUOTE)


# ---- jinja value semantics ---------------------------------------------------------------------------------


def _get(obj: Any, key: str) -> Any:
    return obj.get(key, _UNDEF) if isinstance(obj, Mapping) else _UNDEF


def _s(v: Any) -> str:
    """`{{ v }}`: str(), "" for a missing value."""
    return "" if v is _UNDEF else str(v)


def _true(v: Any) -> bool:
    return v is not _UNDEF and bool(v)


def _dictsort(m: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """jinja's dictsort: by key, ignoring case, stable."""
    return sorted(m.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def strip_thinking(text: str) -> str:
    """Macro strip_thinking: drop every <|channel>...<channel|> block of an earlier reply, then trim."""
    return "".join(p.split(CHANNEL)[0] if CHANNEL in p else p for p in text.split(CHANNEL_END)).strip()


# ---- function-calling syntax (macros format_argument, format_parameters, format_function_declaration) ---------


def _argument(out: _Out, v: Any, escape_keys: bool = True) -> None:
    """Macro format_argument: strings quoted with <|"|>, true/false, {k:v} with sorted keys, [a,b], else str()."""
    if isinstance(v, str):
        out.quoted(v)
    elif isinstance(v, bool):
        out.text("true" if v else "false")
    elif isinstance(v, Mapping):
        out.text("{")
        for i, (k, x) in enumerate(_dictsort(v)):
            out.text("," if i else "")
            out.quoted(k) if escape_keys else out.text(str(k))
            out.text(":")
            _argument(out, x, escape_keys)
        out.text("}")
    elif isinstance(v, Sequence):
        out.text("[")
        for i, x in enumerate(v):
            out.text("," if i else "")
            _argument(out, x, escape_keys)
        out.text("]")
    else:
        out.text(_s(v))


def _quoted_list(out: _Out, items: Any) -> None:
    for i, x in enumerate(items):
        out.text("," if i else "")
        out.quoted(_s(x))


class _Comma:
    """The template's add_comma: a comma before every field but the first of an object."""

    def __init__(self, out: _Out) -> None:
        self.out, self.on = out, False

    def __call__(self) -> None:
        if self.on:
            self.out.text(",")
        self.on = True


def _parameters(out: _Out, props: Mapping[str, Any], filter_keys: bool = False) -> None:
    """Macro format_parameters (template lines 1-85): one `name:{...}` per property, sorted by name."""
    first = True
    for key, value in _dictsort(props):
        if filter_keys and key in _STANDARD_KEYS:
            continue
        out.text("" if first else ",")
        first = False
        comma = _Comma(out)
        out.text(f"{key}:{{")
        if _true(desc := _get(value, "description")):
            out.text("description:")
            out.quoted(_s(desc))
            comma.on = True
        kind = _s(_get(value, "type")).upper()
        if kind == "STRING" and _true(enum := _get(value, "enum")):
            comma()
            out.text("enum:")
            _argument(out, enum)
        elif kind == "ARRAY" and isinstance(items := _get(value, "items"), Mapping) and items:
            comma()
            out.text("items:{")
            _items(out, items)
            out.text("}")
        if _true(_get(value, "nullable")):
            comma()
            out.text("nullable:true")
        if kind == "OBJECT":
            if isinstance(sub := _get(value, "properties"), Mapping):
                comma()
                out.text("properties:{")
                _parameters(out, sub)
                out.text("}")
            elif isinstance(value, Mapping):
                comma()
                out.text("properties:{")
                _parameters(out, value, filter_keys=True)
                out.text("}")
            if _true(req := _get(value, "required")):
                comma()
                out.text("required:[")
                _quoted_list(out, req)
                out.text("]")
        comma()
        out.text("type:")
        out.quoted(kind)
        out.text("}")


def _items(out: _Out, items: Mapping[str, Any]) -> None:
    """An array's `items` schema (template lines 20-53)."""
    first = True
    for key, value in _dictsort(items):
        if value is None:
            continue
        out.text("" if first else ",")
        first = False
        if key == "properties":
            out.text("properties:{")
            if isinstance(value, Mapping):
                _parameters(out, value)
            out.text("}")
        elif key == "required":
            out.text("required:[")
            _quoted_list(out, value)
            out.text("]")
        elif key == "type":
            out.text("type:")
            _argument(out, value.upper() if isinstance(value, str) else [_s(x).upper() for x in value])
        else:
            out.text(f"{key}:")
            _argument(out, value)


def _declaration(out: _Out, tool: Mapping[str, Any]) -> None:
    """Macro format_function_declaration, inside <|tool>...<tool|>."""
    fn = tool["function"]
    out.text(f"declaration:{fn['name']}{{description:")
    out.quoted(_s(_get(fn, "description")))
    if _true(params := _get(fn, "parameters")):
        out.text(",parameters:{")
        if _true(props := _get(params, "properties")):
            out.text("properties:{")
            _parameters(out, props)
            out.text("},")
        if _true(req := _get(params, "required")):
            out.text("required:[")
            _quoted_list(out, req)
            out.text("],")
        if _true(kind := _get(params, "type")):
            out.text("type:")
            out.quoted(_s(kind).upper())
            out.text("}")  # the template closes "parameters:{" only here
    if "response" in fn:
        resp = fn["response"]
        out.text(",response:{")
        if _true(desc := _get(resp, "description")):
            out.text("description:")
            out.quoted(_s(desc))
            out.text(",")
        if _s(_get(resp, "type")).upper() == "OBJECT":
            out.text("type:")
            out.quoted("OBJECT")
            out.text("}")
    out.text("}")


def _call(out: _Out, fn: Mapping[str, Any]) -> None:
    """<|tool_call>call:NAME{k:v,...}<tool_call|> (template lines 243-260); string arguments go in as they are."""
    out.mark(CALL)
    out.text(f"call:{fn['name']}{{")
    args = fn.get("arguments")
    if isinstance(args, Mapping):
        for i, (k, v) in enumerate(_dictsort(args)):
            out.text(f"{',' if i else ''}{k}:")
            _argument(out, v, escape_keys=False)
    elif isinstance(args, str):
        out.text(args)
    out.text("}")
    out.mark(CALL_END)


def _response(out: _Out, name: str, response: Any) -> None:
    """Macro format_tool_response_block: <|tool_response>response:NAME{...}<tool_response|>."""
    out.mark(RESPONSE)
    out.text(f"response:{name}{{")
    if isinstance(response, Mapping):
        for i, (k, v) in enumerate(_dictsort(response)):
            out.text(f"{',' if i else ''}{k}:")
            _argument(out, v, escape_keys=False)
    else:
        out.text("value:")
        _argument(out, response, escape_keys=False)
    out.text("}")
    out.mark(RESPONSE_END)


# ---- the conversation ----------------------------------------------------------------------------------------


def segments(
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
) -> list[tuple[str, bool]]:
    """The prompt as (text, is_control_marker) pieces, in order (the template's main body, lines 175-363)."""
    msgs = checked_messages(messages)
    tools = checked_tools(tools)
    out, loop, prev = _Out(), msgs, None  # prev: the template's ns.prev_message_type
    out.mark(BOS)
    first_system = bool(msgs) and msgs[0]["role"] in ("system", "developer")
    if thinking or tools or first_system:
        out.mark(TURN)
        out.text("system\n")
        if thinking:
            out.mark(THINK)
            out.text("\n")
        if first_system:
            content = msgs[0]["content"]
            out.text(content.strip() if isinstance(content, str) else "".join(p["text"].strip() + " " for p in content))
            loop = msgs[1:]
        for tool in tools:
            out.mark(TOOL)
            _declaration(out, tool)
            out.mark(TOOL_END)
        out.mark(TURN_END)
        out.text("\n")
    last_user = max((i for i, m in enumerate(loop) if m["role"] == "user"), default=-1)
    for i, m in enumerate(loop):
        if m["role"] != "tool":
            prev = _message(out, loop, i, last_user)
    if add_generation_prompt and prev not in ("tool_response", "tool_call"):
        out.mark(TURN)
        out.text("model\n")
        if not thinking:
            out.mark(CHANNEL)
            out.text(THOUGHT)
            out.mark(CHANNEL_END)
    return out.parts


def _message(out: _Out, loop: Sequence[Message], i: int, last_user: int) -> str | None:
    """One non-tool message with the tool messages that answer its calls; -> the template's prev_message_type."""
    m, prev = loop[i], None
    role = "model" if m["role"] == "assistant" else m["role"]
    before = next((loop[j]["role"] for j in range(i - 1, -1, -1) if loop[j]["role"] != "tool"), None)
    if not (role == "model" and before == "assistant"):  # consecutive assistant messages share one turn
        out.mark(TURN)
        out.text(role + "\n")
    calls = m.get("tool_calls")
    thought = m.get("reasoning") or m.get("reasoning_content")
    if thought and i > last_user and calls:  # reasoning is kept only between the calls of the current turn
        out.mark(CHANNEL)
        out.text(f"{THOUGHT}{thought}\n")
        out.mark(CHANNEL_END)
    for call in calls or ():
        _call(out, call["function"])
        prev = "tool_call"
    answered = False
    if m.get("tool_responses"):
        for r in m["tool_responses"]:
            _response(out, r.get("name", "unknown"), r["response"])
            answered, prev = True, "tool_response"
    elif calls:
        for k in range(i + 1, len(loop)):
            if loop[k]["role"] != "tool":
                break
            _response(out, _tool_name(loop[k], calls, k), "".join(texts(loop[k]["content"], f"messages[{k}]")))
            answered, prev = True, "tool_response"
    text = _content(m.get("content"), role == "model")
    out.text(text)
    if prev == "tool_call" and not answered:
        out.mark(RESPONSE)  # the turn waits for the tool's answer
    elif not (answered and not text.strip()):
        out.mark(TURN_END)
        out.text("\n")
    return prev


def _tool_name(follow: Message, calls: Sequence[Mapping[str, Any]], k: int) -> str:
    """The function a tool message answers: its tool_call_id's call (the last match wins), else its own name."""
    name = follow.get("name")
    for call in calls:
        if call.get("id") == follow.get("tool_call_id"):
            name = call["function"]["name"]
    if not isinstance(name, str):
        raise GemmaError(
            f"messages[{k}] (a tool result) has no tool_call_id matching a call of the assistant message "
            "before it, and no 'name'; give the id of the call it answers"
        )
    return name


def _content(content: Any, model: bool) -> str:
    """captured_content: an assistant's text without earlier thinking, other roles' text trimmed."""
    return "".join(strip_thinking(t) if model else t.strip() for t in texts(content, "message", optional=True))


# ---- validation --------------------------------------------------------------------------------------------


def checked_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Validated copies of the messages; tool-call arguments given as JSON text decoded to objects."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise GemmaError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise GemmaError(f"messages[{i}] must be an object with a 'role'")
        role, where = m["role"], f"messages[{i}]"
        if role not in ROLES:
            raise GemmaError(f"{where} has role {role!r}; Gemma 4 chat takes {', '.join(ROLES)}")
        m = dict(m)
        if m.get("tool_calls"):
            if role != "assistant":
                raise GemmaError(f"{where}: only assistant messages carry tool_calls")
            m["tool_calls"] = [_checked_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(m["tool_calls"])]
        if role == "tool" and not any(x["role"] == "assistant" and x.get("tool_calls") and not x.get("tool_responses")
                                      for x in _block(out)):
            raise GemmaError(f"{where} is a tool result but no assistant message with tool_calls comes before it")
        if "content" not in m and not (role == "assistant" and (m.get("tool_calls") or m.get("tool_responses"))):
            raise GemmaError(f"{where} has no 'content'")
        texts(m.get("content"), where, optional=role == "assistant")  # checks the parts
        for key in ("reasoning", "reasoning_content"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise GemmaError(f"{where}.{key} must be a string")
        if m.get("tool_responses") and not all(isinstance(r, Mapping) and "response" in r for r in m["tool_responses"]):
            raise GemmaError(f"{where}.tool_responses must be a list of {{'name': ..., 'response': ...}} objects")
        out.append(m)
    return out


def _block(previous: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The message before a run of tool messages (the one whose calls they answer), as a 0- or 1-item list."""
    j = len(previous) - 1
    while j >= 0 and previous[j]["role"] == "tool":
        j -= 1
    return previous[j : j + 1] if j >= 0 else []


def _checked_call(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise GemmaError(f"{where} must be {{'function': {{'name': ..., 'arguments': ...}}}}")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            decoded = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            decoded = None
        args = decoded if isinstance(decoded, dict) else args
    elif args is not None and not isinstance(args, Mapping):
        raise GemmaError(f"{where}.function.arguments must be an object or a JSON string")
    return {**call, "function": {**fn, "arguments": args}}


def checked_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """Tool declarations in OpenAI's shape: [{"type": "function", "function": {"name", "description",
    "parameters": JSON Schema}}]."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise GemmaError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GemmaError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise GemmaError(f"tools[{i}].function.parameters must be a JSON Schema object")
        if isinstance(params, Mapping) and _true(props := params.get("properties", _UNDEF)):
            if not isinstance(props, Mapping):
                raise GemmaError(f"tools[{i}].function.parameters.properties must be an object")
    return list(tools)
