"""Tool calls end to end, for Gemma 4's native syntax and Gemma 1/2/3's JSON format: `Model.chat(tools=...)`, the
server (openai client, streamed and not), arguments streamed as they are generated, the follow-up turn token for
token the official template's.

The Gemma 4 model is a tiny random decoder over the Gemma 4 test vocabulary whose untied head rows for
<|tool_call>, <|tool_response>, <|"|> and the channel tokens point along its mean final hidden state (as in
test_reasoning.py), so sampled replies call tools, close their strings and think; the grammar does the rest.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from gemma4_tokenizer import TEMPLATE, gemma4_hf_tokenizer, gemma4_tokenizer
from gemmakit import chat_templates as ct
from test_serve import running_server, tiny_model

MESSAGES = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "required": ["city"], "properties": {
                                                "city": {"type": "string", "maxLength": 12},
                                                "unit": {"enum": ["C", "F"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
TOOLS = [WEATHER, NOW]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {}})
           for t in TOOLS}
BOOST = {48: 12.0, 50: 11.0, 52: 4.5, 100: 12.0, 101: 12.0}  # <|tool_call>, <|tool_response>, <|"|>, channels


@pytest.fixture(scope="module")
def g4():
    m = tiny_model(gemma4_tokenizer(), "gemma4", seed=3, tie_word_embeddings=False)
    hidden = []
    hook = m.module.model.norm.register_forward_hook(lambda mod, i, o: hidden.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        m.module.lm_head.weight.copy_(m.module.model.embed_tokens.weight)
        m.logits(m.chat_ids(MESSAGES, tools=TOOLS))
        hook.remove()
        h = hidden[0]
        u = h.mean(0) / (h @ h.mean(0)).mean()
        for token, scale in BOOST.items():
            m.module.lm_head.weight[token] = u * scale
    return m


def sample(model, **kw):
    return model.chat(MESSAGES, 40, tools=TOOLS, temperature=1.0, **kw)


@pytest.fixture(scope="module")
def required(g4):
    """(seed, result, streamed call deltas) of a required reply whose calls end within the budget, the first
    get_weather with a non-empty city."""
    for s in range(12):
        deltas = [d.call for d in g4.chat_deltas(MESSAGES, 40, tools=TOOLS, tool_choice="required", temperature=1.0,
                                                 seed=s) if d.call]
        r = g4.last_result
        if r.finish_reason == "tool_calls" and r.tool_calls[0].name == "get_weather" \
                and r.tool_calls[0].arguments["city"]:
            return s, r, deltas
    pytest.fail("no seed in 0..11 called get_weather with a city; change the boosts")


@pytest.fixture(scope="module")
def seed(required):
    return required[0]


def check_calls(result):
    assert result.finish_reason == "tool_calls" and result.tool_calls
    for c in result.tool_calls:
        jsonschema.validate(c.arguments, SCHEMAS[c.name])
        assert json.loads(c.openai()["function"]["arguments"]) == c.arguments


def test_model_chat_returns_calls_streamed_piece_by_piece(g4, required):
    seed, r, deltas = required
    again = sample(g4, tool_choice="required", seed=seed)  # chat() is chat_deltas() joined
    assert again.token_ids == r.token_ids and [(c.name, c.text) for c in again.tool_calls] == \
        [(c.name, c.text) for c in r.tool_calls]
    check_calls(r)
    assert r.message == {"role": "assistant", "content": None, "tool_calls": [c.openai() for c in r.tool_calls]}
    tok = g4.tokenizer
    assert tok.decode(r.token_ids[:1], special=True) == "<|tool_call>" and 50 not in r.token_ids  # stopped at it
    opening = deltas[0]
    assert (opening.index, opening.name, opening.arguments) == (0, "get_weather", "") and opening.id
    pieces = [d.arguments for d in deltas if d.index == 0 and d.id is None]
    assert len(pieces) >= 3 and "".join(pieces) == r.tool_calls[0].openai()["function"]["arguments"]
    named = sample(g4, tool_choice={"type": "function", "function": {"name": "now"}}, seed=seed)
    check_calls(named)
    assert {c.name for c in named.tool_calls} == {"now"}
    single = sample(g4, tool_choice="required", parallel_tool_calls=False, seed=seed)
    check_calls(single)
    assert len(single.tool_calls) == 1


def test_follow_up_turn_is_the_official_templates(g4, required):
    """The calls go back into the history as OpenAI messages; the next prompt is the official template's, token for
    token, and it spells the calls exactly as the model generated them."""
    tok = g4.tokenizer
    r = required[1]
    results = [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"sky": "clear", "n": i})}
               for i, c in enumerate(r.tool_calls)]
    follow = [*MESSAGES, r.message, *results]
    ids = g4.chat_ids(follow, tools=TOOLS)
    decoded = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in follow]
    hf = gemma4_hf_tokenizer().apply_chat_template(decoded, tools=TOOLS, chat_template=TEMPLATE, tokenize=True,
                                                   add_generation_prompt=True, enable_thinking=False)
    assert ids == (hf if isinstance(hf, list) else hf["input_ids"])
    generated = tok.decode(r.token_ids, special=True)
    assert f"<|turn>model\n{generated}<|tool_response>" in ct.render(follow, family="gemma4", tools=TOOLS)


def test_tool_choice_none_and_auto(g4, seed):
    none = sample(g4, tool_choice="none", seed=seed)
    assert none.tool_calls is None and 48 not in none.token_ids and none.finish_reason in ("stop", "length")
    autos = [g4.chat(MESSAGES, 30, tools=TOOLS, temperature=1.0, seed=s) for s in range(3)]
    called = [r for r in autos if r.finish_reason == "tool_calls"]
    assert called, "with <|tool_call> boosted, some auto reply calls"
    for r in called:
        check_calls(r)


def test_thinking_then_calls(g4):
    for s in range(8):
        r = sample(g4, tool_choice="required", thinking=True, seed=s)
        if r.reasoning:
            check_calls(r)
            assert r.token_ids[0] == 100 and "<|channel>" not in r.text
            return
    pytest.fail("no seed in 0..7 thought before calling")


@pytest.fixture(scope="module")
def server(g4, embedded_model):
    g3 = tiny_model(embedded_model.tokenizer, seed=5, max_position_embeddings=1024)  # Google's tool block is long
    with running_server({"g4": g4, "g3": g3}, context=512) as (url, _):
        yield url


def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def stream_calls(stream):
    """(calls reassembled as the openai SDK's users do, per-call argument chunk counts, finish reason, openers)."""
    calls, chunks, finish, openers = {}, {}, None, []
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for tc in choice.delta.tool_calls or ():
            if tc.id:
                openers.append(tc)
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
            else:
                calls[tc.index]["arguments"] += tc.function.arguments
                chunks[tc.index] = chunks.get(tc.index, 0) + 1
    return [calls[i] for i in sorted(calls)], chunks, finish, openers


@pytest.mark.parametrize("model_name", ["g4", "g3"])
def test_server_streams_arguments_and_matches_the_plain_reply(server, model_name, required, seed):
    c = client(server)
    kw = dict(model=model_name, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0,
              seed=seed, max_tokens=40)
    if model_name == "g3":  # a random model over JSON: one call with arguments, room for its scaffolding
        kw.update(parallel_tool_calls=False, max_tokens=80,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    plain = c.chat.completions.create(**kw).choices[0]
    assert plain.finish_reason == "tool_calls" and plain.message.tool_calls
    calls, chunks, finish, openers = stream_calls(c.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls"
    assert [(x["name"], x["arguments"]) for x in calls] == \
        [(t.function.name, t.function.arguments) for t in plain.message.tool_calls]
    assert all(o.type == "function" and o.function.arguments == "" for o in openers)
    assert max(chunks.values()) >= 3  # the arguments arrive as they are generated
    with c.chat.completions.stream(**kw) as events:  # the SDK's own stream reassembly
        final = events.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(t.id.startswith("call_"), t.function.name, t.function.arguments) for t in final.message.tool_calls] == \
        [(True, t.function.name, t.function.arguments) for t in plain.message.tool_calls]
    for x in calls:
        jsonschema.validate(json.loads(x["arguments"]), SCHEMAS[x["name"]])
    if model_name == "g4":  # the server and Model.chat read the same reply
        r = required[1]
        assert [(x["name"], x["arguments"]) for x in calls] == [(t.name, t.openai()["function"]["arguments"])
                                                                for t in r.tool_calls]


def test_server_tool_choices_and_refusals(server, seed):
    import openai

    c = client(server)
    kw = dict(model="g4", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=30)
    named = c.chat.completions.create(**kw, tool_choice={"type": "function", "function": {"name": "now"}},
                                      parallel_tool_calls=False).choices[0]
    assert [t.function.name for t in named.message.tool_calls] == ["now"]
    none = c.chat.completions.create(**kw, tool_choice="none").choices[0]
    assert none.message.tool_calls is None and none.finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="stop strings"):
        c.chat.completions.create(**kw, stop=["x"])
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "not": {"const": "b"}}}}}}]
    with pytest.raises(openai.BadRequestError, match="not"):
        c.chat.completions.create(**{**kw, "tools": bad})


def test_gemma3_model_chat_calls(fast_model):
    """Gemma 1/2/3 through Model.chat: Google's prompt format, calls as JSON constrained to the schemas; the README's
    agent loop in plain Python."""
    r = fast_model.chat([{"role": "user", "content": "What is the weather in Paris?"}], 60, tools=[WEATHER],
                        tool_choice="required", parallel_tool_calls=False)
    check_calls(r)
    history = [{"role": "user", "content": "What is the weather in Paris?"}, r.message,
               {"role": "tool", "tool_call_id": r.tool_calls[0].id, "content": '{"sky": "clear"}'}]
    final = fast_model.chat(history, 20, tools=[WEATHER], tool_choice="none")
    assert final.tool_calls is None and final.finish_reason in ("stop", "length")
    deltas = [d.call for d in fast_model.chat_deltas(history[:1], 60, tools=[WEATHER], tool_choice="required",
                                                      parallel_tool_calls=False) if d.call]
    assert deltas[0].name == "get_weather" and len(deltas) >= 3
