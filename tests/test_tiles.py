"""The prefill tiles (quant/tiles.c): products of many rows over Q4_K, Q5_K and Q6_K equal the gguf dequantization
times the int8-rounded activations, on odd shapes, with 1 and 2 threads, on the default build and the AVX2 builds
with and without VNNI; rows stay independent of how many share the call; decode-sized calls keep their kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from gemmakit.quant import kernels
from gemmakit.quant.qlinear import QWeight
from test_fast_path import (
    avx2_builds,
    extreme_blocks,
    kernels_built_with,
    needs_native,
    quantize_activations,
    random_blocks,
)

TILE_TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K]
TILE_ROWS = 17  # blocks.c: qmatmul products of this many rows go through the tiles


def _check(qtype: QT, n: int, k: int, rows: tuple[int, ...]) -> None:
    raw = random_blocks(qtype, n, k, seed=n + k)
    w = QWeight.from_bytes(raw, qtype, n, k)
    ref = torch.from_numpy(dequantize(raw.reshape(-1), qtype).reshape(n, k).astype(np.float32)).double()
    torch.manual_seed(n * k)
    for m in rows:
        x = torch.randn(m, k) * 3
        got = w.matmul(x).double()
        expected = quantize_activations(x) @ ref.T
        assert (got - expected).abs().max() <= 3e-5 * expected.abs().max(), (qtype.name, n, k, m)
        # within the tiles a row's result does not depend on the row count or its place in a tile
        if m > TILE_ROWS:
            assert torch.equal(w.matmul(x[1:]).double(), got[1:]), (qtype.name, n, k, m)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qtype", TILE_TYPES, ids=lambda t: t.name)
def test_tiles_equal_the_dequantized_product(qtype, threads, monkeypatch):
    """Odd shapes: weight rows not a multiple of the tile's 8 (37, 13, 3), activation rows not a multiple of its 4,
    several super-blocks per row, more than one task per thread."""
    monkeypatch.setattr(kernels, "native_bf16", lambda *_: False)  # the int8 path at every length
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, k in ((37, 256), (13, 1536), (3, 512)):
            _check(qtype, n, k, (TILE_ROWS, 18, 35, 70))
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("qtype", TILE_TYPES, ids=lambda t: t.name)
def test_tile_sums_at_their_extremes(qtype, monkeypatch):
    """Every weight at its largest value against activations all at +-127: the int16 sums of the AVX2 build
    without VNNI are at their bound and must not wrap. Exact against the dequantized weights."""
    monkeypatch.setattr(kernels, "native_bf16", lambda *_: False)
    n, k = 11, 512
    w, ref = extreme_blocks(qtype, n, k)
    for sign in (1.0, -1.0):
        x = torch.full((TILE_ROWS + 3, k), sign)
        expected = quantize_activations(x) @ ref.T
        assert (w.matmul(x).double() - expected).abs().max() <= 3e-5 * expected.abs().max(), (qtype, sign)


@needs_native
def test_decode_sized_calls_keep_their_kernels():
    """Below TILE_ROWS (batches, draft verification) a row's result equals the one-row call bit for bit."""
    raw = random_blocks(QT.Q4_K, 24, 512)
    w = QWeight.from_bytes(raw, QT.Q4_K, 24, 512)
    x = torch.randn(TILE_ROWS - 1, 512)
    got = w.matmul(x)
    for m in (0, 7, TILE_ROWS - 2):
        assert torch.equal(w.matmul(x[m : m + 1])[0], got[m])


@needs_native
@avx2_builds
def test_tiles_on_avx2_builds(flags, monkeypatch):
    """The AVX2 laptop builds (8 x 4 tiles)."""
    with kernels_built_with(flags, monkeypatch):
        for qtype in TILE_TYPES:
            test_tiles_equal_the_dequantized_product(qtype, 2, monkeypatch)
            test_tile_sums_at_their_extremes(qtype, monkeypatch)
        test_decode_sized_calls_keep_their_kernels()
