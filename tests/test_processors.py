"""The per-row LogitsProcessor hook (sampling.py): its contract held by generate_step, lookup_step and the engine."""

from __future__ import annotations

import threading

import torch

from gemmakit.sampling import LogitsProcessor, SamplingParams, apply_processors, make_sampler
from gemmakit.serve.engine import Engine, Event, Job, wait_idle

PROMPT = "The best way to learn a new programming language is"


class Script(LogitsProcessor):
    """Allows only the next token of a fixed script, then only `end`; records every call."""

    def __init__(self, script: list[int], end: int) -> None:
        self.script, self.end = script, end
        self.prompt: list[int] | None = None
        self.accepted: list[int] = []
        self.calls = 0

    def begin(self, prompt):
        assert self.prompt is None, "begin() twice"
        self.prompt = list(prompt)

    def process(self, logits):
        assert self.prompt is not None, "process() before begin()"
        assert self.end not in self.accepted, "process() after the stop token"
        self.calls += 1
        i = len(self.accepted)
        allowed = self.script[i] if i < len(self.script) else self.end
        out = torch.full_like(logits, float("-inf"))
        out[allowed] = logits[allowed]
        return out

    def accept(self, token):
        self.accepted.append(token)

    def valid_prefix(self, draft):
        n = 0
        while n < len(draft) and len(self.accepted) + n < len(self.script) \
                and draft[n] == self.script[len(self.accepted) + n]:
            n += 1
        return n


class Ban(LogitsProcessor):
    """Forbids a set of tokens; records what it accepted."""

    def __init__(self, banned: set[int]) -> None:
        self.banned, self.accepted = sorted(banned), []

    def process(self, logits):
        return logits.index_fill(0, torch.tensor(self.banned), float("-inf"))

    def accept(self, token):
        self.accepted.append(token)


class SeeWarped(LogitsProcessor):
    """A "warp" processor that records how many tokens the sampler's filters left it."""

    stage = "warp"

    def __init__(self) -> None:
        self.finite: list[int] = []

    def process(self, logits):
        self.finite.append(int(torch.isfinite(logits).sum()))
        return logits


def test_unused_hook_costs_nothing():
    logits = torch.randn(2, 10)
    assert apply_processors(logits, [[], []], "mask") is logits
    greedy = make_sampler(SamplingParams())
    assert greedy(logits, None, None).tolist() == greedy(logits).tolist()


def test_mask_runs_before_filters_and_warp_after():
    """top_k=1 after a mask picks the best allowed token; a warp processor sees only top-k's survivors."""
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    ban, seen = Ban({0}), SeeWarped()
    sample = make_sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    for _ in range(20):
        assert int(sample(logits, None, [[ban, seen]])[0]) in (1, 2)
    assert seen.finite == [2] * 20
    assert int(make_sampler(SamplingParams())(logits, None, [[ban]])[0]) == 1


def test_generate_batch_follows_each_rows_processor(fast_model):
    tok = fast_model.tokenizer
    scripts = [tok.encode(" a cat", bos=False), tok.encode(" two dogs and", bos=False)]
    made: list[Script] = []

    def factory():
        made.append(Script(scripts[len(made)], tok.eos_id))
        return [made[-1]]

    prompts = [PROMPT, "Paris is"]
    for kw in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}):
        made.clear()
        results = fast_model.generate(prompts, 12, logits_processors=factory, **kw)
        for r, s, p, prompt in zip(results, scripts, made, prompts, strict=True):
            assert r.token_ids == s and r.finish_reason == "stop"
            assert p.accepted == [*s, tok.eos_id]  # every chosen token, the stop token too, nothing after
            assert p.calls == len(s) + 1 and p.prompt == tok.encode(prompt)


def test_stream_with_a_processor(fast_model):
    banned = set(fast_model.generate(PROMPT, 8).token_ids)
    ban = Ban(banned)
    text = "".join(fast_model.stream(PROMPT, 8, logits_processors=lambda: [ban]))
    ids = fast_model.last_result.token_ids
    assert text and not banned & set(ids) and ban.accepted[: len(ids)] == ids


def test_lookup_checks_drafts_against_processors(fast_model):
    """Prompt lookup with a processor: the tokens of plain greedy with it, and accept() only for kept tokens."""
    prompt = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n" * 3) + "def add(a, b):\n"
    banned = {fast_model.tokenizer.encode("sub", bos=False)[0]}
    plain_ban, spec_ban = Ban(banned), Ban(banned)
    plain = fast_model.generate(prompt, 24, ignore_eos=True, logits_processors=lambda: [plain_ban])
    spec = fast_model.generate(prompt, 24, ignore_eos=True, lookup=8, logits_processors=lambda: [spec_ban])
    assert spec.token_ids == plain.token_ids and not banned & set(spec.token_ids)
    assert spec_ban.accepted == plain_ban.accepted == plain.token_ids
    script_ids = fast_model.tokenizer.encode(" return a + b\n\ndef sub(a, b):\n", bos=False)
    script = Script(script_ids, fast_model.tokenizer.eos_id)
    out = fast_model.generate(prompt, 40, lookup=8, logits_processors=lambda: [script])
    assert out.token_ids == script_ids and script.calls == len(script_ids) + 1


def test_engine_rows_keep_their_own_processors(fast_model):
    """Continuous batching: two jobs with different scripts decoded together, each row masked by its own."""
    tok = fast_model.tokenizer
    engine = Engine(fast_model, max_batch=4, context=128)
    engine.start()
    try:
        texts = ["", ""]
        done = threading.Event()
        finished = []

        def sink(i):
            def put(ev: Event):
                texts[i] += ev.text
                if ev.finish_reason is not None:
                    finished.append((i, ev.finish_reason))
                    if len(finished) == 2:
                        done.set()
            return put

        wanted = [" red and blue", " forty-two"]
        procs = [Script(tok.encode(w, bos=False), tok.eos_id) for w in wanted]
        jobs = [Job(tok.encode(PROMPT), 16, sink(i), params=SamplingParams(temperature=0.8, seed=i),
                    processors=[procs[i]]) for i in range(2)]
        engine.submit(jobs)
        assert done.wait(60) and wait_idle(engine)
        assert texts == wanted and sorted(finished) == [(0, "stop"), (1, "stop")]
        assert engine.peak_batch == 2
        assert all(p.accepted[-1] == tok.eos_id for p in procs)
    finally:
        engine.stop()
