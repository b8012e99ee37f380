"""Constrained decoding (grammar.py) and the Gemma 1/2/3 tool format (tool_calls/gemma3_json.py): masks against brute force over the
whole real vocabulary, the tool prompt text, and the Python API on the embedded model."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from pydantic import BaseModel, Field

from gemmakit import GemmaError
from gemmakit import chat_templates as ct
from gemmakit.grammar import GrammarProcessor, compile_grammar, engine_tokenizer, token_bytes
from gemmakit.tool_calls import gemma3_json as tf
from gemmakit.tool_calls.calls import checked_tools, chosen


@pytest.fixture(scope="module")
def tok(fast_model):
    return fast_model.tokenizer


@pytest.fixture(scope="module")
def engine_tok(fast_model):
    cfg = fast_model.config
    return engine_tokenizer(fast_model.tokenizer, cfg.vocab_size, [cfg.eos_token_id, cfg.end_of_turn_id])


@pytest.fixture(scope="module")
def redundant(tok, by_bytes):
    """Byte-fallback ids of bytes that have a piece of their own: SentencePiece never emits them, and llguidance
    may or may not allow them (complete masks are checked without them; sound masks with them)."""
    return {i for i in range(tok.vocab_size) if tok.is_byte(i) and len(by_bytes[token_bytes(tok, i)]) > 1}


@pytest.fixture(scope="module")
def by_bytes(tok):
    """bytes -> the ids standing for them (control tokens left out: no grammar may produce them)."""
    out: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        if i not in tok.special_ids:
            out.setdefault(token_bytes(tok, i), []).append(i)
    return out


def brute_force(language: set[bytes], prefix: bytes, by_bytes, stops) -> set[int]:
    """Every token whose bytes extend `prefix` towards some string of the finite `language`; stops if complete."""
    rests = {s[len(prefix):] for s in language if s.startswith(prefix)}
    heads = {r[:n] for r in rests for n in range(1, len(r) + 1)}
    allowed = {i for h in heads for i in by_bytes.get(h, [])}
    return allowed | (set(stops) if prefix in language else set())


# Where a grammar forces the next bytes (a literal, a fixed key), llguidance allows only their canonical
# tokenization (SentencePiece's own tokens for them), so there the mask is a subset of the brute-force set; the
# cases marked True branch at every step and must match it exactly.
CASES = [
    (dict(regex=r"(cat|car|dog)s?"), {b"cat", b"car", b"dog", b"cats", b"cars", b"dogs"}, True),
    (dict(json_schema={"enum": ["red", "green", "blue", 7]}), {b'"red"', b'"green"', b'"blue"', b"7"}, True),
    (dict(grammar='start: "yes" | "no" | "maybe so"'), {b"yes", b"no", b"maybe so"}, False),
    (dict(grammar='root ::= "a" ("b" | "bc") "!"'), {b"ab!", b"abc!"}, False),
    (dict(json_schema={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                       "additionalProperties": False}), {b'{"ok": true}', b'{"ok": false}'}, False),
]


@pytest.mark.parametrize("spec, language, exact", CASES)
def test_mask_equals_brute_force(spec, language, exact, tok, engine_tok, by_bytes, redundant):
    """At every prefix along every string of a small finite language, the mask over all 262k tokens is exactly
    the set of tokens that can still lead to a string of the language (and the stop tokens once complete)."""
    g = compile_grammar(**spec)
    stops = sorted(engine_tok.eos_tokens)
    for word in language:
        proc = GrammarProcessor(g, engine_tok, background=False)
        prefix = b""
        for t in [*tok.encode(word.decode(), bos=False), None]:
            got = set(torch.nonzero(proc.allowed()).flatten().tolist())
            want = brute_force(language, prefix, by_bytes, stops)
            assert got <= want, (spec, prefix)  # sound: nothing outside the language, ever
            assert (t if t is not None else stops[0]) in got  # SentencePiece's own next token is always allowed
            if exact:
                assert got - redundant == want - redundant, (spec, prefix)
            if t is not None:
                proc.accept(t)
                prefix += token_bytes(tok, t)
        assert proc.done


def test_processor_masks_logits_and_keeps_odds(engine_tok):
    g = compile_grammar(regex="(yes|no)")
    proc = GrammarProcessor(g, engine_tok)
    logits = torch.randn(engine_tok.vocab_size)
    out = proc.process(logits)
    kept = torch.isfinite(out)
    assert 0 < int(kept.sum()) < 20 and torch.equal(out[kept], logits[kept])


@pytest.mark.parametrize("spec", [
    dict(json_schema={"type": "nope"}), dict(json_schema="{not json"), dict(json_schema=[1]), dict(regex="(("),
    dict(grammar="start: undefined_rule"), dict(), dict(regex="a", grammar="start: \"a\""),
])  # fmt: skip
def test_bad_constraints_are_gemma_errors(spec):
    with pytest.raises(GemmaError) as e:
        compile_grammar(**spec)
    assert "\n" not in str(e.value)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}]


def test_tool_prompt_follows_googles_format():
    tools = checked_tools(TOOLS)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'}]
    text = ct.render(tf.plain_messages(msgs, tools, parallel=False))
    defs = json.dumps(tools, indent=2)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nYou have access to functions. If you decide to invoke any of the "
        "function(s), you MUST put it in the format of\n"
        '{"name": function name, "parameters": dictionary of argument name and its value}\n'
        "You SHOULD NOT include any other text in the response if you call a function\n"
        f"{defs}\n\nWeather in Oslo?<end_of_turn>\n"
        '<start_of_turn>model\n{"name": "get_weather", "parameters": {"city": "Oslo"}}<end_of_turn>\n'
        '<start_of_turn>user\n```tool_output\n{"temp": 3}\n```<end_of_turn>\n<start_of_turn>model\n')
    parallel = ct.render(tf.plain_messages(msgs[1:3], tools, parallel=True))
    assert "[function name" not in parallel and '[{"name": function name' in parallel
    assert '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]' in parallel


def test_call_schema_and_parsing():
    tools = checked_tools([*TOOLS, {"type": "function", "function": {"name": "now"}}])
    mode, only = chosen(tools, {"type": "function", "function": {"name": "now"}})
    assert mode == "required" and [t["name"] for t in only] == ["now"]
    schema = tf.call_schema(tools, parallel=True)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"unit": "C"}}], [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    calls = tf.parse_calls('[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "A"}}]')
    assert [(c.name, c.arguments) for c in calls] == [("now", {}), ("get_weather", {"city": "A"})]
    assert tf.parse_calls("It is sunny.") is None
    for bad in ([{"type": "function", "function": {"name": "a b"}}], [{"type": "x"}], [],
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": {"a": {"type": 3}}}}}]):
        with pytest.raises(GemmaError):
            checked_tools(bad)
    with pytest.raises(GemmaError):
        chosen(tools, {"type": "function", "function": {"name": "missing"}})


class Pet(BaseModel):
    name: str = Field(max_length=12)
    species: str = Field(pattern="^(cat|dog|bird)$")
    age: int = Field(ge=0, le=30)


def test_generate_with_schema_regex_and_grammar(fast_model):
    prompt = "A pet described as JSON:\n"
    r = fast_model.generate(prompt, 60, json_schema=Pet)
    assert r.finish_reason == "stop" and isinstance(r.parsed, Pet) and Pet.model_validate_json(r.text) == r.parsed
    schema = {**Pet.model_json_schema(), "additionalProperties": False}
    for res in fast_model.generate([prompt, "Another pet:"], 60, json_schema=schema, temperature=1.0, seed=2):
        assert res.finish_reason == "stop"
        jsonschema.validate(json.loads(res.text), schema)
        assert res.parsed == json.loads(res.text)
    phone = fast_model.generate("Call me at ", 12, regex=r"\d{3}-\d{4}")
    assert phone.finish_reason == "stop" and len(phone.text) == 8 and phone.text[3] == "-"
    gbnf = 'root ::= answer\nanswer ::= "yes" | "no"'
    assert fast_model.generate("Is water wet? Answer:", 5, grammar=gbnf).text in ("yes", "no")
    streamed = "".join(fast_model.stream(prompt, 60, json_schema=Pet))
    assert streamed == r.text and fast_model.last_result.parsed == r.parsed
    with pytest.raises(GemmaError):
        fast_model.generate(prompt, 8, json_schema=Pet, stop=["}"])


def test_lookup_and_chat_with_a_schema(fast_model):
    """Prompt lookup under a grammar: drafts checked against it, same tokens as plain greedy decoding."""
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string",
              "maxLength": 10}, "maxItems": 4}}, "required": ["items"], "additionalProperties": False}
    prompt = 'Copy: {"items": ["apple", "pear", "plum"]}\nCopy: {"items": ["apple", "pear", "plum"]}\nCopy: '
    plain = fast_model.generate(prompt, 40, json_schema=schema)
    spec = fast_model.generate(prompt, 40, json_schema=schema, lookup=8)
    assert spec.token_ids == plain.token_ids and spec.finish_reason == "stop"
    reply = fast_model.chat([{"role": "user", "content": "List two fruits as JSON."}], 40, json_schema=schema)
    jsonschema.validate(reply.parsed, schema)
