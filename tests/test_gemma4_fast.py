"""Gemma 4 on the fast path: a quantized Gemma 4 GGUF (quant="auto") and quant="q8" run every matrix over its own
blocks (attention, MLP, per-layer embeddings and gates, router, each expert's slice of the 3-D expert tensors) with
the PyTorch layers around them.

Random tiny models (helpers.TINY4, widened so every matrix is whole 32-value units): E-style (per-layer embeddings,
KV sharing, double-wide MLP), dense with k_eq_v, MoE. Bounds are relative to the largest |logit| or |output|.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

import gemmakit
from finetune_helpers import tiny_tokenizer
from gemmakit.generate import generate_step, lookup_step
from gemmakit.loader import GemmaNote, build
from gemmakit.model import KVCache
from gemmakit.quant import kernels
from gemmakit.quant.experts import QExperts, expert_slices
from gemmakit.quant.qlinear import QEmbedding, QLinear, QWeight
from gemmakit.sampling import SamplingParams
from gemmakit.weights import writers
from gemmakit.weights.gguf import read_gguf
from gemmakit.weights.names import hf_to_gguf
from helpers import TINY4, hf_model
from test_fast_path import quantize_activations

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: native kernels not built")
KINDS = ["gemma4-e", "gemma4-dense-keqv", "gemma4-moe"]
# Per-layer widths in whole 32-value units (the kernels' activation unit): PLE 8 -> 32, expert width 24 -> 32.
WIDE = dict(hidden_size_per_layer_input=32, moe_intermediate_size=32)
PROMPTS = [[2, 5, 9, 100, 7, 8, 9, 10, 11, 12, 13], [2, 300], [2, 40, 41, 42, 43, 44]]
# A layer's int8-activation cost: each block's output on the reference path's own inputs, fast vs reference.
BLOCK_BUDGET = 4e-2  # measured 0.9-1.3% dense and E-style, 2.2-2.6% MoE (Q8_0); K-quants: see below


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def tiny(kind: str, **overrides):
    """TINY4[kind] widened to whole units (WIDE, where the kind has that part), then `overrides`."""
    cfg = TINY4[kind]
    return cfg.replace(**{**{k: v for k, v in WIDE.items() if getattr(cfg, k)}, **overrides})


def write(path, cfg, qtype: str = "q8_0", seed: int = 0):
    state = {k: v for k, v in hf_model(cfg, seed).state_dict().items() if k != "lm_head.weight"}
    return writers.write_gguf(path, build(cfg, state).state_dict(), cfg, tiny_tokenizer(512), qtype=qtype)


def load_both(path):
    """(fast path, reference path) of one GGUF; the fast load must not warn (no reference-path note)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", GemmaNote)
        fast = gemmakit.load(path, progress=False)
    return fast, gemmakit.load(path, quant=None, progress=False)


@pytest.fixture(scope="module", params=KINDS)
def q8(request, tmp_path_factory):
    cfg = tiny(request.param)
    return (cfg, *load_both(write(tmp_path_factory.mktemp(request.param) / "m.q8_0.gguf", cfg)))


@contextmanager
def reference_routes(fast, ref, ids):
    """While inside, each fast MoE layer routes as the reference layer did on `ids` (a no-op without experts)."""
    routes = []
    hooks = [b.router.register_forward_hook(lambda _m, _a, out: routes.append(out))
             for b in ref.model.layers if b.moe]
    with torch.inference_mode():
        ref(ids)
    for h in hooks:
        h.remove()
    hooks = [b.router.register_forward_hook(lambda _m, _a, _o, r=r: r)
             for b, r in zip([b for b in fast.model.layers if b.moe], routes, strict=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def block_errors(fast, ref, ids) -> list[float]:
    """Each layer of the fast model run on exactly the inputs (and MoE routes) the reference layer saw: its
    relative error."""
    calls = []
    hooks = [b.register_forward_hook(lambda _m, args, out: calls.append((args, out))) for b in ref.model.layers]
    with torch.inference_mode():
        ref(ids)
    for h in hooks:
        h.remove()
    errors = []
    with reference_routes(fast, ref, ids), torch.inference_mode():
        for block, (args, out) in zip(fast.model.layers, calls, strict=True):
            x, rope, pos, cache, masks, shared, *rest = args  # rest: the per-layer input (and text spans)
            errors.append(rel(block(x, rope, pos, cache, dict(masks), dict(shared), *rest), out))
    return errors


def test_every_matrix_runs_over_the_files_blocks(q8):
    """No nn.Linear or nn.Embedding is left; every QWeight is a view of the mapped file at its tensor's offset,
    each expert at its slice of the 3-D tensor; the router stays F32 (as llama.cpp writes and keeps it)."""
    cfg, fast, _ = q8
    m = fast.module
    assert not [n for n, x in m.named_modules() if type(x) in (torch.nn.Linear, torch.nn.Embedding)]
    assert isinstance(m.model.embed_tokens, QEmbedding) and m.fused_decode is not None
    if cfg.hidden_size_per_layer_input:
        assert isinstance(m.model.embed_tokens_per_layer, QEmbedding)
    g = read_gguf(fast.source)
    pointers, offsets = [], []
    for name, x in m.named_modules():
        if isinstance(x, QLinear) and not name.endswith(".head"):
            gname = hf_to_gguf(f"{name}.weight", "gemma4")
            pointers.append(x.qweight.data.data_ptr())
            offsets.append(g.tensors[gname].offset)
            assert x.qweight.qtype == g.tensors[gname].qtype
            assert x.qweight.qtype == (QT.F32 if name.endswith("router.proj") else QT.Q8_0)
        if isinstance(x, QExperts):
            for kind, slices in (("gate_up_proj", x.gate_up), ("down_proj", x.down)):
                t = g.tensors[hf_to_gguf(f"{name}.{kind}", "gemma4")]
                assert t.qtype == QT.Q8_0 and len(slices) == cfg.num_experts
                for e, w in enumerate(slices):
                    pointers.append(w.data.data_ptr())
                    offsets.append(t.offset + e * t.n_bytes // cfg.num_experts)
    assert [p - pointers[0] for p in pointers] == [o - offsets[0] for o in offsets]  # one mapping, no copies
    assert any(isinstance(x, QExperts) for x in m.modules()) == cfg.enable_moe_block


@pytest.mark.parametrize("kind", KINDS)
def test_float_blocks_give_the_reference_logits(kind, tmp_path):
    """An f32 GGUF on the fast path multiplies fp32 activations: per-layer embeddings, shared KV, the router and the
    expert slices wired exactly as the reference path (only summation order differs; measured <= 2.6e-5)."""
    fast, ref = load_both(write(tmp_path / "m.gguf", tiny(kind), "f32"))
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    assert rel(fast.logits(ids), ref.logits(ids)) <= 1e-4


def test_int8_activations_cost_little_per_layer_and_end_to_end(q8):
    """Q8_0 blocks: each layer within the int8 budget of the reference layer on the same inputs (MoE layers with the
    reference's routes; the F32 router picks the reference's experts from the same input). End to end, these random
    models amplify any difference ~x1.5-2 per layer (sharp softmaxes without query scaling): the dense and E-style
    ones are held to 12% of the largest logit (measured 2.9-6.3%) and 85% greedy agreement (measured 90-100%).
    The random MoE model amplifies more, and a route flipped at a near-tie swaps an expert: measured 22-51% end to
    end (6-30% with the reference's routes), greedy agreement 62-98%; no end-to-end bound is set for it."""
    cfg, fast, ref = q8
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    assert max(block_errors(fast.module, ref.module, ids)) <= BLOCK_BUDGET
    if cfg.enable_moe_block:
        h = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
        for a, b in zip(fast.module.model.layers, ref.module.model.layers, strict=True):
            (wa, ia), (wb, ib) = a.router(h), b.router(h)
            assert torch.equal(ia, ib) and rel(wa, wb) <= 1e-6
        return
    got, expected = fast.logits(ids), ref.logits(ids)
    assert rel(got, expected) <= 0.12
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.85


def test_moe_multiplies_only_the_routed_experts(q8, monkeypatch):
    """A decode step of two sequences on the module path (QExperts): per layer, exactly the experts the router chose
    for them are multiplied, each once for gate/up and once for down, and no other expert's blocks are read. (The
    native step, decode_gemma4.c, multiplies the same set: each used expert's rows once.)"""
    cfg, fast, _ = q8
    if not cfg.enable_moe_block:
        pytest.skip("no experts")
    m = fast.module
    monkeypatch.setattr(m, "fused_decode", None)
    owner = {}
    for i, b in enumerate(m.model.layers):
        for e, (gu, dn) in enumerate(zip(b.experts.gate_up, b.experts.down, strict=True)):
            owner[gu.data.data_ptr()], owner[dn.data.data_ptr()] = (i, e, "gate_up"), (i, e, "down")
    multiplied, routed = [], [set() for _ in m.model.layers]
    original = QWeight.matmul

    def counting(self, x):
        if self.data.data_ptr() in owner:
            multiplied.append(owner[self.data.data_ptr()])
        return original(self, x)

    cache = KVCache(cfg, 2, 32, dtype=torch.float32, device="cpu")
    with torch.inference_mode():
        m(torch.tensor([PROMPTS[0][:6], PROMPTS[2]]), cache=cache)
        monkeypatch.setattr(QWeight, "matmul", counting)
        hooks = [b.router.register_forward_hook(lambda _m, _a, out, i=i: routed[i].update(out[1].flatten().tolist()))
                 for i, b in enumerate(m.model.layers)]
        m(torch.tensor([[17], [18]]), torch.tensor([[6], [6]]), cache)
    for h in hooks:
        h.remove()
    assert len(multiplied) == len(set(multiplied))  # each routed expert once per step, whatever its token count
    for i, used in enumerate(routed):
        assert cfg.top_k_experts <= len(used) <= 2 * cfg.top_k_experts  # the set equality below: no other expert
        for part in ("gate_up", "down"):
            assert {e for layer, e, p in multiplied if layer == i and p == part} == used


def test_expert_slices_of_k_quant_blocks_and_row_independence():
    """Experts over K-quant bytes (256-value super-blocks): expert e's products equal its dequantized slice times
    the int8-rounded activations, and a token's expert output does not depend on how many tokens share the call
    (what keeps batched decoding and verified drafts equal to single steps)."""
    from test_fast_path import random_blocks

    e, d, inter = 3, 256, 256
    for qtype in (QT.Q4_K, QT.Q6_K, QT.Q5_0):
        raw = {n: np.stack([random_blocks(qtype, rows, cols, seed=10 * i + rows) for i in range(e)])
               for n, (rows, cols) in (("gate_up", (2 * inter, d)), ("down", (d, inter)))}
        experts = QExperts(expert_slices(torch.from_numpy(raw["gate_up"]), qtype, e, 2 * inter, d),
                           expert_slices(torch.from_numpy(raw["down"]), qtype, e, d, inter))
        x = torch.randn(5, d)
        for i, w in enumerate(experts.gate_up):
            ref = torch.from_numpy(dequantize(raw["gate_up"][i].reshape(-1), qtype).reshape(2 * inter, d)).double()
            expected = quantize_activations(x) @ ref.T
            assert (w.matmul(x).double() - expected).abs().max() <= 3e-5 * expected.abs().max()
            out = experts.expert(i, x)
            assert all(torch.equal(experts.expert(i, x[j:j + 1])[0], out[j]) for j in range(5))


def test_batched_rows_joining_and_prompt_lookup_give_single_greedy_tokens(q8):
    """Greedy tokens: 3 prompts batched = each alone; prompt lookup (drafts verified in one forward, rejected ones
    rolled back) = plain greedy. The products are row-independent (test above); attention and norms are torch's,
    whose summation order may differ with the row count, so a verified draft's logits equal single steps' within
    rounding (measured <= 6.4e-3 relative after int8 re-rounding), not bit for bit: greedy could only differ at a
    near-tie of that size."""
    _, fast, _ = q8
    m = fast.module
    batched = torch.stack(list(generate_step(m, PROMPTS, SamplingParams(), 12)), 1).tolist()
    single = [[int(t) for t in generate_step(m, [p], SamplingParams(), 12)] for p in PROMPTS]
    assert batched == single
    copy = [2, 5, 9, 100, 7, 8, 9, 10, 11, 5, 9, 100, 7, 8, 9, 10, 11, 5, 9, 100]
    plain = [int(t) for t in generate_step(m, [copy], SamplingParams(), 20)]
    assert [int(t) for t in lookup_step(m, copy, 20, 6)] == plain


def test_server_continuous_batching(q8):
    """The server's engine on the fast path: requests admitted into free rows while others decode get the tokens
    they get alone."""
    from gemmakit.serve.engine import Engine, Job, wait_idle

    _, fast, _ = q8
    expected = [[int(t) for t in generate_step(fast.module, [p], SamplingParams(), 10)] for p in PROMPTS]
    engine = Engine(fast, max_batch=2, context=64)  # 3 jobs on 2 rows: the third joins when one finishes
    got: list[list[int]] = [[], [], []]
    done = threading.Event()

    def sink(i):
        def put(ev):
            got[i] += [t.id for t in ev.tokens]
            if ev.finish_reason is not None and all(len(g) == 10 for g in got):
                done.set()
        return put

    engine.start()
    try:
        engine.submit([Job(p, 10, sink(i), ignore_eos=True, logprobs=0) for i, p in enumerate(PROMPTS)])
        assert done.wait(60) and wait_idle(engine)
    finally:
        engine.stop()
    assert got == expected and engine.peak_batch == 2


# ---- K-quants and quant="q8" -----------------------------------------------------------------------------------


def _k_quant_writer(original):
    """writers._add_tensor that writes random Q4_K / Q6_K blocks (scaled to ~N(0, 0.05) weights) for every matrix
    whose rows are whole 256-value super-blocks: gguf has no K-quant quantizer, and the fast and reference paths
    read the same bytes, so random blocks test the kernels and expert slicing as real ones would."""
    rng = np.random.default_rng(0)

    def add(writer, name, data, qtype):
        if data.ndim < 2 or data.shape[-1] % 256 or name.endswith("ffn_gate_inp.weight"):
            return original(writer, name, data, qtype)
        kind = QT.Q6_K if "down" in name or "output" in name else QT.Q4_K
        block, size = GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 256, size=(*data.shape[:-1], data.shape[-1] // block, size), dtype=np.uint8)
        d = rng.uniform(0.5, 1.5, raw.shape[:-1]).astype(np.float16)
        if kind == QT.Q6_K:  # w = d * sc * (q - 32): sc int8, q 0..63
            raw[..., 208:210] = (d * 4e-5).astype(np.float16).view(np.uint8).reshape(*raw.shape[:-1], 2)
        else:  # w = d * sc * q - dmin * m: sc, m 6-bit, q 0..15; dmin = 7.5 d centres the weights
            raw[..., 0:2] = (d * 2e-4).astype(np.float16).view(np.uint8).reshape(*raw.shape[:-1], 2)
            raw[..., 2:4] = (d * 1.5e-3).astype(np.float16).view(np.uint8).reshape(*raw.shape[:-1], 2)
        writer.add_tensor(name, raw.reshape(*data.shape[:-1], -1), raw_dtype=kind)

    return add


@pytest.mark.parametrize("kind", ["gemma4-e", "gemma4-moe"])
def test_k_quant_gguf_within_the_int8_budget(kind, tmp_path, monkeypatch):
    """A Gemma 4 GGUF whose matrices are Q4_K / Q6_K (widths of 256: hidden 256, heads 4 x 64 / 4 x 128, PLE 256,
    experts 4 x 256): every one of them is a QLinear/QExperts over its own blocks, each layer within the budget."""
    wide = {k: 256 for k in ("hidden_size_per_layer_input", "moe_intermediate_size") if getattr(TINY4[kind], k)}
    cfg = tiny(kind, hidden_size=256, intermediate_size=256, head_dim=64, global_head_dim=128, **wide)
    monkeypatch.setattr(writers, "_add_tensor", _k_quant_writer(writers._add_tensor))
    fast, ref = load_both(write(tmp_path / "m.gguf", cfg))
    types = {x.qweight.qtype for x in fast.module.modules() if isinstance(x, QLinear)}
    types |= {w.qtype for x in fast.module.modules() if isinstance(x, QExperts) for w in x.gate_up + x.down}
    assert {QT.Q4_K, QT.Q6_K} <= types
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(4))
    assert max(block_errors(fast.module, ref.module, ids)) <= BLOCK_BUDGET


def test_q8_on_a_gemma4_folder(tmp_path):
    """quant="q8" on a float Gemma 4 (HF folder): Q8_0 projections, embeddings and experts, an F32 router, and
    each layer within the int8 budget of the float model."""
    cfg = tiny("gemma4-moe", hidden_size_per_layer_input=32, vocab_size_per_layer_input=512,
               num_kv_shared_layers=4, use_double_wide_mlp=True)  # MoE and E-style together
    hf_model(cfg).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GemmaNote)
        fast = gemmakit.load(tmp_path, quant="q8", progress=False)
    ref = gemmakit.load(tmp_path, quant=None, progress=False)
    layer = fast.module.model.layers[0]
    assert isinstance(layer.experts, QExperts) and layer.experts.gate_up[0].qtype == QT.Q8_0
    assert layer.router.proj.qweight.qtype == QT.F32 and layer.per_layer_projection.qweight.qtype == QT.Q8_0
    assert isinstance(fast.module.model.embed_tokens_per_layer, QEmbedding)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(5))
    assert max(block_errors(fast.module, ref.module, ids)) <= BLOCK_BUDGET
    assert len(list(generate_step(fast.module, [[2, 40, 41]], SamplingParams(), 4))) == 4  # decodes (ids only: no
    # tokenizer in this folder)
