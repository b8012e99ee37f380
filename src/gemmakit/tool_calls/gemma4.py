"""Gemma 4's native function calls: the grammar that constrains them, and the reader that turns them into OpenAI
tool calls as they are generated.

The official chat template (chat_templates/gemma4.py) writes a model's calls as

    <|tool_call>call:NAME{key:value,...}<tool_call|>[<|tool_call>...<tool_call|>]<|tool_response>

with keys bare and sorted case-insensitively (jinja's dictsort), strings between two <|"|> tokens with nothing
escaped, numbers as Python's str(), true/false, None for null, nested {k:v} and [a,b] alike; generation ends at
<|tool_response>, where the caller runs the tools (Gemma 4's generation_config lists it among its stop ids, with
<eos> and <turn|>). `call_grammar()` compiles each tool's JSON Schema into a Lark grammar (llguidance's dialect,
special tokens as <[id]>) of exactly that text, so a call always names a declared tool with valid arguments, and
what the model writes is what the template renders when the call comes back in the history: the follow-up turn is
token for token the template's. Numbers are held to forms that survive that round trip (no exponent, no trailing
zeros, at most 15 digits on either side of the point); bounded numbers use llguidance's JSON number grammar.

Generated text drops control tokens (the <|"|> quotes among them), so `CallReader` reads calls from token ids:
reasoning (<|channel>...<channel|>), content, and each call's name and arguments, the arguments translated to
JSON text as they arrive (`ArgsJson`), for streaming.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..chat_templates import gemma4 as g4
from ..chat_templates.reasoning import unlabel
from ..errors import GemmaError
from .calls import MAX_CALLS, CallLog, ReplyDelta, ToolCall, merged

INT = r"0|-?[1-9][0-9]{0,18}"
FRACTION = r"\.(0|[0-9]{0,14}[1-9])"
NUMBER = rf"0|-?[1-9][0-9]{{0,14}}({FRACTION})?|-?0{FRACTION}"  # what str(float or int) writes, 15 digits a side
KEY = r"[A-Za-z_][A-Za-z0-9_.\-]*"  # keys of objects whose schema lists no properties
_IGNORED = {"title", "description", "default", "examples", "format", "$schema", "$id", "$comment", "deprecated",
            "readOnly", "writeOnly", "nullable", "$defs", "definitions", "additionalProperties", "strict"}
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_HANDLED = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required", "items",
            "minItems", "maxItems", "pattern", "minLength", "maxLength", *_BOUNDS}
_BAD_KEY = re.compile(r"[\s:,{}\[\]]")


@dataclass(frozen=True)
class Markers:
    """The ids of Gemma 4's function-calling and channel tokens in one tokenizer."""

    call: int
    call_end: int
    response: int
    quote: int
    channel: int
    channel_end: int

    @classmethod
    def of(cls, tokenizer: Any) -> Markers:
        names = (g4.CALL, g4.CALL_END, g4.RESPONSE, g4.QUOTE, g4.CHANNEL, g4.CHANNEL_END)
        ids = [tokenizer.token_id(n) for n in names]
        missing = [n for n, i in zip(names, ids, strict=True) if i is None]
        if missing:
            raise GemmaError(f"this tokenizer has no {', '.join(missing)} token(s), which Gemma 4's function calls "
                             "need; use the tokenizer that came with the model")
        return cls(*ids)


# ---- JSON Schema -> Lark over Gemma 4's argument syntax ------------------------------------------------------


class _Rules:
    """Lark rules for values in Gemma 4's argument syntax, one per schema node (named r0, r1, ...)."""

    def __init__(self, quote: int, root: Mapping[str, Any], where: str, prefix: str) -> None:
        self.q, self.root, self.where, self.prefix = f"<[{quote}]>", root, where, prefix
        self.rules: list[str] = []
        self.refs: dict[str, str] = {}
        self.any: str | None = None

    def add(self, body: str) -> str:
        name, at = self.reserve()
        self.rules[at] = f"{name}: {body}"
        return name

    def reserve(self) -> tuple[str, int]:
        self.rules.append("")
        return f"{self.prefix}r{len(self.rules) - 1}", len(self.rules) - 1

    def terminal(self, body: str) -> str:
        """A named terminal (uppercase): where regexes are intersected with `&`."""
        name = f"{self.prefix.upper()}S{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def value(self, schema: Any) -> str:
        """The rule for values valid under `schema`."""
        if schema is True or schema == {}:
            return self.anything()
        if not isinstance(schema, Mapping):
            raise GemmaError(f"{self.where}: a schema must be an object or true, got {schema!r}")
        unknown = sorted(k for k in schema if k not in _HANDLED and k not in _IGNORED)
        if unknown:
            raise GemmaError(f"{self.where}: JSON Schema keyword(s) {', '.join(unknown)} are not supported for "
                             "Gemma 4's native calls; describe the constraint in the description instead")
        body = self._body(schema)
        if schema.get("nullable") is True:
            body = f'{body} | "None"'
        return self.add(body)

    def _body(self, s: Mapping[str, Any]) -> str:
        if "$ref" in s:
            return self.ref(s["$ref"])
        if "const" in s:
            return self.literal(s["const"])
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise GemmaError(f"{self.where}: 'enum' must be a non-empty list")
            return " | ".join(self.literal(v) for v in s["enum"])
        for key in ("anyOf", "oneOf"):
            if key in s:
                rest = {k: v for k, v in s.items() if k != key}
                return " | ".join(self.value({**rest, **branch} if isinstance(branch, Mapping) else branch)
                                  for branch in _list(s[key], key, self.where))
        if "allOf" in s:
            parts = _list(s["allOf"], "allOf", self.where)
            if len(parts) != 1:
                raise GemmaError(f"{self.where}: 'allOf' with more than one schema is not supported here")
            return self.value({**{k: v for k, v in s.items() if k != "allOf"}, **parts[0]})
        kind = s.get("type")
        if isinstance(kind, list):
            return " | ".join(self.value({**s, "type": k}) for k in kind)
        if kind is None:
            kind = "object" if "properties" in s else "array" if "items" in s else None
            if kind is None:
                return self.anything()
        return self._typed(kind, s)

    def _typed(self, kind: str, s: Mapping[str, Any]) -> str:
        if kind == "string":
            return f"{self.q} {self.string(s)} {self.q}"
        if kind in ("integer", "number"):
            bounds = {k: s[k] for k in _BOUNDS if k in s}
            if bounds:  # llguidance's JSON numbers, bounds included (JSON's number text is Gemma 4's)
                return f"%json {json.dumps({'type': kind, **bounds})}"
            return f"/{INT if kind == 'integer' else NUMBER}/"
        if kind == "boolean":
            return '"true" | "false"'
        if kind == "null":
            return '"None"'
        if kind == "array":
            return self.array(s)
        if kind == "object":
            return self.object(s)
        raise GemmaError(f"{self.where}: unknown JSON Schema type {kind!r}")

    def ref(self, ref: Any) -> str:
        if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
            raise GemmaError(f"{self.where}: only local references '#/$defs/NAME' are supported, got {ref!r}")
        if ref not in self.refs:
            section, _, name = ref[2:].partition("/")
            target = self.root.get(section, {}).get(name) if isinstance(self.root.get(section), Mapping) else None
            if target is None:
                raise GemmaError(f"{self.where}: the reference {ref!r} names no definition")
            self.refs[ref], at = self.reserve()  # recursive schemas refer to the rule being built
            self.rules[at] = f"{self.refs[ref]}: {self.value(target)}"
        return self.refs[ref]

    def literal(self, v: Any) -> str:
        """A constant value as the template's format_argument writes it."""
        if isinstance(v, str):
            return f"{self.q} {_lark_str(v)} {self.q}" if v else f"{self.q} {self.q}"
        if isinstance(v, bool):
            return '"true"' if v else '"false"'
        if v is None:
            return '"None"'
        if isinstance(v, int | float):
            return _lark_str(str(v))
        if isinstance(v, Mapping):
            items = [f"{_lark_str(f'{k}:')} {self.literal(x)}" for k, x in g4._dictsort(v)]
            return '"{" ' + ' "," '.join(items) + ' "}"' if items else '"{}"'
        if isinstance(v, list):
            items = [self.literal(x) for x in v]
            return '"[" ' + ' "," '.join(items) + ' "]"' if items else '"[]"'
        raise GemmaError(f"{self.where}: cannot write the constant {v!r}")

    def array(self, s: Mapping[str, Any]) -> str:
        if "prefixItems" in s:
            raise GemmaError(f"{self.where}: 'prefixItems' is not supported for Gemma 4's native calls")
        item = self.value(s.get("items", True))
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if not isinstance(lo, int) or lo < 0 or hi is not None and (not isinstance(hi, int) or hi < lo):
            raise GemmaError(f"{self.where}: minItems/maxItems must be integers with 0 <= minItems <= maxItems")
        if hi == 0:
            return '"[]"'
        more = f"{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
        inner = f'{item} ("," {item}){more}'
        return f'"[" {inner} "]"' if lo else f'"[" ({inner})? "]"'

    def object(self, s: Mapping[str, Any]) -> str:
        props = s.get("properties")
        if props is None:  # a map: any keys (sorted is up to the model), values under additionalProperties
            extra = s.get("additionalProperties", True)
            value = self.anything() if extra is True or extra == {} else self.value(extra)
            return f'"{{" (/{KEY}/ ":" {value} ("," /{KEY}/ ":" {value})*)? "}}"'
        if not isinstance(props, Mapping):
            raise GemmaError(f"{self.where}: 'properties' must be an object")
        required = set(s.get("required", ()))
        keys = [k for k, _ in g4._dictsort(props)]
        for k in keys:
            if not isinstance(k, str) or not k or _BAD_KEY.search(k):
                raise GemmaError(f"{self.where}: property name {k!r} cannot be written as a bare Gemma 4 key "
                                 "(no spaces, ':', ',', brackets or braces)")
        missing = required - set(keys)
        if missing:
            raise GemmaError(f"{self.where}: required names {sorted(missing)} are not among the properties")
        pairs = [f"{_lark_str(k + ':')} {self.value(props[k])}" for k in keys]
        return f'"{{" {self._members(pairs, [k in required for k in keys])} "}}"'

    def _members(self, pairs: list[str], required: list[bool]) -> str:
        """Members in order, the optional ones skippable, commas only between written ones: rest_i continues
        after a written member, first_i starts the object (linear in the number of properties)."""
        rest: str | None = None
        first: str | None = None
        for pair, req in zip(reversed(pairs), reversed(required), strict=True):
            tail = f" {rest}" if rest else ""
            new_rest = self.add(f'"," {pair}{tail}' if req else f'("," {pair})?{tail}')
            first = self.add(f"{pair}{tail}" if req or first is None else f"{pair}{tail} | {first}")
            rest = new_rest
        if first is None:
            return ""
        return first if any(required) else f"{first}?"

    def string(self, s: Mapping[str, Any]) -> str:
        """The text between the quotes: JSON Schema's pattern (searched for, as JSON Schema says, unless anchored
        with ^...$), minLength/maxLength; formats are not enforced."""
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        if not isinstance(lo, int) or lo < 0 or hi is not None and (not isinstance(hi, int) or hi < lo):
            raise GemmaError(f"{self.where}: minLength/maxLength must be integers, 0 <= minLength <= maxLength")
        length = "*" if (lo, hi) == (0, None) else f"{{{lo},{'' if hi is None else hi}}}"
        pattern = s.get("pattern")
        if pattern is None:
            return f"/(?s:.){length}/"
        if not isinstance(pattern, str):
            raise GemmaError(f"{self.where}: 'pattern' must be a string")
        from llguidance import regex_to_lark

        start, end = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
        core = regex_to_lark(pattern[int(start) : len(pattern) - int(end)], "dw")
        regex = f"/{'' if start else '(?s:.*)'}(?:{core}){'' if end else '(?s:.*)'}/"
        return regex if length == "*" else self.terminal(f"{regex} & /(?s:.){length}/")

    def anything(self) -> str:
        """Any value (a schema of `true` or `{}`)."""
        if self.any is None:
            self.any, at = self.reserve()
            obj = f'"{{" (/{KEY}/ ":" {self.any} ("," /{KEY}/ ":" {self.any})*)? "}}"'
            arr = f'"[" ({self.any} ("," {self.any})*)? "]"'
            self.rules[at] = (f'{self.any}: {self.q} /(?s:.*)/ {self.q} | /{NUMBER}/ | "true" | "false" | "None" '
                              f"| {obj} | {arr}")
        return self.any


def _list(value: Any, key: str, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise GemmaError(f"{where}: '{key}' must be a non-empty list of schemas")
    return value


def _lark_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def call_grammar(tools: Sequence[Mapping[str, Any]], markers: Markers, *, required: bool, parallel: bool,
                 thinking: bool) -> str:
    """Lark (llguidance) for a Gemma 4 reply to a request with `tools` (calls.checked_tools' shape): a call, or
    `parallel` calls (up to MAX_CALLS), of those tools followed by <|tool_response>; unless `required`, plain text
    instead, or text and then calls. With `thinking`, a thought channel may come first."""
    lines, names = [], []
    for i, tool in enumerate(tools):
        rules = _Rules(markers.quote, tool["parameters"], f"tools[{i}].function.parameters", f"t{i}_")
        args = rules.value(tool["parameters"])
        lines += rules.rules
        names.append(f"{_lark_str(tool['name'])} {args}")
    m = markers
    calls = f"call{{1,{MAX_CALLS}}}" if parallel else "call"
    body = f"calls <[{m.response}]>" if required else f"(TEXT | TEXT? calls <[{m.response}]>)"
    head = [f"start: {'thought? ' if thinking else ''}{body}",
            f"thought: <[{m.channel}]> /(?s:.*)/ <[{m.channel_end}]>",
            f"calls: {calls}",
            f'call: <[{m.call}]> "call:" ({" | ".join(names)}) <[{m.call_end}]>',
            "TEXT: /(?s:.+)/"]
    return "\n".join(head + lines) + "\n"


# ---- reading calls back ----------------------------------------------------------------------------------------


class ArgsJson:
    """Gemma 4's argument syntax -> JSON text, as it arrives: `text(piece)` for plain text, `quote()` for each
    <|"|> token; each returns the JSON text it completes. The output is what json.dumps writes for the same value
    (", " and ": " separators, strings escaped, None as null), so the pieces join into the call's `arguments`."""

    def __init__(self) -> None:
        self.stack: list[str] = []  # "{" or "[" per open container
        self.state = "value"  # value | first (after "[" or "{") | key | quoted_key | key_end | string | scalar | after
        self.buf = ""  # a key or bare scalar being read

    @property
    def done(self) -> bool:
        return self.state == "after" and not self.stack

    def quote(self) -> str:
        if self.state == "string":
            self.state = "after"
            return '"'
        if self.state == "first" and self.stack[-1] == "{" or self.state == "key" and not self.buf:
            self.state = "quoted_key"  # a key written as a string (the template's escape_keys form)
            return ""
        if self.state == "quoted_key":
            self.state = "key_end"
            return ""
        if self.state in ("value", "first"):
            self.state = "string"
            return '"'
        raise GemmaError(f"unexpected <|\"|> in a Gemma 4 call's arguments (while reading a {self.state})")

    def text(self, piece: str) -> str:
        if self.state == "string":
            return json.dumps(piece, ensure_ascii=False)[1:-1]
        return "".join(self._char(c) for c in piece)

    def _char(self, c: str) -> str:
        state = self.state
        if state in ("key", "quoted_key"):
            if c == ":" and state == "key":
                return self._key()
            self.buf += c
            return ""
        if state == "key_end":
            return self._key() if c == ":" else ""
        if state == "scalar":
            if c not in ",}]":
                self.buf += c
                return ""
            out, self.buf, self.state = _scalar(self.buf), "", "after"
            return out + self._char(c)
        if state == "first":
            if c in "}]":
                return self._close(c)
            if self.stack[-1] == "{":
                self.state, self.buf = "key", c
                return ""
            state = self.state = "value"
        if state == "value":
            if c in "{[":
                self.stack.append(c)
                self.state = "first"
                return c
            self.state, self.buf = "scalar", c
            return ""
        if state == "after":
            if c == ",":
                self.state = "key" if self.stack and self.stack[-1] == "{" else "value"
                return ", "
            if c in "}]":
                return self._close(c)
        if c.isspace():
            return ""
        raise GemmaError(f"unexpected {c!r} in a Gemma 4 call's arguments")

    def _key(self) -> str:
        key, self.buf, self.state = self.buf, "", "value"
        return json.dumps(key, ensure_ascii=False) + ": "

    def _close(self, c: str) -> str:
        if not self.stack or {"{": "}", "[": "]"}[self.stack[-1]] != c:
            raise GemmaError(f"unbalanced {c!r} in a Gemma 4 call's arguments")
        self.stack.pop()
        self.state = "after"
        return c


def _scalar(text: str) -> str:
    """A bare value as JSON: true/false, None (the template's null) as null, numbers as written."""
    text = text.strip()
    if text in ("true", "false"):
        return text
    if text in ("None", "null"):
        return "null"
    try:
        float(text)
    except ValueError:
        return json.dumps(text, ensure_ascii=False)  # not produced under the grammar; kept as a string
    return text


class CallReader:
    """Reads a Gemma 4 reply from its token ids as it is generated: reasoning (<|channel>thought\\n...<channel|>),
    content, and <|tool_call>call:NAME{...}<tool_call|> calls, as ReplyDeltas (calls.py). Every call's first
    delta (id, name) goes out when its name is complete, then its arguments as JSON text, piece by piece."""

    def __init__(self, tokenizer: Any, markers: Markers) -> None:
        from ..tokenizer import StreamDecoder

        self.tok, self.m = tokenizer, markers
        self.decoder = StreamDecoder(tokenizer)
        self.mode = "content"  # content | reasoning | call | done
        self.label: str | None = None  # reasoning held back while it may still be the "thought\n" label
        self.log = CallLog()
        self.header = ""  # "call:NAME" until its "{"
        self.args: ArgsJson | None = None

    def feed(self, text: str, ids: Sequence[int]) -> list[ReplyDelta]:
        """The deltas of newly generated tokens (`text` is the engine's text of them, unused: it lacks markers)."""
        out: list[ReplyDelta | None] = []
        for t in ids:
            if t in self.tok.special_ids:
                self._text(self.decoder.flush(), out)
                self._marker(t, out)
            else:
                self._text(self.decoder.push(t), out)
        return merged(out)

    def finish(self, reason: str) -> tuple[list[ReplyDelta], str]:
        out: list[ReplyDelta | None] = []
        self._text(self.decoder.flush(), out)
        if self.mode == "reasoning" and self.label:
            out.append(ReplyDelta(reasoning=self.label))
        return merged(out), self.log.finish_reason(reason)

    def calls(self) -> list[ToolCall]:
        return self.log.calls()

    def _marker(self, t: int, out: list[ReplyDelta | None]) -> None:
        m = self.m
        if t == m.channel and self.mode == "content":
            self.mode, self.label = "reasoning", ""
        elif t == m.channel_end and self.mode == "reasoning":
            if self.label:
                out.append(ReplyDelta(reasoning=self.label))
            self.mode, self.label = "content", None
        elif t == m.call and self.mode == "content":
            self.mode, self.header, self.args = "call", "", None
        elif t == m.quote and self.mode == "call" and self.args is not None:
            out.append(self.log.add(self.args.quote()))
        elif t == m.call_end and self.mode == "call":
            if self.args is not None and self.args.done:
                self.log.close()
            self.mode = "content"
        elif t == m.response:
            self.mode = "done"

    def _text(self, piece: str, out: list[ReplyDelta | None]) -> None:
        if not piece or self.mode == "done":
            return
        if self.mode == "content":
            out.append(ReplyDelta(content=piece))
        elif self.mode == "reasoning":
            self.label, piece = unlabel(self.label, piece)
            out.append(ReplyDelta(reasoning=piece))
        elif self.args is not None:
            out.append(self.log.add(self.args.text(piece)))
        else:
            self.header += piece
            if "{" in self.header:
                name, _, rest = self.header.partition("{")
                out.append(self.log.open(name.removeprefix("call:")))
                self.args = ArgsJson()
                out.append(self.log.add(self.args.text("{" + rest)))
