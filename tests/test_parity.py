"""Parity with transformers on random tiny configs of every generation, through the production load path."""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.generate import generate_step, left_pad
from gemmakit.model import KVCache
from gemmakit.sampling import SamplingParams
from helpers import TINY, assert_close, batched_and_single, cached_logits, greedy_tokens, hf_model


@pytest.fixture(scope="module", params=list(TINY))
def pair(request, tmp_path_factory):
    """(transformers model, gemmakit Model loaded from the HF folder that transformers saved)."""
    cfg = TINY[request.param]
    ref = hf_model(cfg)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, gemmakit.load(folder, progress=False), cfg


def test_config_round_trips(pair):
    _, model, cfg = pair
    assert model.config.replace(name="") == cfg.replace(name="")


def test_logits_match_longer_than_window(pair):
    ref, model, _ = pair
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    got = model.logits(ids)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert_close(got, expected, ulps=512)


def test_single_sequence_shape(pair):
    _, model, _ = pair
    out = model.logits([2, 5, 6, 7])
    assert out.shape == (4, model.config.vocab_size)


def test_cache_decoding_equals_full_forward(pair):
    """Prefill 5 tokens, then one token at a time through the KV cache (ring buffers wrap at W=8)."""
    _, model, _ = pair
    m = model.module
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model.logits(ids)
    steps, chunks = cached_logits(m, model.config, ids)  # and a chunked prefill (chunks longer than the window)
    assert_close(steps, full)
    assert_close(chunks, full)


def test_greedy_continuation_identical(pair):
    ref, model, _ = pair
    expected, got = greedy_tokens(ref, model.module)
    assert got == expected


def test_left_padded_batch_equals_single_runs(pair):
    _, model, _ = pair
    batched, single = batched_and_single(model.module)
    assert batched == single


def test_ragged_logits_batch(pair):
    _, model, _ = pair
    a, b = [2, 5, 6, 7, 8], [2, 9]
    out = model.logits([a, b])
    assert out.shape == (2, 5, model.config.vocab_size)
    assert_close(out[1, :2], model.logits(b))
    assert out[1, 2:].abs().max() == 0


def test_left_pad_positions():
    ids, pos = left_pad([[5, 6, 7], [8]], 0, torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert pos.tolist() == [[0, 1, 2], [-1, -1, 0]]


def test_rows_join_at_different_times(pair):
    """Continuous batching: a sequence prefilled into a free cache row mid-way decodes exactly as alone."""
    _, model, _ = pair
    m, cfg = model.module, model.config
    a, b = [2, 5, 9, 100, 7, 8, 9, 10, 11], [2, 300, 301]
    alone = {tuple(p): [int(t) for t in generate_step(m, [p], SamplingParams(), 14)] for p in (a, b)}
    cache = KVCache(cfg, 2, 40, dtype=torch.float32, device="cpu")
    out = {0: [], 1: []}
    with torch.no_grad():
        nxt = m(torch.tensor([a]), cache=cache, rows=[0], last_only=True)[:, -1].argmax(-1)
        out[0].append(int(nxt))
        for _ in range(5):  # row 0 decodes alone
            pos = torch.tensor([[len(a) + len(out[0]) - 1]])
            nxt = m(nxt[:, None], pos, cache, rows=[0])[:, -1].argmax(-1)
            out[0].append(int(nxt))
        nb = m(torch.tensor([b]), cache=cache, rows=[1], last_only=True)[:, -1].argmax(-1)
        out[1].append(int(nb))
        for _ in range(8):  # both decode together, each at its own column and position
            toks = torch.tensor([[out[0][-1]], [out[1][-1]]])
            pos = torch.tensor([[len(a) + len(out[0]) - 1], [len(b) + len(out[1]) - 1]])
            nxt = m(toks, pos, cache)[:, -1].argmax(-1)
            out[0].append(int(nxt[0]))
            out[1].append(int(nxt[1]))
    assert out[0] == alone[tuple(a)][:14]
    assert out[1] == alone[tuple(b)][:9]


@pytest.mark.parametrize("name", ["gemma1", "gemma3"])
def test_gemma_pytorch_ckpt_loads_with_same_logits(name, tmp_path):
    """A gemma_pytorch .ckpt (fused qkv_proj, `embedder`, query/key_norm names, RoPE buffers) gives HF's logits;
    its int8 variant (weight + weight_scaler) loads too."""
    cfg = TINY[name]
    ref = hf_model(cfg)
    sd = ref.state_dict()
    ckpt, int8 = {}, {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        if k.endswith("self_attn.q_proj.weight"):
            base = k.removesuffix("q_proj.weight")
            v = torch.cat([v, sd[base + "k_proj.weight"], sd[base + "v_proj.weight"]])
            k = base + "qkv_proj.weight"
        elif k.endswith(("k_proj.weight", "v_proj.weight")):
            continue
        k = k.replace("model.embed_tokens", "embedder").replace("q_norm", "query_norm").replace("k_norm", "key_norm")
        ckpt[k] = v
        if v.dim() == 2:
            scale = v.abs().amax(1) / 127
            int8[k], int8[k.replace(".weight", ".weight_scaler")] = (v / scale[:, None]).round().to(torch.int8), scale
        else:
            int8[k] = v
    ckpt["freqs_cis"] = torch.zeros(4, dtype=torch.complex64)
    torch.save({"model_state_dict": ckpt}, tmp_path / "model.ckpt")
    torch.save({"model_state_dict": int8}, tmp_path / "model-int8.ckpt")
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids).logits[0]
    got = gemmakit.load(tmp_path / "model.ckpt", variant=cfg, quant=None, progress=False).logits(ids[0])
    assert_close(got, expected, ulps=512)
    q = gemmakit.load(tmp_path / "model-int8.ckpt", variant=cfg, quant=None, progress=False).logits(ids[0])
    assert (q - expected).abs().max().item() < 0.1 * expected.abs().max().item()
