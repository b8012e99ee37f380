"""Gemma 4's thinking through Model.chat, `gemmakit chat`'s session and the server: reasoning kept out of the reply, returned as `.reasoning`,
`message.reasoning_content` and streamed `delta.reasoning_content` (llama.cpp's field names), switched per request
by `chat_template_kwargs.enable_thinking` (vLLM, llama.cpp) or `reasoning_effort` (OpenAI).

The model is a tiny random decoder over the Gemma 4 test vocabulary (gemma4_tokenizer.py) whose embedding rows of
<|channel> and <channel|> are scaled up (the head is tied), so sampled replies often open and close a thought
channel. Which text is reasoning is checked three ways: Model.chat, the server (plain and streamed), and a split
of the generated token ids computed here from the ids alone.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from gemma4_tokenizer import gemma4_tokenizer
from gemmakit import chat_templates as ct
from test_serve import running_server, tiny_model

MESSAGES = [{"role": "system", "content": "Think, then answer."}, {"role": "user", "content": "What is 2+2?"}]
CHANNEL, CHANNEL_END = 100, 101


@pytest.fixture(scope="module")
def model():
    """A tiny random Gemma over the Gemma 4 vocabulary whose untied head rows for <|channel> and <channel|> point
    along its mean final hidden state, scaled to logits near the log-sum-exp of the rest: sampled replies then open
    and close thought channels with text between them."""
    m = tiny_model(gemma4_tokenizer(), seed=3, tie_word_embeddings=False)
    hidden = []
    hook = m.module.model.norm.register_forward_hook(lambda mod, i, o: hidden.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        m.module.lm_head.weight.copy_(m.module.model.embed_tokens.weight)
        m.logits(m.chat_ids(MESSAGES))
        hook.remove()
        h = hidden[0]
        u = h.mean(0)
        m.module.lm_head.weight[[CHANNEL, CHANNEL_END]] = u * (14.0 / (h @ u).mean())
    return m


@pytest.fixture(scope="module")
def seed(model):
    """A sampling seed whose thinking reply has both reasoning and an answer."""
    for s in range(20):
        r = model.chat(MESSAGES, 40, thinking=True, temperature=1.0, seed=s)
        if r.reasoning and r.text.strip():
            return s
    pytest.fail("no seed in 0..19 gave both reasoning and a reply; scale the channel rows differently")


def split_ids(tok, ids):
    """Reasoning and reply from the token ids alone: channel spans, each without its "thought\\n" label."""
    reasoning, reply, span, inside = [], [], [], False
    for t in [*ids, None]:
        if t == (CHANNEL_END if inside else CHANNEL) or t is None:
            text = tok.decode(span)
            if inside:
                reasoning.append(text.removeprefix("thought\n"))
            else:
                reply.append(text)
            span, inside = [], not inside
        else:
            span.append(t)
    return "".join(reasoning), "".join(reply)


def test_model_chat_splits_reasoning(model, seed):
    tok = model.tokenizer
    r = model.chat(MESSAGES, 40, thinking=True, temperature=1.0, seed=seed)
    assert r.prompt_tokens == len(model.chat_ids(MESSAGES, thinking=True))
    assert model.chat_ids(MESSAGES, thinking=True) == ct.encode(tok, MESSAGES, family="gemma4", thinking=True)
    assert CHANNEL in r.token_ids and r.reasoning and r.text
    if not any(tok.is_byte(i) for i in r.token_ids):  # bytes split across a marker decode differently per span
        assert (r.reasoning, r.text) == split_ids(tok, r.token_ids)
    deltas = list(model.chat_deltas(MESSAGES, 40, thinking=True, temperature=1.0, seed=seed))
    assert "".join(d.reasoning for d in deltas) == r.reasoning
    assert "".join(d.content for d in deltas) == r.text
    assert "".join(model.chat_stream(MESSAGES, 40, thinking=True, temperature=1.0, seed=seed)) == r.text


@pytest.fixture(scope="module")
def server(model, embedded_model):
    with running_server({"g4": model, "g3": embedded_model}, context=256) as (url, app):
        yield url


def post(server, body):
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)


def test_server_returns_reasoning_content(server, model, seed):
    expected = model.chat(MESSAGES, 40, thinking=True, temperature=1.0, seed=seed)
    body = {"model": "g4", "messages": MESSAGES, "max_tokens": 40, "temperature": 1.0, "seed": seed}
    on = post(server, {**body, "chat_template_kwargs": {"enable_thinking": True}}).json()
    message = on["choices"][0]["message"]
    assert message["content"] == expected.text and message["reasoning_content"] == expected.reasoning
    assert on["usage"]["prompt_tokens"] == expected.prompt_tokens
    effort = post(server, {**body, "reasoning_effort": "high"}).json()
    assert effort["choices"][0]["message"] == message
    off = post(server, body).json()
    assert off["usage"]["prompt_tokens"] == len(model.chat_ids(MESSAGES))
    none = post(server, {**body, "reasoning_effort": "none"}).json()
    assert none["usage"]["prompt_tokens"] == off["usage"]["prompt_tokens"]


def test_server_streams_reasoning_content(server, model, seed):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    expected = model.chat(MESSAGES, 40, thinking=True, temperature=1.0, seed=seed)
    stream = client.chat.completions.create(model="g4", messages=MESSAGES, max_tokens=40, temperature=1.0,
                                            seed=seed, stream=True, extra_body={"chat_template_kwargs":
                                                                                {"enable_thinking": True}})
    reasoning, content, finish = [], [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        content.append(delta.content or "")
        assert not (delta.content and getattr(delta, "reasoning_content", None))  # one kind per chunk
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(reasoning) == expected.reasoning and "".join(content) == expected.text
    assert finish == expected.finish_reason


def test_server_thinking_default_and_refusals(model, embedded_model):
    body = {"model": "g4", "messages": MESSAGES, "max_tokens": 4}
    with running_server({"g4": model, "g3": embedded_model}, context=256, thinking=True) as (url, _):
        thinking_on = post(url, body).json()
        assert thinking_on["usage"]["prompt_tokens"] == len(model.chat_ids(MESSAGES, thinking=True))
        off = post(url, {**body, "chat_template_kwargs": {"enable_thinking": False}}).json()
        assert off["usage"]["prompt_tokens"] == len(model.chat_ids(MESSAGES))
        g3 = post(url, {**body, "model": "g3"})  # the default applies to Gemma 4 models only
        assert g3.status_code == 200 and "reasoning_content" not in g3.json()["choices"][0]["message"]
        for bad, param in [
            ({"model": "g3", "chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
            ({"model": "g3", "reasoning_effort": "low"}, "chat_template_kwargs"),
            ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs"),
            ({"chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs"),
            ({"reasoning_effort": "max"}, "reasoning_effort"),
        ]:
            r = post(url, {**body, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_chat_session_shows_reasoning_apart(model, seed):
    import io

    from gemmakit.cli.chat import Session

    expected = model.chat(MESSAGES, 40, thinking=True, temperature=1.0, seed=seed)
    session = Session(model, context=256, max_new_tokens=40, sampling={"temperature": 1.0, "seed": seed},
                      system=MESSAGES[0]["content"], thinking=True)
    session.ask(MESSAGES[1]["content"])
    out, thoughts = io.StringIO(), io.StringIO()
    reply, interrupted = session.reply(out, thoughts)
    assert not interrupted and reply == expected.text and thoughts.getvalue() == expected.reasoning
    assert out.getvalue() == "\n\n" + expected.text  # the reply starts below the reasoning
    assert session.history[-1] == {"role": "assistant", "content": expected.text}


def test_chat_thinking_needs_gemma4():
    from typer.testing import CliRunner

    from gemmakit import GemmaError
    from gemmakit.cli import app

    result = CliRunner().invoke(app, ["chat", "--thinking"], input="")  # the embedded Gemma 3 model
    assert isinstance(result.exception, GemmaError) and "no thinking mode" in str(result.exception)
