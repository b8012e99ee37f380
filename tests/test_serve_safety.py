"""Moderation and watermarking in the OpenAI-compatible server, driven by the official `openai` client.

The served model is a tiny random one over the real vocabulary (fast); the classifier is the embedded Gemma 3
270M with a custom policy. Thresholds are placed between scores computed here with the same classifier, so what
the server flags is known in advance.
"""

from __future__ import annotations

import logging
import re

import httpx
import openai
import pytest

from gemmakit.safety import Guard, Policy
from gemmakit.serve.moderation import Moderator
from gemmakit.watermark.detector import score_ids
from gemmakit.watermark.synthid import Watermark, WatermarkConfig
from test_serve import running_server, sse_events, tiny_model

PIRATE = Policy("pirate", "Pirate Talk", "is written in pirate speech (e.g., 'arr', 'matey', 'ahoy').")
ASK = [{"role": "user", "content": "Tell me about ships."}]
WINDOW = 16


@pytest.fixture(scope="module")
def tiny(embedded_model):
    return tiny_model(embedded_model.tokenizer)


@pytest.fixture(scope="module")
def guard(fast_model):
    return Guard(fast_model, [PIRATE])


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_flagged_request_is_refused(tiny, guard, caplog):
    score = guard("Tell me about ships.").scores["pirate"]
    threshold = round(score - 0.1, 3)  # the embedded model's score exceeds it by 0.1, deterministically
    assert 0.05 < threshold < 0.95
    moderator = Moderator(Guard(guard.model, [PIRATE], threshold=threshold), inputs=True, outputs=False)
    with running_server({"tiny": tiny}, moderator=moderator) as (url, app), caplog.at_level(logging.INFO):
        client = client_for(url)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=8)
        assert err.value.status_code == 400 and err.value.code == "content_filter"
        assert err.value.body["param"] == "messages" and "pirate" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt="Tell me about ships.", max_tokens=8)
        assert err.value.code == "content_filter" and err.value.body["param"] == "prompt"
        assert app.state.engines["tiny"].requests_done == 0  # nothing was generated
    # the server's own score: on CPUs with native bf16 this 128-token prompt's products go through torch's bf16
    # GEMM, whose sums depend on the thread count (cpu_share.py), e.g. 0.723 here and 0.728 with a core busy
    logged = re.search(r"moderation input: pirate=(\d\.\d{3}) -> flagged \(pirate\)", caplog.text)
    assert logged and abs(float(logged.group(1)) - score) < 0.05


def _cut_case(tiny, guard):
    """A sampled reply, its screening boundaries, and a threshold that passes the first boundaries and fails a later
    one, away from every score; the first seed (of 8) whose reply has such a boundary. Each prefix is scored alone,
    as the server scores a stream's prefixes. Whether a reply has one depends on the products' numerics (int8 on
    CPUs without native bf16, bf16 tiles elsewhere), so the seed is searched, not fixed."""
    for seed in range(1, 9):
        reply = tiny.chat(ASK, 24, ignore_eos=True, temperature=1.0, seed=seed).text
        ends = list(range(WINDOW, len(reply) + 1, WINDOW))
        assert len(ends) >= 4
        scores = [guard.batch([(ASK[0]["content"], reply[:e])])[0].scores["pirate"] for e in ends]
        for k in range(1, len(scores)):
            passed = max(scores[:k])
            nearest = min(s for s in scores if s > passed) if scores[k] > passed else None
            if nearest is not None and nearest - passed > 0.001:  # every score at least 0.0005 from the threshold
                return seed, reply, ends, (passed + nearest) / 2, k
    raise AssertionError("no seed gives a reply whose later boundary scores clearly above the earlier ones")


def test_stream_is_cut_with_content_filter(tiny, guard):
    """The reply is screened at every WINDOW characters; the server sends the text up to the last boundary that
    passed and ends with content_filter at the first that fails, whatever the timing."""
    seed, reply, ends, threshold, cut = _cut_case(tiny, guard)
    moderator = Moderator(Guard(guard.model, [PIRATE], threshold=threshold), inputs=False, outputs=True,
                          window=WINDOW)
    with running_server({"tiny": tiny}, moderator=moderator) as (url, _):
        stream = client_for(url).chat.completions.create(model="tiny", messages=ASK, max_tokens=24, stream=True,
                                                         temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
        pieces, finish = [], []
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
            finish.append(chunk.choices[0].finish_reason)
        whole = client_for(url).chat.completions.create(model="tiny", messages=ASK, max_tokens=24, temperature=1.0,
                                                        seed=seed, extra_body={"ignore_eos": True})
    assert cut >= 1 and "".join(pieces) == reply[: ends[cut - 1]]  # screened text only, up to the cut
    assert [f for f in finish if f] == ["content_filter"] and finish[-1] == "content_filter"
    # a whole (non-streamed) reply is screened once, whole: flagged, nothing of it is returned
    full_score = guard.batch([(ASK[0]["content"], reply)])[0].scores["pirate"]
    expected = "content_filter" if full_score >= threshold else "length"
    assert whole.choices[0].finish_reason == expected
    assert whole.choices[0].message.content == ("" if expected == "content_filter" else reply)


def test_passing_reply_streams_whole(tiny, guard):
    moderator = Moderator(Guard(guard.model, [PIRATE], threshold=1.0), inputs=True, outputs=True, window=WINDOW)
    with running_server({"tiny": tiny}, moderator=moderator) as (url, _):
        body = {"model": "tiny", "messages": ASK, "max_tokens": 12, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
            events = sse_events(r)
    ref = tiny.chat(ASK, 12)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == ref.text and events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == len(ref.token_ids) + (ref.finish_reason == "stop")


def test_moderations_endpoint_is_openai_shaped(tiny, guard):
    moderator = Moderator(Guard(guard.model, ["hate", PIRATE], threshold=0.5), inputs=False, outputs=False,
                          name="guard-270m")
    texts = ["Ahoy matey, hand over the rum!", "The weather is mild today."]
    expected = Guard(guard.model, ["hate", PIRATE]).batch([(t, None) for t in texts])
    with running_server({"tiny": tiny}, moderator=moderator) as (url, _):
        res = client_for(url).moderations.create(input=texts)
    assert res.id.startswith("modr-") and res.model == "guard-270m" and len(res.results) == 2
    for result, ref in zip(res.results, expected, strict=True):
        assert result.flagged == ref.flagged and isinstance(result.flagged, bool)
        assert result.categories.hate == (ref.scores["hate"] >= 0.5)
        assert result.category_scores.hate == pytest.approx(ref.scores["hate"], abs=1e-4)
        assert result.category_scores.model_extra["pirate"] == pytest.approx(ref.scores["pirate"], abs=1e-4)
        assert result.category_applied_input_types.model_extra["pirate"] == ["text"]


def test_moderations_without_a_classifier_is_404(tiny):
    with running_server({"tiny": tiny}) as (url, _):
        with pytest.raises(openai.NotFoundError) as err:
            client_for(url).moderations.create(input="hi")
    assert "--guard-model" in err.value.body["message"]


def test_served_text_is_watermarked(tiny):
    keys = WatermarkConfig(ngram_len=4, keys=list(range(40, 60)))
    with running_server({"tiny": tiny}, watermark=Watermark(keys)) as (url, _):
        res = client_for(url).completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, seed=5,
                                                 temperature=1.0, extra_body={"ignore_eos": True})
    ref = tiny.generate("Once upon a time", 24, temperature=1.0, seed=5, ignore_eos=True,
                        logits_processors=Watermark(keys))
    plain = tiny.generate("Once upon a time", 24, temperature=1.0, seed=5, ignore_eos=True)
    assert res.choices[0].text == ref.text != plain.text
    streamed = tiny.stream("Once upon a time", 24, temperature=1.0, seed=5, ignore_eos=True,
                           logits_processors=Watermark(keys))
    assert "".join(streamed) == ref.text
    assert score_ids(ref.token_ids, keys).p_value < 1e-6 < score_ids(plain.token_ids, keys).p_value
