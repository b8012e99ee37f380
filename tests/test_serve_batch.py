"""The server engine's per-step batching (issue 23): one choice over all rows (serve/choose.py, sampling.draw),
batched prefill of requests admitted together, and a failing row that ends alone inside a batched step."""

from __future__ import annotations

import queue

import pytest
import torch

from gemmakit.sampling import LogitsProcessor, SamplingParams, draw
from gemmakit.serve.choose import choose
from gemmakit.serve.drafting import row_rules
from gemmakit.serve.engine import Engine, Event, Job, wait_idle
from test_serve import tiny_model


@pytest.fixture(scope="module")
def tiny(embedded_model):
    return tiny_model(embedded_model.tokenizer, max_position_embeddings=1024)


def _job(prompt, n, **kw):
    events: queue.Queue[Event] = queue.Queue()
    return Job(list(prompt), n, sink=events.put, **kw), events


def _drain(events: queue.Queue, timeout: float = 60.0) -> tuple[list[int], Event]:
    ids = []
    while True:
        ev = events.get(timeout=timeout)
        ids += ev.ids
        if ev.finish_reason is not None or ev.error is not None:
            return ids, ev


class Boom(LogitsProcessor):
    def process(self, logits):
        raise RuntimeError("a bug in this request's processor")


# ---- sampling.draw ---------------------------------------------------------------------------------------------


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    V, N = 700, 20000  # three CDF blocks, the last one padded
    g = torch.Generator().manual_seed(0)
    p = torch.rand(V, generator=g) ** 3
    p[torch.randperm(V, generator=g)[:300]] = 0.0
    p[-1] = 0.0  # the last entry, next to the padding
    p /= p.sum()
    tokens = draw(p.expand(N, V).contiguous(), torch.Generator().manual_seed(1))
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[p == 0].sum() == 0
    # Pearson's chi-square over bins of expected count >= 5 (tail merged): df ~ bins - 1, mean df, sd sqrt(2 df)
    expected = p.double() * N
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    assert chi2 < df + 5 * (2 * df) ** 0.5, (chi2, df)


def test_draw_gives_minus_one_for_a_row_without_a_distribution():
    p = torch.full((5, 300), 1 / 300)
    p[1, 7] = float("nan")
    p[2] = 0.0
    p[3, 0] = float("inf")
    out = draw(p, torch.Generator().manual_seed(2)).tolist()
    assert out[1] == out[2] == out[3] == -1
    assert 0 <= out[0] < 300 and 0 <= out[4] < 300
    one_hot = torch.zeros(2, 600)
    one_hot[0, 599], one_hot[1, 256] = 1.0, 1.0  # a block edge and the very last entry
    assert draw(one_hot).tolist() == [599, 256]


# ---- serve/choose.py -------------------------------------------------------------------------------------------


def _one(seq, logits):
    """The per-row choice (the engine before issue 23): penalties and bias, then the row's own sampler."""
    procs = [seq.job.processors] if seq.job.processors else None
    return int(seq.sample(row_rules(seq, drafting=False).penalized(logits), seq.seen, procs)[0])


def test_choose_equals_the_per_row_choice(tiny):
    engine = Engine(tiny, max_batch=8, context=256)  # not started: only its _new_seq
    prompt = tiny.encode("Once upon a time")
    jobs = [
        Job(prompt, 4, sink=print),  # plain greedy: the shared arg-max
        Job(prompt, 4, sink=print, params=SamplingParams(repetition_penalty=1.3)),
        Job(prompt, 4, sink=print, logit_bias={5: 40.0}),
        Job(prompt, 4, sink=print, frequency_penalty=1.0, presence_penalty=0.5),
        Job(prompt, 4, sink=print, params=SamplingParams(temperature=0.8, top_k=20, seed=3)),
        Job(prompt, 4, sink=print, params=SamplingParams(temperature=1.0, top_p=0.9, seed=4)),
        Job(prompt, 4, sink=print, processors=[Boom()]),  # fails alone
        Job(prompt, 4, sink=print),
    ]
    logits = torch.randn(len(jobs), tiny.config.vocab_size, generator=torch.Generator().manual_seed(5)) * 3
    for step in range(3):
        a = [engine._new_seq(job) for job in jobs]
        b = [engine._new_seq(job) for job in jobs]  # fresh samplers: the seeded ones restart from their seeds
        for seq in a[3:4] + b[3:4]:
            seq.counts[0, :50] = 2.0
        got = choose(a, logits, engine.generator)
        assert isinstance(got[6], RuntimeError)
        want = [_one(s, logits[i : i + 1]) for i, s in enumerate(b) if i != 6]
        assert [t for i, t in enumerate(got) if i != 6] == want
        logits = logits.roll(step + 1, dims=1)


def test_choose_draws_unseeded_rows_from_their_own_settings(tiny):
    engine = Engine(tiny, max_batch=8, context=256)
    prompt = tiny.encode("Once upon a time")
    V = tiny.config.vocab_size
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(6))
    jobs = [
        Job(prompt, 4, sink=print, params=SamplingParams(temperature=1.0, top_k=3)),
        Job(prompt, 4, sink=print, params=SamplingParams(temperature=1.0, top_k=1)),
        Job(prompt, 4, sink=print, params=SamplingParams(temperature=1.0, top_k=3)),
        Job(prompt, 4, sink=print, params=SamplingParams(temperature=1.0, top_k=2), logit_bias={9: 100.0}),
    ]
    seqs = [engine._new_seq(job) for job in jobs]
    seen = [set() for _ in jobs]
    for _ in range(60):
        for i, t in enumerate(choose(seqs, logits, engine.generator)):
            seen[i].add(t)
    top = [set(logits[i].topk(3).indices.tolist()) for i in range(4)]
    assert seen[0] <= top[0] and seen[2] <= top[2] and len(seen[0]) > 1
    assert seen[1] == {int(logits[1].argmax())}
    assert 9 in seen[3] and seen[3] <= {9} | set(logits[3].topk(2).indices.tolist())


# ---- the engine: batched prefill, a failing row ---------------------------------------------------------------


def _prompts(tiny):
    texts = [
        "Hi",
        "Once upon a time",
        "The quick brown fox jumps over",
        "In a village far away, there lived a",
    ]
    return [tiny.encode(t) for t in texts]


def test_batched_prefill_equals_generate_per_prompt(tiny, monkeypatch):
    prompts = _prompts(tiny)
    assert len({len(p) for p in prompts}) == len(prompts)  # mixed lengths: left padding in play
    engine = Engine(tiny, max_batch=8, context=256)
    groups = []
    real = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda group: groups.append(len(group)) or real(group))
    greedy = [_job(p, 12, ignore_eos=True) for p in prompts]
    seeded = _job(prompts[1], 12, ignore_eos=True, params=SamplingParams(temperature=1.0, top_p=0.9, seed=7))
    engine.submit([job for job, _ in greedy] + [seeded[0]])  # before start: admitted together
    engine.start()
    try:
        for p, (_, events) in zip(prompts, greedy, strict=True):
            assert _drain(events)[0] == tiny.generate(p, 12, ignore_eos=True).token_ids
        ref = tiny.generate(prompts[1], 12, ignore_eos=True, temperature=1.0, top_p=0.9, seed=7).token_ids
        assert _drain(seeded[1])[0] == ref
        assert wait_idle(engine)
    finally:
        engine.stop()
    assert max(groups) > 1, groups  # the prompts did share a prefill


def test_an_idle_engine_prefills_a_burst_of_requests_together(tiny, monkeypatch):
    """Requests that reach an idle, running engine one by one (8 clients starting at once) share one prefill, so
    their rows decode in step from the first token; one that comes while rows decode joins at the next step."""
    import threading
    import time

    prompts = _prompts(tiny)
    engine = Engine(tiny, max_batch=8, context=256)
    groups = []
    real = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda group: groups.append(len(group)) or real(group))
    engine.start()
    try:
        jobs = [_job(p, 8, ignore_eos=True) for p in prompts]
        gate = threading.Barrier(len(jobs))

        def client(job):
            gate.wait()
            engine.submit([job])

        threads = [threading.Thread(target=client, args=(job,)) for job, _ in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        late = _job(prompts[0], 4, ignore_eos=True)
        time.sleep(0.05)  # the burst is decoding by now
        engine.submit([late[0]])
        outs = [_drain(events)[0] for _, events in jobs]
        assert _drain(late[1])[0] == tiny.generate(prompts[0], 4, ignore_eos=True).token_ids
        assert wait_idle(engine)
    finally:
        engine.stop()
    assert groups[0] == len(jobs), groups  # one prefill for the whole burst
    for p, out in zip(prompts, outs, strict=True):
        assert out == tiny.generate(p, 8, ignore_eos=True).token_ids


def test_a_failing_row_in_a_batched_prefill_ends_alone(tiny, caplog):
    """A prompt whose forward fails fails the batched prefill; its group is prefilled again one by one, so only
    that request ends with an error, and the rows it shared a forward with get exactly their own output."""
    prompts = _prompts(tiny)
    bad_token = prompts[2][-1]
    good = [p for p in prompts if bad_token not in p]

    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["ids"]
        if ids.shape[1] > 1 and bool((ids == bad_token).any()):  # prefills only
            raise ValueError("this prompt breaks the forward")

    handle = tiny.module.register_forward_pre_hook(hook, with_kwargs=True)
    engine = Engine(tiny, max_batch=8, context=256)
    try:
        jobs = [_job(p, 10, ignore_eos=True) for p in good]
        bad = _job(prompts[2], 10)
        failing = _job(good[0], 10, ignore_eos=True, processors=[Boom()])  # fails while its token is chosen
        engine.submit([job for job, _ in jobs] + [bad[0], failing[0]])
        engine.start()
        outs = [_drain(events)[0] for _, events in jobs]
        assert _drain(bad[1])[1].error.startswith("internal error while generating")
        assert _drain(failing[1])[1].error.startswith("internal error while generating")
        assert wait_idle(engine)
    finally:
        engine.stop()
        handle.remove()
    assert "a batched prefill failed" in caplog.text  # the bad prompt did share a forward
    for p, out in zip(good, outs, strict=True):
        assert out == tiny.generate(p, 10, ignore_eos=True).token_ids


def test_rows_freed_below_a_live_row_are_packed(tiny, monkeypatch):
    """When the low rows finish and no request takes them, the rows above move down (KVCache.move), so the decode
    steps span the live rows only; the moved row's output is exactly its own, past its sliding window's wrap."""
    prompts = _prompts(tiny)
    engine = Engine(tiny, max_batch=8, context=256)
    batches = []
    real = tiny.module.forward

    def spy(ids, *args, **kwargs):
        if ids.shape[1] == 1:
            batches.append(ids.shape[0])
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(tiny.module, "forward", spy)
    short = [_job(p, 3, ignore_eos=True) for p in prompts[:3]]
    long = _job(prompts[3], 24, ignore_eos=True)  # row 3; 24 tokens wrap its sliding layers' 8-slot rings
    engine.submit([job for job, _ in short] + [long[0]])
    engine.start()
    try:
        outs = [_drain(events)[0] for _, events in short]
        out = _drain(long[1])[0]
        assert wait_idle(engine)
    finally:
        engine.stop()
    for p, o in zip(prompts, [*outs, out], strict=True):
        assert o == tiny.generate(p, len(o), ignore_eos=True).token_ids
    assert batches[:2] == [4, 4] and batches[-1] == 1, batches  # the long row moved to row 0
    assert batches.count(4) <= 3, batches  # one step with free rows in its span before the move
    assert engine.cache.lengths == [0] * 8
