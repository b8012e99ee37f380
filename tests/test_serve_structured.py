"""Structured outputs and tools through the official openai client against a live `gemmakit serve` of the real
embedded model (one server for the module): every reply validates with jsonschema."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from test_serve import running_server

ASK = [{"role": "user", "content": "Give me the record as JSON."}]
SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False, "required": ["user"],
               "properties": {"user": {"type": "object", "additionalProperties": False, "required": ["name", "id"],
                                       "properties": {"name": {"type": "string", "maxLength": 16},
                                                      "id": {"type": "integer", "minimum": 0, "maximum": 99999}}}}},
    "array_enum": {"type": "object", "additionalProperties": False, "required": ["colors"],
                   "properties": {"colors": {"type": "array", "minItems": 1, "maxItems": 3,
                                             "items": {"enum": ["red", "green", "blue"]}}}},
    "bounded": {"type": "object", "additionalProperties": False, "required": ["score", "ratio"],
                "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5},
                               "ratio": {"type": "integer", "minimum": -10, "maximum": 10}}},
    "any_of": {"type": "object", "additionalProperties": False, "required": ["value"],
               "properties": {"value": {"anyOf": [{"type": "boolean"}, {"type": "string", "maxLength": 8}]}}},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(embedded_model):
    with running_server({"real": embedded_model}, max_batch=4, context=1024) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300), url


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_replies_validate(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 5, "top_p": 0.95}):
        res = client[0].chat.completions.create(model="real", messages=ASK, max_tokens=80, response_format=fmt, **kw)
        choice = res.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


class Town(BaseModel):
    name: str = Field(max_length=20)
    population: int = Field(ge=0, le=10_000_000)


def test_parse_with_pydantic(client):
    res = client[0].beta.chat.completions.parse(model="real", messages=[{"role": "user", "content": "A town:"}],
                                                max_tokens=60, temperature=0, response_format=Town)
    assert isinstance(res.choices[0].message.parsed, Town)


def _args_ok(call, tools):
    tool = next(t for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_required_and_named_tool_calls_stream_the_same(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [WEATHER, CLOCK]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        res = client[0].chat.completions.create(model="real", messages=ask, tools=tools, tool_choice=choice, parallel_tool_calls=False,
                                                max_tokens=80, temperature=0)
        c = res.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls and c.message.content is None
        for call in c.message.tool_calls:
            _args_ok(call, tools)
        if isinstance(choice, dict):
            assert [t.function.name for t in c.message.tool_calls] == ["get_weather"]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client[0].chat.completions.create(model="real", messages=ask, tools=tools, tool_choice=choice, parallel_tool_calls=False,
                                                   max_tokens=80, temperature=0, stream=True):
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    want = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]
    assert [(s["name"], json.loads(s["arguments"])) for s in calls.values()] == want
    assert all(s["id"].startswith("call_") for s in calls.values())


def test_history_with_tool_results(client):
    history = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3, "sky": "snow"}'},
    ]
    res = client[0].chat.completions.create(model="real", messages=history, tools=[WEATHER], max_tokens=24,
                                            temperature=0, tool_choice="none")
    assert res.choices[0].message.content and res.choices[0].finish_reason in ("stop", "length")
    auto = client[0].chat.completions.create(model="real", messages=history, tools=[WEATHER], max_tokens=40,
                                             temperature=0)
    c = auto.choices[0]
    assert (c.finish_reason == "tool_calls") == bool(c.message.tool_calls)
    for call in c.message.tool_calls or []:
        _args_ok(call, [WEATHER])


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                                         "minimum": "a"}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
                                                                                {"a": {"type": "nope"}}}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
])  # fmt: skip
def test_bad_schemas_and_tools_are_400(client, extra, param):
    r = httpx.post(client[1] + "/v1/chat/completions", json={"model": "real", "messages": ASK, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and "Traceback" not in r.text
