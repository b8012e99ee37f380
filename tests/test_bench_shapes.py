"""bench/shapes.py: real-width test GGUFs from random weights (the recipe behind the real-shape benchmarks)."""

from __future__ import annotations

import torch

import gemmakit
from gemmakit.bench import shapes
from gemmakit.config import preset
from helpers import TINY4


def test_shortened_keeps_widths_and_a_kv_sharing_llama_cpp_can_write():
    e2b = preset("gemma-4-e2b")
    cfg = shapes.shortened(e2b, layers=10, vocab=65536)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (e2b.hidden_size, e2b.intermediate_size,
                                                                       e2b.head_dim)
    assert cfg.num_hidden_layers == 10 and cfg.layer_types[-1] == "full_attention"
    assert cfg.vocab_size == cfg.vocab_size_per_layer_input == 65536
    assert cfg.num_kv_shared_layers == 5  # ~20/35 of 10, starting after the global layer 4
    assert cfg.layer_types[10 - cfg.num_kv_shared_layers - 1] == "full_attention"
    assert shapes.shortened(e2b) is e2b


def test_make_writes_a_loadable_f16_gguf(tmp_path):
    """gemma-3-270m cut to 2 layers and 512 tokens: the file loads on the fast path and gives finite logits; norms
    scale by 1 (Gemma 1-3 store 0, Gemma 4 stores 1)."""
    out = shapes.make("gemma-3-270m", tmp_path / "m.gguf", "F16", layers=2, vocab=512)
    m = gemmakit.load(out, progress=False)
    assert m.config.num_hidden_layers == 2 and m.config.vocab_size == 512
    assert torch.isfinite(m.logits([2, 10, 11, 12])).all()
    g4 = shapes.random_state(TINY4["gemma4-moe"])
    assert all(float(v.float().mean()) == 1.0 for k, v in g4.items() if k.endswith(("norm.weight", "scale")))
