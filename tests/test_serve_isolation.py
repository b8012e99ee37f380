"""One bad request never hurts the others (issue 24), tested the way it broke.

- The engine: a sequence that fails while it starts (its sampler, its processors), while its token is chosen or
  while its processors advance ends alone with an error event; a long sequence decoding beside it finishes intact.
- The server: a long streaming request runs while hostile requests of every class arrive (seeds beyond 64 bits,
  unusable floats, lone surrogates, deep nesting, integers of thousands of digits, more sequences than the queue);
  each gets a 4xx JSON answer within seconds, the long one ends token-exactly as Model.generate, the server is up.
- Odd but valid requests get OpenAI's answers: temperature 1e-300 and top_p 0 are greedy, max_tokens 0 an empty
  completion with usage; CORS preflights and HEAD requests are answered.
"""

from __future__ import annotations

import copy
import json
import queue
import time

import httpx
import pytest

from gemmakit import Model
from gemmakit.sampling import LogitsProcessor, SamplingParams
from gemmakit.serve.engine import Engine, Event, Job, wait_idle
from test_serve import running_server, sse_events, tiny_model

LONG = 200  # tokens of the long request: it must still be decoding while the bad requests arrive
STEP_S = 0.015  # each forward of the served model waits this long, so the long request lasts >= 3 s at any load


@pytest.fixture(scope="module")
def tiny(embedded_model):
    return tiny_model(embedded_model.tokenizer, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def slow(tiny):
    """`tiny`'s weights, each forward pass STEP_S longer: a long request that surely outlives the bad ones."""
    module = copy.deepcopy(tiny.module)
    module.register_forward_pre_hook(lambda *_: time.sleep(STEP_S))
    return Model(module, tiny.tokenizer, "slow-tiny", "hf")


class Boom(LogitsProcessor):
    """Raises in one hook (after `after` tokens for process/accept): a bug in a sequence's own code."""

    def __init__(self, where: str, after: int = 0) -> None:
        self.where, self.after, self.seen = where, after, 0

    def begin(self, prompt):
        if self.where == "begin":
            raise ValueError("begin failed")

    def process(self, logits):
        if self.where == "process" and self.seen >= self.after:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return logits

    def accept(self, token):
        self.seen += 1
        if self.where == "accept" and self.seen > self.after:
            raise KeyError("detokenizer state")


def _job(prompt, n, **kw):
    events: queue.Queue[Event] = queue.Queue()
    return Job(prompt, n, sink=events.put, **kw), events


def _drain(events: queue.Queue, timeout: float = 60.0) -> tuple[list[int], Event]:
    """The ids a job produced and its last event (finished or failed)."""
    ids, end = [], time.monotonic() + timeout
    while True:
        ev = events.get(timeout=max(0.0, end - time.monotonic()))
        ids += ev.ids
        if ev.finish_reason is not None or ev.error is not None:
            return ids, ev


def _unchecked(**fields) -> SamplingParams:
    """Parameters that slipped past validation (as seed 2**64 once did): the engine must still isolate them."""
    params = SamplingParams(temperature=1.0)
    for k, v in fields.items():
        object.__setattr__(params, k, v)
    return params


def test_a_failing_sequence_ends_alone(tiny, slow):
    prompt = tiny.encode("Once upon a time")
    ref = tiny.generate(prompt, 80, ignore_eos=True).token_ids
    engine = Engine(slow, max_batch=4, max_queue=16, context=512)
    engine.start()
    try:
        long, long_events = _job(prompt, 80, ignore_eos=True)
        engine.submit([long])
        first = long_events.get(timeout=30)
        bad = [
            _job(prompt, 20, params=_unchecked(seed=2**64)),  # the sampler cannot start
            _job(prompt, 20, params=_unchecked(temperature=float("nan"))),  # sampling fails
            _job(prompt, 20, processors=[Boom("begin")]),
            _job(prompt, 20, processors=[Boom("process", after=3)]),  # fails mid-way, in the batched decode
            _job(prompt, 20, processors=[Boom("accept", after=5)]),
        ]
        for job, _ in bad:
            engine.submit([job])
        for _, events in bad:
            _, last = _drain(events)
            assert last.error is not None and last.error.startswith("internal error while generating"), last
        good, good_events = _job(prompt, 12, ignore_eos=True)  # the engine still takes work
        engine.submit([good])
        assert _drain(good_events)[0] == ref[:12]
        ids, last = _drain(long_events)
        assert first.ids + ids == ref and last.finish_reason == "length" and last.error is None
        assert wait_idle(engine) and engine.active == 0 and engine.alive
    finally:
        engine.stop()


def test_requests_larger_than_the_queue_and_zero_tokens(tiny):
    engine = Engine(tiny, max_batch=2, max_queue=4, context=128)
    jobs = [_job([2, 100], 4)[0] for _ in range(5)]
    with pytest.raises(Exception, match="--max-queue"):
        engine.submit(jobs)
    empty, events = _job([2, 100], 0)
    engine.submit([empty])  # finished at once, without the engine thread
    ev = events.get(timeout=1)
    assert (ev.text, ev.finish_reason, ev.completion_tokens) == ("", "length", 0) and engine.queued == 0


# ---- the server under hostile requests -------------------------------------------------------------------

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMP = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
DIGITS = "9" * 5000


def _raw(template: str, **values: str) -> bytes:
    """A JSON body spelled by hand (what json.dumps will not write: NaN, escapes of lone surrogates, ...)."""
    return template.format(**values).encode()


HOSTILE = [  # (path, body, the param the error must name or None)
    # integers: seeds to 64 bits (seed + n - 1 too), thousands of digits
    ("chat", {**CHAT, "seed": 2**64}, "seed"),
    ("chat", {**CHAT, "seed": -(2**63) - 1}, "seed"),
    ("chat", {**CHAT, "seed": 2**64 - 1, "n": 2}, "seed"),
    ("completions", {**COMP, "seed": 10**30}, "seed"),
    (
        "chat",
        _raw(
            '{{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": {d}}}',
            d=DIGITS,
        ),
        None,
    ),
    ("completions", _raw('{{"model": "tiny", "prompt": "hi", "seed": {d}}}', d=DIGITS), None),
    ("chat", {**CHAT, "logit_bias": {"1" * 5000: 1}}, "logit_bias"),
    ("chat", {**CHAT, "max_tokens": 10**40}, "max_tokens"),
    # floats: finite and usable
    (
        "chat",
        _raw('{{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}], "temperature": NaN}}'),
        None,
    ),
    ("completions", _raw('{{"model": "tiny", "prompt": "hi", "top_p": Infinity}}'), None),
    ("completions", _raw('{{"model": "tiny", "prompt": "hi", "frequency_penalty": -Infinity}}'), None),
    ("chat", {**CHAT, "repetition_penalty": 1e-300}, "repetition_penalty"),
    ("chat", {**CHAT, "repetition_penalty": 1e300}, "repetition_penalty"),
    ("chat", {**CHAT, "temperature": 1e300}, "temperature"),
    ("chat", _raw('{{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}], "temperature": 1e400}}'),
     "temperature"),
    ("chat", _raw('{{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}], "tools": [{{"type": '
                  '"function", "function": {{"name": "f", "parameters": {{"type": "number", "maximum": 1e400}}}}}}]}}'),
     "tools"),
    ("chat", {**CHAT, "logit_bias": {"5": 1e300}}, "logit_bias"),
    # text that does not encode: lone surrogates anywhere
    (
        "chat",
        _raw('{{"model": "tiny", "messages": [{{"role": "user", "content": "a\\ud800b"}}]}}'),
        "messages",
    ),
    ("completions", _raw('{{"model": "tiny", "prompt": "a\\udc00b"}}'), "prompt"),
    ("completions", _raw('{{"model": "tiny", "prompt": ["ok", "\\udfff"]}}'), "prompt"),
    (
        "chat",
        _raw('{{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}], "stop": ["\\ud800"]}}'),
        "stop",
    ),
    ("chat", _raw('{{"model": "ti\\ud800ny", "messages": [{{"role": "user", "content": "hi"}}]}}'), "model"),
    (
        "chat",
        _raw('{{"model": "tiny", "messages": [{{"role": "user", "content": "hi", "\\ud800": 1}}]}}'),
        "messages",
    ),
    # nesting: deeper than the parser's stack, and deeper than MAX_DEPTH
    ("chat", _raw('{{"model": "tiny", "messages": {deep}}}', deep="[" * 10000 + "]" * 10000), None),
    (
        "chat",
        {**CHAT, "messages": [{"role": "user", "content": json.loads("[" * 150 + "]" * 150)}]},
        "messages",
    ),
    (
        "chat",
        {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": json.loads('{"a":' * 200 + "1" + "}" * 200)},
            },
        },
        "response_format",
    ),
    # more sequences than the queue can ever hold: a 400 naming --max-queue, never a 429 retried forever
    ("completions", {**COMP, "prompt": ["a"] * 100}, None),
    ("completions", {**COMP, "prompt": ["a", "b"], "n": 16}, None),
    # tools that must call with a stop string: refused, not a silent "stop" without the call
    (
        "chat",
        {
            **CHAT,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "required",
            "stop": ["}"],
        },
        "stop",
    ),
]


@pytest.fixture(scope="module")
def server(slow):
    with running_server(
        {"tiny": slow}, max_batch=4, max_queue=16, context=1024, cors_origins=["http://app.example"]
    ) as (url, app):
        yield url, app


def _post(url: str, path: str, body) -> httpx.Response:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(
        f"{url}/v1/{'chat/completions' if path == 'chat' else path}",
        headers={"Content-Type": "application/json"},
        timeout=10,
        **kw,
    )


def test_hostile_requests_get_4xx_while_a_long_stream_runs(server, tiny):
    url, app = server
    eng = app.state.engines["tiny"]
    ref = tiny.generate("Once upon a time", LONG, ignore_eos=True)
    body = {
        "model": "tiny",
        "prompt": "Once upon a time",
        "max_tokens": LONG,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as long:
        lines = long.iter_lines()
        first = next(lines)  # decoding has begun
        for path, bad, param in HOSTILE:
            t0 = time.monotonic()
            r = _post(url, path, bad)
            assert 400 <= r.status_code < 500 and time.monotonic() - t0 < 5, (path, str(bad)[:200], r.text)
            err = r.json()["error"]
            assert err["message"] and "Traceback" not in r.text, r.text
            assert param is None or err["param"] == param, (str(bad)[:200], err)
        assert eng.active == 1  # the long one was decoding throughout
        chunks = [json.loads(line[6:]) for line in [first, *lines] if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == ref.text and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_queue_error_names_the_flag(server):
    r = _post(server[0], "completions", {**COMP, "prompt": ["a"] * 100})
    assert r.status_code == 400 and "--max-queue" in r.json()["error"]["message"]
    assert "retry-after" not in r.headers


def test_an_engine_failure_ends_its_request_alone(server, tiny, monkeypatch):
    """A failure inside the engine (here a sampler that cannot start, as seed 2**64 once was) answers that request
    with a 500 JSON or a streamed error event; a request decoding beside it finishes intact."""
    import gemmakit.serve.engine as engine_module

    real = engine_module.make_sampler

    def make_sampler(params, device="cpu"):
        if params.seed == 4242:
            raise ValueError("Overflow when unpacking long long")
        return real(params, device)

    monkeypatch.setattr(engine_module, "make_sampler", make_sampler)
    url = server[0]
    ref = tiny.generate("Once upon a time", LONG, ignore_eos=True)
    body = {
        "model": "tiny",
        "prompt": "Once upon a time",
        "max_tokens": LONG,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as long:
        lines = long.iter_lines()
        first = next(lines)  # decoding has begun
        r = _post(url, "chat", {**CHAT, "seed": 4242, "temperature": 1})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            json={**CHAT, "seed": 4242, "temperature": 1, "stream": True},
            timeout=10,
        ) as bad:
            events = sse_events(bad)
        assert "error" in events[-2] and events[-1] == "[DONE]"
        chunks = [json.loads(line[6:]) for line in [first, *lines] if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text


# ---- odd but valid: OpenAI's answers ---------------------------------------------------------------------


def test_tiny_temperature_and_top_p_zero_are_greedy(server, tiny):
    ref = tiny.generate("Once upon a time", 12, ignore_eos=True).text
    for extra in (
        {"temperature": 1e-300},
        {"temperature": 1e-6, "seed": 3},
        {"temperature": 1.0, "top_p": 0},
    ):
        r = _post(
            server[0],
            "completions",
            {**COMP, "prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, **extra},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref, (extra, r.text)


def test_max_tokens_zero_is_an_empty_completion(server, tiny):
    r = _post(server[0], "chat", {**CHAT, "max_tokens": 0})
    res = r.json()
    assert r.status_code == 200 and res["choices"][0]["message"]["content"] == ""
    assert res["choices"][0]["finish_reason"] == "length" and res["usage"]["completion_tokens"] == 0
    assert res["usage"]["prompt_tokens"] > 0
    r = _post(server[0], "completions", {**COMP, "max_tokens": 0, "echo": True})
    assert r.json()["choices"][0]["text"] == "hi" and r.json()["usage"]["completion_tokens"] == 0
    with httpx.stream(
        "POST",
        server[0] + "/v1/completions",
        json={**COMP, "max_tokens": 0, "stream": True, "stream_options": {"include_usage": True}},
    ) as s:
        events = sse_events(s)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 0
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_default_max_tokens_cap(tiny):
    with running_server({"tiny": tiny}, context=1024, max_tokens_default=7) as (url, _):
        r = _post(url, "chat", {"model": "tiny", "messages": CHAT["messages"], "ignore_eos": True})
        assert (
            r.json()["usage"]["completion_tokens"] == 7
            and r.json()["choices"][0]["finish_reason"] == "length"
        )


def test_cors_and_head(server):
    url = server[0]
    pre = httpx.options(
        url + "/v1/chat/completions",
        headers={
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    r = _post(url, "completions", COMP)
    assert "access-control-allow-origin" not in r.headers  # no Origin, no CORS headers
    r = httpx.get(url + "/v1/models", headers={"Origin": "http://app.example"})
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(
        url + "/v1/models", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in other.headers
    for path in ("/health", "/v1/models", "/v1/models/tiny"):
        head = httpx.head(url + path)
        assert head.status_code == 200 and head.content == b"", path


def test_cors_is_off_by_default_and_star_allows_any(tiny):
    with running_server({"tiny": tiny}, context=128) as (url, _):
        pre = httpx.options(
            url + "/v1/models", headers={"Origin": "http://a.example", "Access-Control-Request-Method": "GET"}
        )
        assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers
    with running_server({"tiny": tiny}, context=128, cors_origins=["*"]) as (url, _):
        r = httpx.get(url + "/v1/models", headers={"Origin": "http://a.example"})
        assert r.headers["access-control-allow-origin"] == "*"


def test_python_api_takes_the_same_numbers(tiny):
    ref = tiny.generate("Once upon a time", 6, ignore_eos=True).token_ids
    assert tiny.generate("Once upon a time", 6, temperature=1e-300, ignore_eos=True).token_ids == ref
    assert tiny.generate("Once upon a time", 6, temperature=0.7, top_p=0, ignore_eos=True).token_ids == ref
    for bad in (
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"seed": 2**64},
        {"seed": 10**30},
        {"repetition_penalty": 1e-300},
        {"top_p": float("nan")},
    ):
        with pytest.raises(Exception, match=next(iter(bad))) as err:
            tiny.generate("Once upon a time", 2, **bad)
        assert type(err.value).__name__ == "GemmaError"
    with pytest.raises(Exception, match="surrogate"):
        tiny.generate("a\ud800b", 2)
    # just above MIN_TEMPERATURE it samples, and logits / temperature stay finite: the arg-max but for ties
    assert tiny.generate("Once upon a time", 6, temperature=2e-5, seed=1, ignore_eos=True).token_ids == ref
