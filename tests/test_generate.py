"""Generation on the real embedded model: sampling controls, stops, streaming, batching."""

from __future__ import annotations

import pytest
import torch

from gemmakit.generate import TextRow
from gemmakit.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    make_sampler,
)

PROMPT = "The best way to learn a new programming language is"


def test_same_seed_same_text(embedded_model):
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    a = embedded_model.generate(PROMPT, **kw)
    b = embedded_model.generate(PROMPT, **kw)
    c = embedded_model.generate(PROMPT, **{**kw, "seed": 99})
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_top_k_1_is_greedy(embedded_model):
    greedy = embedded_model.generate(PROMPT, max_new_tokens=12)
    sampled = embedded_model.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    assert sampled.token_ids == greedy.token_ids


def test_stop_string_cuts_text(embedded_model):
    full = embedded_model.generate(PROMPT, max_new_tokens=24).text
    stop = full.split()[3]
    res = embedded_model.generate(PROMPT, max_new_tokens=24, stop=[stop])
    assert res.finish_reason == "stop"
    assert stop not in res.text and full.startswith(res.text)
    assert "".join(embedded_model.stream(PROMPT, 24, stop=stop)) == res.text


def test_stream_equals_generate_and_never_splits_characters(embedded_model):
    prompt = "日本語の文章を書きます。東京は"
    pieces = list(embedded_model.stream(prompt, 24, temperature=0.8, seed=5))
    res = embedded_model.generate(prompt, 24, temperature=0.8, seed=5)
    assert "".join(pieces) == res.text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in res.text


def test_ignore_eos_and_length(embedded_model):
    res = embedded_model.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
    assert res.finish_reason == "length" and len(res.token_ids) == 5
    assert res.prompt_tokens == len(embedded_model.tokenizer.encode(PROMPT))


def test_batched_prompts_match_single(embedded_model):
    prompts = [PROMPT, "Paris is", "def fibonacci(n):"]
    batch = embedded_model.generate(prompts, max_new_tokens=10)
    assert [r.token_ids for r in batch] == [embedded_model.generate(p, 10).token_ids for p in prompts]


def test_generation_stops_at_the_context_end(embedded_model):
    from gemmakit import Model
    from gemmakit.model import Gemma
    from helpers import TINY

    cfg = TINY["gemma3"].replace(max_position_embeddings=32)
    small = Model(Gemma(cfg).eval(), embedded_model.tokenizer, "tiny", "hf")
    res = small.generate(list(range(2, 32)), max_new_tokens=10, ignore_eos=True)
    assert len(res.token_ids) == 2 and res.finish_reason == "length"


def test_row_stops_on_eos_and_holds_back_stop_prefix(embedded_model):
    from gemmakit.tokenizer import StreamDecoder

    tok = embedded_model.tokenizer
    row = TextRow(StreamDecoder(tok), ("END",))
    ids = tok.encode("hello EN", bos=False)
    emitted = "".join(row.push(t, {1}) for t in ids)
    assert emitted == "hello "  # "EN" may become "END": held back
    assert row.push(1, {1}) == "EN" and row.finish_reason == "stop"


def test_processors():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, -1.0]])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[False, False, True, True, True]]
    p = logits.softmax(-1)[0]
    kept = ~torch.isinf(apply_top_p(logits, float(p[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = ~torch.isinf(apply_min_p(logits, 0.3))
    assert kept.tolist() == [[True, True, False, False, False]]
    seen = torch.tensor([[True, False, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[2.0, 3.0, 2.0, 1.0, -2.0]]


def test_seeded_sampler_is_reproducible():
    logits = torch.randn(3, 50)
    a = make_sampler(SamplingParams(temperature=1.0, seed=7))
    b = make_sampler(SamplingParams(temperature=1.0, seed=7))
    assert [a(logits).tolist() for _ in range(5)] == [b(logits).tolist() for _ in range(5)]


@pytest.mark.parametrize("bad", [dict(top_p=-0.1), dict(top_k=0), dict(min_p=2.0), dict(repetition_penalty=0.0),
                                 dict(temperature=float("nan")), dict(temperature=float("inf")), dict(seed=2**64),
                                 dict(top_p=float("nan")), dict(repetition_penalty=1e-300)])
def test_bad_sampling_params(bad):
    from gemmakit import GemmaError

    with pytest.raises(GemmaError):
        SamplingParams(**bad)


def test_top_p_zero_and_tiny_temperatures_are_greedy():
    """OpenAI's top_p 0 and temperatures below 1e-5 (1e-300 would overflow logits / t) take the arg-max."""
    logits = torch.randn(3, 50)
    for params in (SamplingParams(temperature=1.0, top_p=0.0), SamplingParams(temperature=1e-300, seed=1)):
        assert params.greedy and make_sampler(params)(logits).tolist() == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=1e-5, seed=1).greedy


def test_generate_options_match_the_public_signatures():
    """generate() and stream() list their options one by one for users; GenerateOptions carries them inside the
    library. A new option added to one and not the other would be dropped silently: the names must match."""
    import inspect
    from dataclasses import fields

    from gemmakit.api import GenerateOptions, Model

    names = {f.name for f in fields(GenerateOptions)}
    for method in (Model.generate, Model.stream):
        params = inspect.signature(method).parameters.values()
        assert {p.name for p in params if p.kind is p.KEYWORD_ONLY} == names, method.__name__
        defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        assert defaults == {f.name: f.default for f in fields(GenerateOptions)}, method.__name__
