"""Presets build at real shapes (on the meta device: no memory) with the official parameter counts."""

from __future__ import annotations

import pytest
import torch

from gemmakit.config import PRESETS, from_hf
from gemmakit.model import Gemma
from helpers import hf_model  # noqa: F401  (sets offline env)

# Published parameter counts (HF model cards / gemma_pytorch): embedding counted once (tied).
OFFICIAL = {"gemma-2b": 2_506_172_416, "gemma-7b": 8_537_680_896}


def meta_params(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Gemma(cfg).parameters())


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_seed_models_official_counts(name):
    assert meta_params(PRESETS[name]) == OFFICIAL[name] == PRESETS[name].num_params()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_matches_transformers(name):
    import transformers

    cfg = PRESETS[name]
    hc = transformers.AutoConfig.for_model(**cfg.to_hf())
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(hc)
    assert meta_params(cfg) == sum(p.numel() for p in ref.parameters())
    assert from_hf(cfg.to_hf()).replace(name=cfg.name) == cfg
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Gemma(cfg).state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert shapes == ref_shapes
