"""Gemma 4's native function calls: the grammar built from each tool's JSON Schema accepts exactly what the
official template writes for valid calls (and nothing else), and the reader turns those token ids back into the
same arguments as JSON text, piece by piece. No model here (tests/test_tool_calls.py runs them end to end)."""

from __future__ import annotations

import json

import llguidance as llg
import pytest

from gemma4_tokenizer import gemma4_tokenizer
from gemmakit import GemmaError, tool_calls
from gemmakit.chat_templates import gemma4 as chat_gemma4
from gemmakit.generate import stop_ids
from gemmakit.grammar import compile_grammar, engine_tokenizer
from gemmakit.tool_calls import gemma4 as t4
from gemmakit.tool_calls.calls import checked_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}, "Alpha": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "opts": {"type": "object", "properties": {"deep": {"type": "boolean"},
                                                  "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                 "required": ["deep"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
        "any": {}}}}}  # fmt: skip
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
PET = {"type": "function", "function": {"name": "add_pet", "parameters": {
    "type": "object", "required": ["pet"], "properties": {"pet": {"$ref": "#/$defs/Pet"}},
    "$defs": {"Pet": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "friends": {"type": "array", "items": {"$ref": "#/$defs/Pet"}}}}}}}}  # fmt: skip
GOOD = [
    ("get_weather", {"city": "Paris, \"France\"\n", "unit": "C", "days": 3, "Alpha": -0.25, "tags": ["a", "b c"],
                     "opts": {"deep": True, "note": None}, "code": "FR7", "any": {"x": [1, "y", {"z": False}]}}),
    ("get_weather", {"city": ""}),
    ("get_weather", {"city": "Zürich 🙂", "Alpha": 12.5, "opts": {"deep": False, "note": "n"}}),
    ("now", {}),
    ("add_pet", {"pet": {"name": "Rex", "friends": [{"name": "Tom", "friends": []}]}}),
]
BAD = [
    ("get_weather", {"unit": "C"}),  # city is required
    ("get_weather", {"city": "x", "unit": "K"}),  # not in the enum
    ("get_weather", {"city": "x", "days": 9}),  # above the maximum
    ("get_weather", {"city": "x" * 31}),  # longer than maxLength
    ("get_weather", {"city": "x", "code": "fr7"}),  # pattern
    ("get_weather", {"city": "x", "extra": 1}),  # not a property
    ("get_weather", {"city": "x", "Alpha": "1"}),  # a string for a number
    ("search", {}),  # not a tool
    ("now", {"a": 1}),
]


@pytest.fixture(scope="module")
def tok():
    return gemma4_tokenizer()


@pytest.fixture(scope="module")
def grammar(tok):
    tools = checked_tools([WEATHER, NOW, PET])
    lark = t4.call_grammar(tools, t4.Markers.of(tok), required=False, parallel=True, thinking=True)
    return compile_grammar(lark=lark), engine_tokenizer(tok, tok.vocab_size, [1, 106])


def template_ids(tok, name, args, *, raw_text=None):
    """The ids of <|tool_call>call:NAME{...}<tool_call|> as the official template writes them (chat_gemma4._call)."""
    out = chat_gemma4._Out()
    chat_gemma4._call(out, {"name": name, "arguments": args})
    ids = []
    for text, control in out.parts:
        ids += [tok.token_id(text)] if control else tok.encode(text, bos=False)
    return ids


def accepts(grammar, ids):
    compiled, engine = grammar
    matcher = llg.LLMatcher(engine, compiled.text, log_level=0)
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


def read(tok, ids, one_by_one=True):
    reader = t4.CallReader(tok, t4.Markers.of(tok))
    deltas = []
    for chunk in ([i] for i in ids) if one_by_one else [ids]:
        deltas += reader.feed("", chunk)
    closing, reason = reader.finish("stop")
    return reader, deltas + closing, reason


def test_grammar_accepts_the_templates_calls_and_reads_them_back(tok, grammar):
    ids = [i for name, args in GOOD for i in template_ids(tok, name, args)] + [50]
    assert accepts(grammar, ids)
    reader, deltas, reason = read(tok, ids)
    assert reason == "tool_calls"
    calls = reader.calls()
    assert [(c.name, c.arguments) for c in calls] == GOOD
    for c in calls:  # the arguments text is json.dumps of the value, keys in the template's (sorted) order
        assert c.text == json.dumps(dict(chat_gemma4._dictsort(c.arguments)), ensure_ascii=False)
    first = [d.call for d in deltas if d.call and d.call.id]
    assert [(d.index, d.name, d.arguments) for d in first] == [(i, n, "") for i, (n, _) in enumerate(GOOD)]
    pieces = [d.call.arguments for d in deltas if d.call and d.call.id is None and d.call.index == 0]
    assert len(pieces) > 10 and "".join(pieces) == calls[0].text  # streamed as generated, not in one piece
    _, whole, _ = read(tok, ids, one_by_one=False)
    assert [c["function"] for c in tool_calls.assemble(whole)[2]] == [c.openai()["function"] for c in calls]


@pytest.mark.parametrize("name, args", BAD)
def test_grammar_refuses_invalid_calls(tok, grammar, name, args):
    assert not accepts(grammar, [*template_ids(tok, name, args), 50])


def test_grammar_shapes(tok, grammar):
    call = template_ids(tok, "now", {})
    text = tok.encode("It is noon.", bos=False)
    assert accepts(grammar, text) and accepts(grammar, [*text, *call, 50])  # auto: text, or text then calls
    assert not accepts(grammar, call)  # calls end with <|tool_response>
    thought = [100, *tok.encode("thought\nhm", bos=False), 101]
    assert accepts(grammar, [*thought, *call, 50])
    unsorted = [48, *tok.encode("call:get_weather{unit:", bos=False), 52, *tok.encode("C", bos=False), 52,
                *tok.encode(",city:", bos=False), 52, *tok.encode("x", bos=False), 52, *tok.encode("}", bos=False), 49, 50]
    assert not accepts(grammar, unsorted)  # keys in the template's sorted order only
    for number, ok in (("0.5", True), ("-3", True), ("1.50", False), ("1e3", False), ("01", False), ("-0", False)):
        ids = [48, *tok.encode(f"call:get_weather{{Alpha:{number},city:", bos=False), 52, 52,
               *tok.encode("}", bos=False), 49, 50]
        assert accepts(grammar, ids) == ok, number  # numbers as str() writes them, so they come back unchanged
    tools = checked_tools([WEATHER, NOW])
    markers = t4.Markers.of(tok)
    engine = grammar[1]
    single = compile_grammar(lark=t4.call_grammar(tools, markers, required=True, parallel=False, thinking=False))
    assert accepts((single, engine), [*call, 50])
    assert not accepts((single, engine), [*call, *call, 50]) and not accepts((single, engine), text)
    assert not accepts((single, engine), [*thought, *call, 50])


def test_reasoning_content_and_partial_calls(tok):
    ids = [100, *tok.encode("thought\nLet me see.", bos=False), 101, *tok.encode("Sure.", bos=False),
           *template_ids(tok, "get_weather", {"city": "Oslo"})]
    reader, deltas, reason = read(tok, ids[:-3])  # cut inside the call: no complete call
    assert reason == "stop" and reader.calls() == []
    reasoning, content, calls = tool_calls.assemble(deltas)
    assert (reasoning, content) == ("Let me see.", "Sure.")
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["function"]["arguments"].startswith('{"city"')
    reader, deltas, reason = read(tok, [*ids, 50])
    assert reason == "tool_calls" and reader.calls()[0].arguments == {"city": "Oslo"}


@pytest.mark.parametrize("parameters, match", [
    ({"type": "object", "properties": {"a": {"type": "string", "format": "email", "not": {}}}}, "not"),
    ({"type": "object", "properties": {"a b": {"type": "string"}}}, "bare Gemma 4 key"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "Missing"),
    ({"type": "object", "properties": {"a": {"$ref": "#/properties/b"}, "b": {}}}, "local references"),
    ({"type": "object", "properties": {"a": {"type": "array", "prefixItems": [{}]}}}, "prefixItems"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "not among the properties"),
])  # fmt: skip
def test_schemas_the_call_grammar_cannot_express_are_refused(tok, parameters, match):
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    with pytest.raises(GemmaError, match=match):
        tool_calls.plan(tok, tools, "required")


def test_stop_tokens(tok, embedded_model):
    """Gemma 4 generation ends at <eos>, <turn|> (106) and <|tool_response> (50), as its generation_config says;
    Gemma 1/2/3 tokenizers have no <|tool_response>."""
    from helpers import tiny_config

    cfg = tiny_config("gemma4", vocab_size=tok.vocab_size)
    assert cfg.end_of_turn_id == 106 and tok.token_id("<turn|>") == 106
    assert stop_ids(cfg, tok) == {1, 106, 50}
    assert stop_ids(embedded_model.config, embedded_model.tokenizer) == {1, 106}
