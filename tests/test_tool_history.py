"""A user turn right after a tool result (issue 24): user -> assistant with tool_calls -> tool -> user. Gemma 1/2/3
render tool results in the user's turn, so the results and the user's next message merge into one user turn, in
order; OpenAI and other servers accept such a history, and so do Model.chat and the server."""

from __future__ import annotations

import httpx

from test_serve import running_server, tiny_model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
    {"role": "user", "content": "And is that warm?"},
]


def _text(model, messages, **kw) -> str:
    return model.tokenizer.decode(model.chat_ids(messages, **kw), special=True)


def test_user_after_tool_result_joins_its_turn(embedded_model):
    text = _text(embedded_model, HISTORY, tools=TOOLS)
    turn = '<start_of_turn>user\n```tool_output\n{"temp": 20}\n```\n\nAnd is that warm?<end_of_turn>\n'
    assert text.endswith(turn + "<start_of_turn>model\n"), text
    assert text.count("<start_of_turn>user") == 2
    # two results, then the user: one turn, in order; without tools offered any more the history still renders
    two = [*HISTORY[:3], {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}, HISTORY[3]]
    assert "```tool_output\nsunny\n```\n\nAnd is that warm?<end_of_turn>" in _text(embedded_model, two, tools=TOOLS)
    assert text.count("<start_of_turn>user") == _text(embedded_model, two).count("<start_of_turn>user")


def test_server_accepts_a_user_turn_after_a_tool_result(embedded_model):
    tiny = tiny_model(embedded_model.tokenizer)
    with running_server({"tiny": tiny}, context=512) as (url, _):
        body = {"model": "tiny", "messages": HISTORY, "tools": TOOLS, "max_tokens": 4}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(url + "/v1/chat/completions", json={**body, "tools": None}, timeout=60)
        assert r.status_code == 200, r.text
