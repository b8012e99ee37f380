"""Gemma 3n's native decode step (quant/fused_gemma3n.py, decode_gemma3n.c) against the module path it replaces.

Tiny random Gemma 3n models (test_gemma3n.tiny3n at a 512-piece vocabulary, LAuReL and per-layer inputs widened to
whole 32-value units so every product runs over blocks): sparse first layers, per-layer MLP widths, KV-shared last
layers, sliding rings (W=8) that wrap; "plain": 3 streams with stream 1 active, dense MLPs of one width, no sharing.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import gemmakit
from finetune_helpers import tiny_tokenizer
from gemmakit.generate import generate_step
from gemmakit.quant import kernels
from gemmakit.quant.fast_path import _float_blocks
from gemmakit.quant.fused import attach
from gemmakit.quant.fused_gemma3n import FusedDecodeGemma3n
from gemmakit.quant.qlinear import swap_in
from gemmakit.sampling import SamplingParams
from gemmakit.weights.writers import write_gguf
from test_fast_path import _decode_rows
from test_fused_gemma4 import _decode_rows_alone, _inputs, _steps, _verify, _worst
from test_gemma3n import hf_gemma3n, tiny3n
from test_gemma4_fast import load_both

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: native kernels not built")
WIDE = dict(vocab_size=512, vocab_size_per_layer_input=512, laurel_rank=32, hidden_size_per_layer_input=32)
CONFIGS = {
    "full": tiny3n(**WIDE),
    "plain": tiny3n(**WIDE, num_kv_shared_layers=0, activation_sparsity_pattern=(), intermediate_sizes=(),
                    altup_num_inputs=3, altup_active_idx=1),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(kind, qtype) -> (fast, reference) loads of one random GGUF, built once."""
    built = {}

    def get(kind: str, qtype: str):
        if (kind, qtype) not in built:
            folder = tmp_path_factory.mktemp(kind)
            hf_gemma3n(CONFIGS[kind]).save_pretrained(folder)
            tiny_tokenizer(512).save(folder / "tokenizer.model")
            m = gemmakit.load(folder, dtype="float32", device="cpu", quant=None, progress=False)
            path = write_gguf(folder / f"m.{qtype}.gguf", m.module.state_dict(), m.config, m.tokenizer, qtype=qtype)
            built[kind, qtype] = load_both(path)
            assert isinstance(built[kind, qtype][0].module.fused_decode, FusedDecodeGemma3n)
        return built[kind, qtype]

    return get


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_native_step_equals_the_module_path(kind, models):
    """Float blocks (fp32 activations): step by step, rows of different lengths, sometimes a prefix of the rows,
    the native step gives the module path's logits up to summation order; greedy tokens are the same."""
    fast, _ = models(kind, "f32")
    module = fast.module
    prompts, steps = _inputs(module.config)
    assert _worst(_steps(module, True, prompts, steps), _steps(module, False, prompts, steps)) <= 1e-4
    fused = module.fused_decode
    try:
        native = [int(t) for t in generate_step(module, [prompts[1]], SamplingParams(), 12)]
        module.fused_decode = None
        assert [int(t) for t in generate_step(module, [prompts[1]], SamplingParams(), 12)] == native
    finally:
        module.fused_decode = fused


def test_q8_native_step_within_todays_budget_of_the_reference(models):
    """Q8_0 blocks: the native step against the float reference path decoding the same tokens, within the bound the
    Gemma 4 step is held to (12% of the largest logit)."""
    fast, ref = models("full", "q8_0")
    prompts, steps = _inputs(fast.module.config, 1)
    assert _worst(_steps(fast.module, True, prompts, steps), _decode_rows(ref.module, prompts, steps)) <= 0.12


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_rows_and_drafts_are_bit_identical_to_single_steps(kind, models):
    """Q8_0 blocks (int8 activations): rows decoded together give each row's logits alone bit for bit, and a draft
    of 4 (and 8, crossing the W=8 rings) verified in one call gives 8 single steps' logits bit for bit."""
    module = models(kind, "q8_0")[0].module
    prompts, steps = _inputs(module.config, 2, (17, 23, 19))
    together = _steps(module, True, prompts, steps[:8])
    for r, p in enumerate(prompts):
        fed = [s for s, t in enumerate(together) if t.shape[0] > r]
        alone = _decode_rows_alone(module, p, steps[fed, r])
        assert all(torch.equal(together[s][r], a) for s, a in zip(fed, alone, strict=True))
    draft = steps[:8, 0][None]
    single = _verify(module, prompts[1], draft, 1)
    assert torch.equal(_verify(module, prompts[1], draft, 4), single)
    assert torch.equal(_verify(module, prompts[1], draft, 8), single)


def test_any_team_and_thread_give_the_same_logits(models):
    """1, 2 or 5 workers, from the main thread or another one, give bit-identical logits."""
    module = models("full", "q8_0")[0].module
    prompts, steps = _inputs(module.config, 3)

    def run(threads: int) -> list[torch.Tensor]:
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
    worker = threading.Thread(target=lambda: got.update(x=run(2)))
    worker.start()
    worker.join()
    assert all(torch.equal(a, b) for a, b in zip(got["x"], one, strict=True))


def test_without_the_corrected_stream_scale(tmp_path):
    """altup_correct_scale=False (no GGUF holds it: llama.cpp always scales): a folder's matrices as F32 blocks, the
    native step against the module path, as for the GGUF kinds."""
    cfg = CONFIGS["plain"].replace(altup_correct_scale=False)
    hf_gemma3n(cfg).save_pretrained(tmp_path)
    module = gemmakit.load(tmp_path, dtype="float32", device="cpu", quant=None, progress=False).module
    swap_in(module, {f"{n}.weight": _float_blocks(m.weight, exact=True) for n, m in module.named_modules()
                     if isinstance(m, nn.Linear | nn.Embedding) and m.weight.shape[1] % 32 == 0})
    attach(module)
    prompts, steps = _inputs(cfg)
    assert _worst(_steps(module, True, prompts, steps), _steps(module, False, prompts, steps)) <= 1e-4
