"""The fast CPU path: Q8_0 kernels equal their PyTorch reference; the fast model stays within the quality budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemmakit import evaluate
from gemmakit.embedded import embedded_path
from gemmakit.quant import kernels, q8
from gemmakit.quant.q8 import Q8Embedding, Q8Linear, dequantize_q8, quantize_q8
from gemmakit.weights.gguf import read_gguf
from reference import texts

needs_native = pytest.mark.skipif(not kernels.available(), reason="no C compiler: native kernels not built")


def test_quantize_q8_matches_ggml_bytes():
    """Re-quantizing the GGUF's own Q8_0 values reproduces its bytes: our quantizer is ggml's."""
    g = read_gguf(embedded_path(progress=False))
    name = next(n for n, t in g.tensors.items() if t.qtype.name == "Q8_0" and n.startswith("blk."))
    raw = g.raw(name).reshape(g.tensors[name].shape[0], -1)
    assert np.array_equal(quantize_q8(g.dequantize(name)), raw)
    assert torch.equal(dequantize_q8(torch.from_numpy(raw.copy()), g.tensors[name].shape[1]),
                       torch.from_numpy(g.dequantize(name)))


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 40])
def test_native_matmul_equals_reference(rows):
    torch.manual_seed(rows)
    w = torch.randn(260, 320)
    lin = Q8Linear(torch.from_numpy(quantize_q8(w)), 320, 260)
    x = torch.randn(rows, 320)
    expected = x @ dequantize_q8(lin.blocks, 320).T
    got = lin(x)
    tol = 1e-4 if rows <= q8.GEMV_ROWS else 0.05 * expected.abs().max().item()  # long inputs may run in bf16
    assert (got - expected).abs().max().item() <= tol


@needs_native
def test_embedding_rows_and_head():
    w = torch.randn(64, 96)
    emb = Q8Embedding(torch.from_numpy(quantize_q8(w)), 64, 96)
    ref = dequantize_q8(emb.head.blocks, 96)
    ids = torch.tensor([[3, 0, 63], [5, 5, 1]])
    assert torch.equal(emb(ids), ref[ids])
    h = torch.randn(2, 96)
    assert torch.allclose(emb.attend(h), h @ ref.T, atol=1e-4)


def test_pure_pytorch_fallback(monkeypatch):
    w = torch.randn(32, 64)
    lin = Q8Linear(torch.from_numpy(quantize_q8(w)), 64, 32)
    x = torch.randn(2, 64)
    native = lin(x)
    monkeypatch.setattr(kernels, "library", lambda: None)
    assert torch.allclose(lin(x), native, atol=1e-4)


def perplexity(model, text: str) -> float:
    """Every token after <bos> scored with all the text before it (one window: the texts are < 2048 tokens)."""
    return evaluate.perplexity(model, text).perplexity


def test_fast_path_perplexity_within_one_percent(fast_model, embedded_model):
    """The issue's quality budget: perplexity of the fast path within +1% of the fp32 dequantized model."""
    for label in ("prose", "code", "multilingual"):
        fast, ref = perplexity(fast_model, texts()[label]), perplexity(embedded_model, texts()[label])
        assert fast <= ref * 1.01, (label, fast, ref)


def test_fast_path_greedy_agrees_with_reference(fast_model, embedded_model):
    prompt = "The history of the printing press is"
    assert fast_model.generate(prompt, 12).text == embedded_model.generate(prompt, 12).text


def test_prompt_lookup_is_identical_to_greedy(fast_model):
    """Speculative prompt lookup on a copy-heavy prompt: same tokens as plain greedy, fewer forwards."""
    import gemmakit.generate as G

    prompt = texts()["code"] + "\n\n# The same code again, unchanged:\n"
    plain = fast_model.generate(prompt, 48, ignore_eos=True)
    spec = fast_model.generate(prompt, 48, ignore_eos=True, lookup=8)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert "".join(fast_model.stream(prompt, 48, ignore_eos=True, lookup=8)) == plain.text
    index = G.NgramIndex([5, 6, 7, 8, 5, 6])
    assert index.draft(3) == [7, 8, 5]


def test_q8_on_any_source_is_close_to_reference(tmp_path):
    """quant='q8' on a bf16/fp32 HF folder: fused q/k/v and gate/up, logits close to the float model."""
    import gemmakit
    from helpers import TINY, hf_model

    cfg = TINY["gemma3"]
    hf_model(cfg).save_pretrained(tmp_path)
    ref = gemmakit.load(tmp_path, quant=None, progress=False)
    fast = gemmakit.load(tmp_path, quant="q8", progress=False)
    attn = fast.module.model.layers[0].self_attn
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    ids = list(range(2, 40))
    a, b = fast.logits(ids), ref.logits(ids)
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()


def _tiny_q8(name: str):
    """A random tiny model of helpers.TINY (tied head, as GGUFs are) on the Q8 path with its native decode step."""
    from gemmakit.fast import to_q8
    from gemmakit.loader import build
    from helpers import TINY, hf_model

    cfg = TINY[name]
    state = {k: v for k, v in hf_model(cfg).state_dict().items() if k != "lm_head.weight"}
    return to_q8(build(cfg, state))


@needs_native
@pytest.mark.parametrize("name", ["gemma1", "gemma2", "gemma3", "gemma3-mqa"])
def test_native_decode_step_equals_modules(name):
    """The one-call native decode step (quant/fused.py) gives the module path's logits, step by step, for rows of
    different lengths (server-style), a subset of rows, and sliding-window rings that wrap (W=8)."""
    from gemmakit.model import KVCache

    module = _tiny_q8(name)
    cfg = module.config
    fused = module.fused_decode
    assert fused is not None
    torch.manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (5, 11, 3)]

    def run(native: bool) -> list[torch.Tensor]:
        module.fused_decode = fused if native else None
        cache = KVCache(cfg, 3, 64, dtype=torch.float32, device="cpu", slack=4)
        out, last = [], []
        with torch.inference_mode():
            for r, p in enumerate(prompts):
                last.append(module(torch.tensor([p]), cache=cache, rows=[r], last_only=True)[0, -1].argmax())
            for step in range(20):
                rows = [0, 1] if step % 5 == 4 else None  # sometimes only a prefix of the rows decodes
                b = 2 if rows else 3
                ids = torch.stack(last[:b])[:, None]
                pos = torch.tensor([[cache.lengths[r]] for r in range(b)])
                logits = module(ids, pos, cache=cache, rows=rows)[:, -1]
                out.append(logits)
                last[:b] = list(logits.argmax(-1))
        return out

    native, modules = run(True), run(False)
    for a, b in zip(native, modules, strict=True):
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item() + 1e-5


@needs_native
def test_native_attention_across_chunks():
    """Global layers past 256 slots split attention into chunks merged by their maxima: still the module path's
    logits, and a draft straddling a chunk boundary still verifies bit-identically."""
    from gemmakit.model import KVCache

    module = _tiny_q8("gemma3-mqa")
    cfg = module.config
    fused = module.fused_decode
    torch.manual_seed(2)
    prompt, draft = torch.randint(0, cfg.vocab_size, (1, 250)), torch.randint(0, cfg.vocab_size, (1, 8))

    def run(native: bool, step: int) -> torch.Tensor:
        module.fused_decode = fused if native else None
        cache = KVCache(cfg, 1, 300, dtype=torch.float32, device="cpu", slack=8)
        module(prompt, cache=cache)
        return torch.cat([module(draft[:, i:i + step], torch.arange(250 + i, 250 + i + step)[None], cache)
                          for i in range(0, 8, step)], dim=1)

    with torch.inference_mode():
        single, verified, modules = run(True, 1), run(True, 4), run(False, 1)
    assert torch.equal(single, verified)
    assert (single - modules).abs().max().item() <= 1e-4 * modules.abs().max().item() + 1e-5


@needs_native
def test_native_decode_is_used_and_matches_on_the_embedded_model(fast_model):
    """The real 270M: the native decode step is attached, and greedy text equals the module path's."""
    module = fast_model.module
    assert module.fused_decode is not None
    prompt = next(iter(texts().values()))[:400]
    native = fast_model.generate(prompt, 24, ignore_eos=True)
    saved, module.fused_decode = module.fused_decode, None
    try:
        modules = fast_model.generate(prompt, 24, ignore_eos=True)
    finally:
        module.fused_decode = saved
    assert native.token_ids == modules.token_ids


@needs_native
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_native_verification_is_bit_identical_to_single_steps(name):
    """A draft of k tokens verified in one native call gives exactly the logits of k single decode steps (same
    GEMV row order, same softmax lanes), also across a wrapping sliding-window ring: speculative decoding cannot
    change a greedy token."""
    from gemmakit.model import KVCache

    module = _tiny_q8(name)
    cfg = module.config
    torch.manual_seed(1)
    prompt, draft = torch.randint(0, cfg.vocab_size, (1, 10)), torch.randint(0, cfg.vocab_size, (1, 12))

    def cache() -> KVCache:
        c = KVCache(cfg, 1, 64, dtype=torch.float32, device="cpu", slack=5)
        module(prompt, cache=c)
        return c

    with torch.inference_mode():
        one, many = cache(), cache()
        single = torch.cat([module(draft[:, i:i + 1], torch.tensor([[10 + i]]), one) for i in range(12)], dim=1)
        chunks = [module(draft[:, i:i + 4], torch.arange(10 + i, 14 + i)[None], many) for i in range(0, 12, 4)]
    assert torch.equal(torch.cat(chunks, dim=1), single)


@needs_native
@pytest.mark.parametrize("flags", [["-mno-avx512f"], ["-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c"]],
                         ids=["avx2", "scalar"])
def test_native_kernels_built_for_older_cpus(monkeypatch, flags):
    """Laptops without AVX-512 get the 8-lane AVX2 build, CPUs without AVX2 the scalar loops: the same equality
    and bit-identity checks hold for both."""
    from pathlib import Path

    if flags == ["-mno-avx512f"] and " avx2 " not in Path("/proc/cpuinfo").read_text().replace("\n", " "):
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setattr(kernels, "FLAGS", [*kernels.FLAGS, *flags])
    kernels.library.cache_clear()
    try:
        assert kernels.available()
        for name in ("gemma2", "gemma3-mqa"):
            test_native_decode_step_equals_modules(name)
        test_native_verification_is_bit_identical_to_single_steps("gemma3")
    finally:
        kernels.library.cache_clear()
