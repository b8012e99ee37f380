"""Fine-tuning data with tool calls: each chat rendered in its model's own template, as the server renders it at
inference (Gemma 4's native tokens; Gemma 1/2/3's prompt format), the loss on what the model writes only: its
calls, the <|tool_response> that ends them, its answers and end-of-turn markers, never the declarations or the
tools' results."""

from __future__ import annotations

import json

from finetune_helpers import write_jsonl
from gemma4_tokenizer import gemma4_tokenizer
from gemmakit import chat_templates as ct
from gemmakit.tool_calls import gemma3_json as tf
from gemmakit.tool_calls.calls import checked_tools
from gemmakit.train.data import chat_format, load_jsonl

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "3 degrees."}, {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Bye."}]


def trained(tok, ids, train):
    return tok.decode([i for i, t in zip(ids, train, strict=True) if t], special=True)


def test_gemma4_chat_with_tools_in_the_native_format():
    tok = gemma4_tokenizer()
    ids, train = chat_format(tok, "gemma4").render(MESSAGES, TOOLS)
    assert ids == ct.encode(tok, MESSAGES, family="gemma4", tools=TOOLS, add_generation_prompt=False)
    assert trained(tok, ids, train) == ('<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
                                        "<|tool_response>3 degrees.<turn|>Bye.<turn|>")


def test_gemma3_chat_with_tools_in_googles_prompt_format(embedded_model, tmp_path):
    tok = embedded_model.tokenizer
    ids, train = chat_format(tok, "gemma3").render(MESSAGES, TOOLS)
    plain = tf.plain_messages(MESSAGES, checked_tools(TOOLS), True)
    assert ids == ct.encode(tok, plain, add_generation_prompt=False)
    assert trained(tok, ids, train) == ('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]<end_of_turn>'
                                        "3 degrees.<end_of_turn>Bye.<end_of_turn>")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MESSAGES, "tools": TOOLS, "parallel_tool_calls": False},
                                               {"messages": MESSAGES[1:5]}])
    (one, two), stats = load_jsonl(path, tok, "gemma3", max_len=2048)
    assert stats.shapes == {"messages": 2}
    assert trained(tok, one.ids, one.train).startswith(json.dumps({"name": "get_weather",
                                                                   "parameters": {"city": "Oslo"}}))
    assert "You have access to functions" not in trained(tok, one.ids, one.train)
    assert "```tool_output" in tok.decode(two.ids) and "```tool_output" not in trained(tok, two.ids, two.train)
