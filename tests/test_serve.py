"""The OpenAI-compatible server, live: a real uvicorn server on a free loopback port, driven by the official
`openai` client and by raw HTTP. Most tests serve tiny random models (paired with the real tokenizer) so they are
fast; a few serve the real embedded model. Outputs are checked token-exactly against Model.chat / generate.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch

from gemmakit import Model
from gemmakit import chat_templates as ct
from gemmakit.model import Gemma
from helpers import tiny_config

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def tiny_model(tokenizer, family: str = "gemma3", seed: int = 0, **overrides) -> Model:
    """A random tiny model over the real tokenizer's vocabulary: fast, deterministic, and its text is real pieces."""
    torch.manual_seed(seed)
    module = Gemma(tiny_config(family, **{"vocab_size": tokenizer.vocab_size, **overrides})).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in name else 0.2)
    return Model(module, tokenizer, f"tiny-{family}", "hf")


@contextmanager
def running_server(models: dict, **kwargs):
    """(base URL, app) of a live server for `models`; shut down, engines included, afterwards."""
    import uvicorn

    from gemmakit.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(models, **kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def models(embedded_model):
    tok = embedded_model.tokenizer
    return {"tiny": tiny_model(tok), "tiny2": tiny_model(tok, "gemma2", seed=1), "real": embedded_model}


@pytest.fixture(scope="module")
def server(models):
    with running_server(models, max_batch=8, max_queue=32, context=256) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def engine(server, name="tiny"):
    return server[1].state.engines[name]


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response, parsed ([DONE] kept as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


# ---- basics -----------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert sorted(m.id for m in client.models.list()) == ["real", "tiny", "tiny2"]
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["models"]["tiny"]["context"] == 256


def test_chat_equals_model_chat(client, models):
    res = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    ref = models["tiny"].chat(MESSAGES, 12)
    choice = res.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert res.usage.prompt_tokens == len(ct.encode(models["tiny"].tokenizer, MESSAGES))
    assert res.usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-") and res.model == "tiny"


def test_several_models_by_name(client, models):
    for name in ("tiny", "tiny2"):
        res = client.chat.completions.create(
            model=name, messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert res.choices[0].message.content == models[name].chat(MESSAGES, 10, ignore_eos=True).text
    a, b = (
        client.completions.create(
            model=n, prompt="Hi", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        for n in ("tiny", "tiny2")
    )
    assert a.choices[0].text != b.choices[0].text


def test_completions_text_and_token_prompts(client, models):
    tiny = models["tiny"]
    res = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    ref = tiny.generate("Once upon a time", 10)
    assert res.choices[0].text == ref.text and res.object == "text_completion"
    assert res.usage.prompt_tokens == ref.prompt_tokens
    ids = tiny.tokenizer.encode("Once upon a time")
    res2 = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert res2.choices[0].text == ref.text
    batch = client.completions.create(
        model="tiny", prompt=["Once upon a time", "Paris"], max_tokens=6, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[1].text == tiny.generate("Paris", 6).text
    echo = client.completions.create(model="tiny", prompt="Paris", max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == "Paris" + batch.choices[1].text


def test_default_completion_length_is_16(client):
    res = client.completions.create(model="tiny", prompt="Hello", extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == 16 and res.choices[0].finish_reason == "length"


# ---- streaming --------------------------------------------------------------------------------------


def test_chat_stream_is_openai_shaped(server, client):
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in chunks[:-1])
    final = chunks[-2]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert text == full.choices[0].message.content
    assert usage["usage"]["completion_tokens"] == full.usage.completion_tokens


def test_stream_with_openai_client(client, models):
    stream = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    pieces, finish = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    ref = models["tiny"].generate("Once upon a time", 10)
    assert "".join(pieces) == ref.text and finish == ref.finish_reason


# ---- sampling controls ------------------------------------------------------------------------------


def test_seed_repeats_and_equals_model_sampling(client, models):
    kw = dict(
        model="tiny",
        messages=MESSAGES,
        max_tokens=16,
        temperature=1.0,
        top_p=0.9,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    c = client.chat.completions.create(**{**kw, "seed": 6}).choices[0].message.content
    assert a == b and a != c
    assert a == models["tiny"].chat(MESSAGES, 16, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True).text


def test_n_choices(client, models):
    res = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=8,
        n=3,
        temperature=1.0,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in res.choices] == [0, 1, 2]
    for j, choice in enumerate(res.choices):  # choice j is sampled with seed + j
        assert (
            choice.message.content
            == models["tiny"].chat(MESSAGES, 8, temperature=1.0, seed=11 + j, ignore_eos=True).text
        )
    assert res.usage.completion_tokens == 24
    assert len({c.message.content for c in res.choices}) > 1


def test_stop_strings_on_the_real_model(client, models):
    prompt = "The three primary colours are"
    full = (
        client.completions.create(model="real", prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    )
    assert full == models["real"].generate(prompt, 16).text
    stop = full.split()[2]
    res = client.completions.create(
        model="real", prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "zzz"]
    )
    assert res.choices[0].finish_reason == "stop"
    assert stop not in res.choices[0].text and full.startswith(res.choices[0].text)
    streamed = client.completions.create(
        model="real", prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == res.choices[0].text


def test_logprobs_are_the_models(client, models):
    tiny = models["tiny"]
    res = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = res.choices[0].logprobs.content
    assert len(content) == 4
    ids = ct.encode(tiny.tokenizer, MESSAGES)
    expected = torch.log_softmax(tiny.logits(ids)[-1], -1)
    first = content[0]
    assert first.logprob == pytest.approx(expected.max().item(), abs=1e-4)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(
        expected.topk(3).values.tolist(), abs=1e-4
    )
    assert first.top_logprobs[0].logprob == first.logprob  # greedy: the sampled token is the most likely
    comp = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_logit_bias_and_penalties(client, models):
    """Greedy with logit_bias + OpenAI's frequency/presence penalties equals the formula applied by hand:
    logits + bias - count * frequency_penalty - (count > 0) * presence_penalty."""
    tiny = models["tiny"]
    x = tiny.tokenizer.encode("x", bos=False)[0]
    res = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=5,
        temperature=0,
        logit_bias={str(x): 100},
        extra_body={"ignore_eos": True},
    )
    assert res.choices[0].text == "xxxxx"
    ids = tiny.tokenizer.encode("Hello")
    first = tiny.logits(ids)[-1]
    bias = float(first.max() - first[x]) + 0.5  # x wins the first step, but penalties must make it lose later
    counts = torch.zeros(tiny.config.vocab_size)
    out = []
    for _ in range(6):
        scores = tiny.logits(ids + out)[-1].clone()
        scores[x] += bias
        scores -= counts * 0.8 + (counts > 0).float() * 1.0
        out.append(int(scores.argmax()))
        counts[out[-1]] += 1
    res = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        logit_bias={str(x): bias},
        frequency_penalty=0.8,
        presence_penalty=1.0,
        extra_body={"ignore_eos": True},
    )
    assert out[0] == x and out.count(x) < 6
    assert res.choices[0].text == tiny.tokenizer.decode(out)


def test_json_object_mode(client, models):
    """Constrained output always stays a JSON prefix (text a random model would never write) and, once the object
    closes, stops; the real model finishes a whole object."""
    kw = dict(
        model="tiny", messages=[{"role": "user", "content": "JSON please"}], max_tokens=40, temperature=1.0
    )
    for seed in range(3):
        res = client.chat.completions.create(**kw, seed=seed, response_format={"type": "json_object"})
        text = res.choices[0].message.content
        assert text.startswith("{"), text
        if res.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
    messages = [{"role": "user", "content": 'Describe a cat as JSON with keys "name" and "age".'}]
    res = client.chat.completions.create(
        model="real", messages=messages, max_tokens=48, temperature=0, response_format={"type": "json_object"}
    )
    assert res.choices[0].finish_reason == "stop", res.choices[0].message.content
    assert isinstance(json.loads(res.choices[0].message.content), dict)


# ---- concurrency ------------------------------------------------------------------------------------


def test_eight_concurrent_streams_are_batched_and_exact(server, client, models):
    prompts = [f"Story {i}: the {w}" for i, w in enumerate("cat dog owl fox bee elk yak ant".split())]

    def run(p):
        stream = client.completions.create(
            model="tiny", prompt=p, max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        return "".join(c.choices[0].text for c in stream)

    eng = engine(server)
    eng.peak_batch = 0
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(run, prompts))
    assert texts == [models["tiny"].generate(p, 24, ignore_eos=True).text for p in prompts]
    assert eng.peak_batch >= 4  # the streams were decoded together, not one after another


def test_concurrent_chats_on_the_real_model(server, client, models):
    questions = ["What is 2+2?", "Name a fruit.", "Say hello.", "What colour is grass?"]

    def run(q):
        return (
            client.chat.completions.create(
                model="real", messages=[{"role": "user", "content": q}], max_tokens=8, temperature=0
            )
            .choices[0]
            .message.content
        )

    eng = engine(server, "real")
    eng.peak_batch = 0
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(run, questions))
    assert texts == [models["real"].chat([{"role": "user", "content": q}], 8).text for q in questions]
    assert eng.peak_batch >= 2


def test_client_disconnect_stops_generation(server):
    eng = engine(server)
    before = eng.tokens_generated
    body = {
        "model": "tiny",
        "prompt": "Hello",
        "max_tokens": 240,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
    _wait_until(lambda: eng.active == 0)
    generated = eng.tokens_generated - before
    time.sleep(0.3)
    assert eng.tokens_generated - before == generated < 240  # stopped, and stays stopped
    # the same for a non-streaming request: close the socket before the answer
    before = eng.tokens_generated
    with socket.create_connection(("127.0.0.1", int(server[0].rsplit(":", 1)[1]))) as s:
        payload = json.dumps({**body, "stream": False}).encode()
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        _wait_until(lambda: eng.active == 1)
        at_close = eng.tokens_generated - before
    _wait_until(lambda: eng.active == 0)
    assert eng.tokens_generated - before < 240, at_close


def _wait_until(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_full_queue_answers_429_with_retry_after(models):
    slow = {"slow": tiny_model(models["tiny"].tokenizer, max_position_embeddings=8192)}
    with running_server(slow, max_batch=1, max_queue=1, context=8192) as (url, app):
        eng = app.state.engines["slow"]
        body = {
            "model": "slow",
            "prompt": "Hello",
            "max_tokens": 8000,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as first:
                lines = first.iter_lines()  # (keep a reference: a collected iterator closes the stream)
                next(lines)  # running, in the only row
                with http.stream("POST", "/v1/completions", json=body) as second:
                    assert second.status_code == 200
                    _wait_until(lambda: eng.queued == 1)  # waiting for the row
                    third = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=10)
                    assert third.status_code == 429 and third.headers["retry-after"] == "1"
                    assert third.json()["error"]["code"] == "queue_full"
        _wait_until(lambda: eng.active == 0 and eng.queued == 0)
        assert httpx.get(url + "/health").status_code == 200


# ---- bad input --------------------------------------------------------------------------------------

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, None),
    ({**CHAT, "model": "nope"}, 404, "model", "model_not_found"),
    ({"messages": CHAT["messages"]}, 400, "model", None),
    ({**CHAT, "max_tokens": "5"}, 400, "max_tokens", None),
    ({**CHAT, "max_tokens": -3}, 400, "max_tokens", None),
    ({**CHAT, "max_tokens": 10**9}, 400, "max_tokens", "context_length_exceeded"),
    ({**CHAT, "max_completion_tokens": -1}, 400, "max_completion_tokens", None),
    ({**CHAT, "messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages", "context_length_exceeded"),
    ({**CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "messages", None),
    ({**CHAT, "messages": "hi"}, 400, "messages", None),
    ({**CHAT, "messages": []}, 400, "messages", None),
    ({**CHAT, "temperature": 3}, 400, "temperature", None),
    ({**CHAT, "temperature": "hot"}, 400, "temperature", None),
    ({**CHAT, "top_p": -0.1}, 400, "top_p", None),
    ({**CHAT, "n": 0}, 400, "n", None),
    ({**CHAT, "stream": "yes"}, 400, "stream", None),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f g"}}]}, 400, "tools", None),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {}}}, 400, "response_format", None),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     400, "response_format", None),
    ({**CHAT, "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    ({**CHAT, "top_logprobs": 3}, 400, "top_logprobs", None),
    ({**CHAT, "frobnicate": 1}, 400, "frobnicate", None),
])  # fmt: skip
def test_bad_chat_requests(server, body, status, param, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server[0] + "/v1/chat/completions", headers={"Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code
    assert "Traceback" not in r.text


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": [1, 10**7]}, "prompt"),
    ({"model": "tiny", "prompt": [1, "a"]}, "prompt"),
    ({"model": "tiny", "prompt": "hi", "suffix": "x"}, "suffix"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"model": "tiny", "prompt": "hi", "best_of": 3}, "best_of"),
])  # fmt: skip
def test_bad_completion_requests(server, body, param):
    r = httpx.post(server[0] + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_unknown_routes_and_methods(server):
    r = httpx.get(server[0] + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server[0] + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="alternate"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "x"}])


def test_server_survives_bad_input(server, client):
    for _ in range(3):
        httpx.post(server[0] + "/v1/chat/completions", content=b"\xff\xfe garbage")
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_api_key(models):
    with running_server({"tiny": models["tiny"]}, api_key="s3cret", context=128) as (url, _):
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
