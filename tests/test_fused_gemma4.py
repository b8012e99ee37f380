"""Gemma 4's native decode step (quant/fused_gemma4.py, decode_gemma4.c) against the module path it replaces.

Tiny random Gemma 4 models of every kind (helpers.TINY4 widened to whole 32-value units, as in test_gemma4_fast):
E-style (per-layer embeddings, KV-shared layers, double-wide MLP), dense and MoE, each with and without
attention_k_eq_v; global layers with their own head dim and KV heads and 1/4 of the pairs rotated; sliding rings
(W=8) that wrap.
"""

from __future__ import annotations

import threading

import pytest
import torch

from gemmakit.model import KVCache
from gemmakit.quant import kernels
from gemmakit.quant.fused_gemma4 import FusedDecodeGemma4
from test_fast_path import _decode_rows
from test_gemma4_fast import load_both, tiny, write

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: native kernels not built")
KINDS = ["gemma4-e", "gemma4-e-keqv", "gemma4-dense-keqv", "gemma4-moe", "gemma4-moe-keqv"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(kind, qtype) -> (fast, reference) loads of one random GGUF, built once."""
    built = {}

    def get(kind: str, qtype: str):
        if (kind, qtype) not in built:
            path = write(tmp_path_factory.mktemp(kind) / f"m.{qtype}.gguf", tiny(kind), qtype)
            built[kind, qtype] = load_both(path)
        return built[kind, qtype]

    return get


def _steps(module, native: bool, prompts, steps) -> list[torch.Tensor]:
    fused = module.fused_decode
    assert isinstance(fused, FusedDecodeGemma4)
    module.fused_decode = fused if native else None
    try:
        return _decode_rows(module, prompts, steps)
    finally:
        module.fused_decode = fused


def _inputs(cfg, seed: int = 0, lengths: tuple[int, ...] = (5, 11, 3)):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    return prompts, torch.randint(0, cfg.vocab_size, (12, 3), generator=g)


def _worst(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("kind", ["gemma4-e", "gemma4-e-keqv", "gemma4-moe-keqv"])  # every layer kind among them
def test_native_step_equals_the_module_path(kind, models):
    """Float blocks (fp32 activations): step by step, rows of different lengths, sometimes a prefix of the rows,
    the native step gives the module path's logits up to summation order (measured <= 1.7e-5)."""
    fast, _ = models(kind, "f32")
    prompts, steps = _inputs(fast.module.config)
    assert _worst(_steps(fast.module, True, prompts, steps), _steps(fast.module, False, prompts, steps)) <= 1e-4


@pytest.mark.parametrize("kind", ["gemma4-e", "gemma4-dense-keqv"])
def test_q8_native_step_within_todays_budget_of_the_reference(kind, models):
    """Q8_0 blocks: the native step against the float reference path, decoding the same tokens, within the bound the
    fast path is held to end to end today (12% of the largest logit; test_gemma4_fast)."""
    fast, ref = models(kind, "q8_0")
    prompts, steps = _inputs(fast.module.config, 1)
    assert _worst(_steps(fast.module, True, prompts, steps), _decode_rows(ref.module, prompts, steps)) <= 0.12


def _verify(module, prompt: list[int], draft: torch.Tensor, step: int) -> torch.Tensor:
    """Logits of `draft` fed `step` tokens per call after `prompt` (step > 1: a speculative draft verified)."""
    cache = KVCache(module.config, 1, 64, dtype=torch.float32, device="cpu", slack=8)
    n = len(prompt)
    with torch.inference_mode():
        module(torch.tensor([prompt]), cache=cache)
        return torch.cat([module(draft[:, i:i + step], torch.arange(n + i, n + i + step)[None], cache)
                          for i in range(0, draft.shape[1], step)], dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_and_drafts_are_bit_identical_to_single_steps(kind, models):
    """Q8_0 blocks (int8 activations, the row-sensitive case): rows decoded together give each row's logits alone
    bit for bit, and a draft of 4 (and 8, crossing the W=8 rings) verified in one call gives 8 single steps' logits
    bit for bit: what lets speculative decoding keep greedy output exact."""
    module = models(kind, "q8_0")[0].module
    # prompts longer than a native step: every row is prefilled alone by the module path, as in the single runs
    prompts, steps = _inputs(module.config, 2, (17, 23, 19))
    together = _steps(module, True, prompts, steps[:8])
    for r, p in enumerate(prompts):
        fed = [s for s, t in enumerate(together) if t.shape[0] > r]  # the last row sits out every fifth step
        alone = _decode_rows_alone(module, p, steps[fed, r])
        assert all(torch.equal(together[s][r], a) for s, a in zip(fed, alone, strict=True))
    draft = steps[:8, 0][None]
    single = _verify(module, prompts[1], draft, 1)
    assert torch.equal(_verify(module, prompts[1], draft, 4), single)
    assert torch.equal(_verify(module, prompts[1], draft, 8), single)


def _decode_rows_alone(module, prompt: list[int], tokens: torch.Tensor) -> list[torch.Tensor]:
    cache = KVCache(module.config, 1, 64, dtype=torch.float32, device="cpu", slack=4)
    out = []
    with torch.inference_mode():
        module(torch.tensor([prompt]), cache=cache, last_only=True)
        for t in tokens.tolist():
            out.append(module(torch.tensor([[t]]), torch.tensor([[cache.lengths[0]]]), cache)[0, -1])
    return out


def test_any_team_and_thread_give_the_same_logits(models):
    """One OpenMP region per step: 1 or 2 workers, or more than CPUs, from the main thread or another one (a
    server's engine thread), give bit-identical logits (the MoE and E-style layers together)."""
    for kind in ("gemma4-e", "gemma4-moe"):
        module = models(kind, "q8_0")[0].module
        prompts, steps = _inputs(module.config, 3)

        def run(threads: int, module=module, prompts=prompts, steps=steps) -> list[torch.Tensor]:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return _steps(module, True, prompts, steps[:6])
            finally:
                torch.set_num_threads(before)

        one = run(1)
        for threads in (2, 5):
            assert all(torch.equal(a, b) for a, b in zip(run(threads), one, strict=True))
        got: dict = {}
        worker = threading.Thread(target=lambda run=run, got=got: got.update(x=run(2)))
        worker.start()
        worker.join()
        assert all(torch.equal(a, b) for a, b in zip(got["x"], one, strict=True))


def test_moe_step_reads_only_the_routed_experts(tmp_path):
    """quant="q8" on a MoE folder (expert blocks in memory): after a clean prompt, one expert's blocks get NaN scales;
    the native step's logits turn NaN exactly when that expert is one the step is routed to (the module path's
    routes), in every layer: it reads the routed experts' blocks and no other's."""
    import gemmakit
    from helpers import hf_model

    hf_model(tiny("gemma4-moe")).save_pretrained(tmp_path)
    module = gemmakit.load(tmp_path, quant="q8", progress=False).module
    fused = module.fused_decode
    routed = [set() for _ in module.model.layers]

    def step(native: bool) -> torch.Tensor:
        module.fused_decode = None  # the prompt on the module path, from clean blocks
        cache = KVCache(module.config, 1, 16, dtype=torch.float32, device="cpu")
        with torch.inference_mode():
            module(torch.tensor([[2, 5, 9, 100, 7]]), cache=cache)
            module.fused_decode = fused if native else None
            return module(torch.tensor([[17]]), torch.tensor([[5]]), cache)

    def last_call(_m, _a, out, i):  # each layer's last routing is the step's (the prompt's came first)
        routed[i] = set(out[1].flatten().tolist())

    hooks = [b.router.register_forward_hook(lambda m, a, out, i=i: last_call(m, a, out, i))
             for i, b in enumerate(module.model.layers)]
    step(False)
    for h in hooks:
        h.remove()
    for i, block in enumerate(module.model.layers):
        for e, down in enumerate(block.experts.down):
            clean = down.data.clone()
            down.data.fill_(255)  # Q8_0 scales 0xFFFF: NaN
            try:
                assert torch.isnan(step(True)).any().item() == (e in routed[i]), (i, e)
            finally:
                down.data.copy_(clean)
