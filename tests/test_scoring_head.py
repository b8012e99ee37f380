"""The tied head's second pass when many positions are scored (QEmbedding.attend, SCORE_ROWS): what the int8
rounding of the activations left out is multiplied too, so scored logits come near the exact product; decode
batches (up to 16 rows) keep the one product, whose values must not depend on the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from gemmakit.quant import kernels
from gemmakit.quant.qlinear import SCORE_ROWS, QEmbedding, QWeight, quantize_q8

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: native kernels not built")


def _head(n: int = 512, k: int = 640) -> tuple[QEmbedding, torch.Tensor]:
    torch.manual_seed(0)
    raw = quantize_q8(torch.randn(n, k).numpy())
    w = QWeight.from_bytes(raw, QT.Q8_0, n, k)
    exact = torch.from_numpy(dequantize(raw.reshape(-1), QT.Q8_0).reshape(n, k).astype(np.float64))
    return QEmbedding(w), exact


def test_scored_positions_come_near_the_exact_product(monkeypatch):
    """Int8 kernels (bf16 products switched off): the error against the float64 product of the same weights
    shrinks by well over 10x with the second pass."""
    monkeypatch.setattr(kernels, "native_bf16", lambda *_: False)
    emb, exact = _head()
    h = torch.randn(1, 40, 640) * torch.linspace(0.1, 10, 640)  # uneven units, as hidden states are
    with torch.no_grad():
        scored = emb.attend(h, score=True)[0].double()
        one_pass = emb.head(h)[0].double()
    want = h[0].double() @ exact.T
    err_scored, err_one = (scored - want).abs().max(), (one_pass - want).abs().max()
    assert err_scored * 10 < err_one, (err_scored, err_one)


def test_decode_batches_keep_one_product():
    """Fewer than SCORE_ROWS rows, even scored: exactly the one product (each row as it is alone)."""
    emb, _ = _head()
    h = torch.randn(SCORE_ROWS - 1, 1, 640)
    with torch.no_grad():
        got = emb.attend(h, score=True)
    assert torch.equal(got, emb.head(h))
    assert torch.equal(got[3], emb.head(h[3:4])[0])


def test_drafts_to_verify_keep_one_product(monkeypatch):
    """Many rows that are not scored (8 sequences verifying 8 drafts each): the one product, so a verified token's
    logits are its single step's."""
    monkeypatch.setattr(kernels, "native_bf16", lambda *_: False)
    emb, _ = _head()
    h = torch.randn(8, 9, 640)
    with torch.no_grad():
        got = emb.attend(h)
    assert torch.equal(got, emb.head(h))
