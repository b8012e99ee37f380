"""Without native kernels a GGUF never becomes a silent fp32 copy: int8 rows (or bf16 on CPUs with native bf16),
with a note giving the memory it takes."""

import warnings

import torch

import gemmakit
from gemmakit.quant import fast_path, int8_ref
from gemmakit.quant.int8_ref import Int8RowEmbedding, Int8RowLinear, quantize_rows


def test_quantize_rows_round_trip():
    w = torch.randn(5, 64)
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (5,)
    assert ((q.float() * s[:, None]) - w).abs().max() <= s.max() / 2 + 1e-6
    x = torch.randn(3, 64)
    assert torch.allclose(Int8RowLinear(q, s)(x), x @ (q.float() * s[:, None]).T, atol=1e-4, rtol=1e-4)


def test_without_kernels_a_gguf_loads_as_int8_rows_with_a_memory_note(monkeypatch):
    monkeypatch.setattr(fast_path, "available", lambda: False)
    monkeypatch.setattr(int8_ref, "native_bf16", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = gemmakit.load(progress=False)
    notes = [str(w.message) for w in caught if "reference path" in str(w.message)]
    assert len(notes) == 1 and "int8 weights" in notes[0] and "GB in memory" in notes[0], notes
    layer = model.module.model.layers[0]
    assert isinstance(layer.mlp.down_proj, Int8RowLinear)
    assert isinstance(model.module.model.embed_tokens, Int8RowEmbedding)
    weights = sum(b.numel() * b.element_size() for b in model.module.buffers()) + sum(
        p.numel() * p.element_size() for p in model.module.parameters()
    )
    kind, planned = int8_ref.reference_plan(gemmakit.loader.read_gguf(gemmakit.embedded.embedded_path()))
    assert kind == "int8" and weights <= 1.1 * planned  # ~1 byte a weight, as the note said
    reference = gemmakit.load(progress=False, quant=None)
    ids = reference.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    agree = (model.logits(ids).argmax(-1) == reference.logits(ids).argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
