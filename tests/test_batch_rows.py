"""The decode-batch kernels (quant/batch.c): products of 2 to 16 rows over Q4_K, Q5_K and Q6_K give every row the
one-row kernel's result bit for bit (prompt lookup and drafts rely on it), equal the gguf dequantization times the
int8-rounded activations, and a batched native decode step gives each row its batch-1 logits, on the default build
and the AVX2 builds with and without VNNI."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from gemmakit.quant import kernels
from gemmakit.quant.qlinear import QWeight
from test_fast_path import (
    _tiny_fast,
    avx2_builds,
    extreme_blocks,
    kernels_built_with,
    needs_native,
    quantize_activations,
    random_blocks,
)

BATCH_TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q4_0, QT.Q5_0, QT.Q8_0]
MOST_ROWS = 16  # blocks.c: qmatmul products of 17 rows and more go through the prefill tiles instead


def _check_rows(qtype: QT, n: int, k: int) -> None:
    """Every row count 1..MOST_ROWS, at two places in the activations: each row equals its one-row call."""
    raw = random_blocks(qtype, n, k, seed=n + k)
    w = QWeight.from_bytes(raw, qtype, n, k)
    ref = torch.from_numpy(dequantize(raw.reshape(-1), qtype).reshape(n, k).astype(np.float32)).double()
    torch.manual_seed(n * k)
    x = torch.randn(MOST_ROWS + 3, k) * 3
    single = torch.cat([w.matmul(x[i : i + 1]) for i in range(len(x))])
    expected = quantize_activations(x) @ ref.T
    assert (single.double() - expected).abs().max() <= 3e-5 * expected.abs().max(), (qtype.name, n, k)
    for m in range(1, MOST_ROWS + 1):
        for start in (0, 3):
            got = w.matmul(x[start : start + m])
            assert torch.equal(got, single[start : start + m]), (qtype.name, n, k, m, start)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qtype", BATCH_TYPES, ids=lambda t: t.name)
def test_batch_rows_equal_the_one_row_kernel(qtype, threads, monkeypatch):
    """Weight rows not a multiple of the tile's 8 or 16 (37, 13, 3); 1, 6 and 9 super-blocks per row (batch.c
    unpacks 4 at a time: a short last block; blocks of 32, 8 quads of 4 blocks); every row count that reaches the
    batch kernels."""
    monkeypatch.setattr(kernels, "native_bf16", lambda *_: False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, k in ((37, 256), (13, 1536), (3, 2304)):
            _check_rows(qtype, n, k)
        if qtype in (QT.Q4_0, QT.Q5_0, QT.Q8_0):  # 640 (5 quads), a short last quad, 8 quads (a tile block) and 1
            for n, k in ((21, 640), (5, 96), (11, 1184)):
                _check_rows(qtype, n, k)
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("qtype", BATCH_TYPES, ids=lambda t: t.name)
def test_batch_sums_at_their_extremes(qtype):
    """Every weight at its largest value against activations all at +-127, 1 to 9 rows: the int16 sums of the AVX2
    build without VNNI are at their bound and must not wrap; each row equals the one-row call."""
    n, k = 19, 512
    w, ref = extreme_blocks(qtype, n, k)
    for sign in (1.0, -1.0):
        x = torch.full((9, k), sign)
        x[1::2] *= -1
        expected = quantize_activations(x) @ ref.T
        got = w.matmul(x)
        assert (got.double() - expected).abs().max() <= 3e-5 * expected.abs().max(), (qtype, sign)
        for m in range(9):
            assert torch.equal(w.matmul(x[m : m + 1])[0], got[m])


@needs_native
def test_decode_batch_rows_equal_batch_one_logits():
    """Native decode steps of 16 rows (fused.STEP_ROWS, the most a native step takes), 9 and 6 give each row
    exactly the logits it gets decoding alone (Q4_K, Q5_K and Q6_K projections among others). Every
    token goes through decode steps from an empty cache, so no prefill product (whose row count differs) enters."""
    from gemmakit.model import KVCache

    module = _tiny_fast("gemma3")
    cfg = module.config
    torch.manual_seed(2)
    steps = torch.randint(0, cfg.vocab_size, (4, 16))

    def decode(rows: list[int]) -> torch.Tensor:
        cache = KVCache(cfg, len(rows), 32, dtype=torch.float32, device="cpu", slack=4)
        with torch.inference_mode():
            out = [
                module(step[rows, None], torch.full((len(rows), 1), t), cache=cache)[:, -1]
                for t, step in enumerate(steps)
            ]
        return torch.stack(out, 1)  # [rows, steps, vocab]

    alone = torch.cat([decode([i]) for i in range(steps.shape[1])])
    assert torch.equal(decode(list(range(16))), alone)
    for rows in ([4, 9, 0, 15, 2, 11], [1, 3, 5, 7, 8, 10, 12, 14, 13]):
        assert torch.equal(decode(rows), alone[rows]), rows


@needs_native
@avx2_builds
def test_batch_rows_on_avx2_builds(flags, monkeypatch):
    """The AVX2 laptop builds (8 x 4 tiles)."""
    with kernels_built_with(flags, monkeypatch):
        for qtype in BATCH_TYPES:
            test_batch_rows_equal_the_one_row_kernel(qtype, 2, monkeypatch)
            test_batch_sums_at_their_extremes(qtype)
        test_decode_batch_rows_equal_batch_one_logits()


def _logits_with_traps(rows: int, n: int) -> torch.Tensor:
    """Random rows and the places a chunked, vectorized arg-max could lose the first maximum."""
    torch.manual_seed(rows * n)
    x = torch.randn(rows, n + 5)[:, :n]  # rows apart by more than their length
    x[1 % rows, n - 1] = 50.0  # in the tail
    if rows > 4:
        x[2, 4097 % n], x[2, 37] = 50.0, 50.0  # a tie: the first one
        x[3, n // 2], x[3, n // 3] = float("nan"), float("nan")  # the first NaN wins, as torch's max
        x[4] = -float("inf")
    return x


@needs_native
@pytest.mark.parametrize("flags", [[], ["-mno-avx512f"]], ids=["native", "avx2"])
@pytest.mark.parametrize("shape", [(1, 262144), (8, 262144), (6, 9001), (3, 1), (5, 4096)])
def test_native_first_max_is_torchs_first_maximum(flags, shape, monkeypatch):
    """quant/argmax.c, the greedy token of generate and the server: the index torch's max(dim=-1) gives, NaNs and
    ties included, on the default and the AVX2 build."""
    from gemmakit.sampling import first_max

    with kernels_built_with(flags, monkeypatch) if flags else nullcontext():
        kernels.library()
        x = _logits_with_traps(*shape)
        native = kernels.first_max(x)
        assert native is not None
        assert torch.equal(native, x.max(dim=-1).indices)
        assert torch.equal(first_max(x), x.max(dim=-1).indices)
        assert kernels.first_max(x.double()) is None and kernels.first_max(x[None]) is None  # torch's, there


@needs_native
@pytest.mark.parametrize("flags", [[], ["-mno-avx512f"]], ids=["native", "avx2"])
def test_prefill_products_of_blocks_of_32_equal_single_rows(flags, monkeypatch):
    """Products of many rows over Q4_0, Q5_0 and Q8_0 (prefill) run on the same tiles, MAX_ROWS rows per unpacking
    (batch.c: 16 on AVX-512, 64 on AVX2): 150 rows, several passes and a short last one, each equal to its row."""
    monkeypatch.setattr(kernels, "native_bf16", lambda *_: False)
    with kernels_built_with(flags, monkeypatch) if flags else nullcontext():
        for qtype in (QT.Q4_0, QT.Q5_0, QT.Q8_0):
            n, k = 21, 640
            w = QWeight.from_bytes(random_blocks(qtype, n, k, seed=5), qtype, n, k)
            torch.manual_seed(5)
            x = torch.randn(150, k) * 3
            single = torch.cat([w.matmul(x[i : i + 1]) for i in range(len(x))])
            assert torch.equal(w.matmul(x), single), qtype.name
