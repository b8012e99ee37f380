"""Round trips read back by the libraries themselves: `convert --to keras-preset` by keras-hub's from_preset and
`--to orbax` by the gemma library's load_params, each then run by that library's own forward.

Needs the optional `frameworks` extra (keras-hub on the torch backend, gemma==3.3.0 with CPU jax); skipped without.
Marked slow: importing keras (with tensorflow present) and jax takes ~40 s; run with `pytest -m slow`.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest

from framework_fixtures import CASES, DATA, PROMPT, flax_logits_fn, keras_logits
from gemmakit.cli.convert import convert

pytestmark = pytest.mark.slow


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    "name", ["keras-gemma1", "keras-gemma2", "keras-gemma3", "keras-gemma4", "flax-gemma3"]
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_keras_hub_reads_our_presets(name, dtype, tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    src = DATA / name / ("ckpt" if name.startswith("flax") else "")
    out = tmp_path / "preset"
    if name.startswith("keras"):
        convert(
            out=out, model=str(src), to="keras-preset", qtype="f16", adapter=None, variant=None, dtype=dtype
        )
    else:  # a tiny Flax checkpoint needs its GemmaConfig as variant: write through the library function
        import gemmakit
        from gemmakit.weights.keras import write_keras_preset

        m = gemmakit.load(src, dtype="float32", device="cpu", quant=None, progress=False, variant=CASES[name])
        write_keras_preset(out, m.module.state_dict(), m.config, m.tokenizer, dtype=dtype)
    cls = {"gemma3": keras_hub.models.Gemma3CausalLM, "gemma4": keras_hub.models.Gemma4CausalLM}.get(
        CASES[name].family, keras_hub.models.GemmaCausalLM
    )
    lm = cls.from_preset(str(out))  # backbone, weights and tokenizer all load
    assert lm.preprocessor.tokenizer.vocabulary_size() == 512
    backbone = keras_hub.models.Backbone.from_preset(str(out), dtype="float32")
    ref = np.load(DATA / name / "reference.npz")
    assert _rel(keras_logits(backbone, PROMPT), ref["logits"]) <= (1e-4 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("name", ["flax-gemma2", "flax-gemma3", "keras-gemma3"])
def test_gemma_library_reads_our_checkpoints(name, tmp_path):
    pytest.importorskip("orbax.checkpoint")
    gm = pytest.importorskip("gemma.gm")
    import gemmakit
    from gemmakit.weights.orbax import write_orbax

    src = DATA / name / ("ckpt" if name.startswith("flax") else "")
    m = gemmakit.load(
        src,
        dtype="float32",
        device="cpu",
        quant=None,
        progress=False,
        variant=CASES[name] if name.startswith("flax") else None,
    )
    out = write_orbax(tmp_path / "ckpt", m.module.state_dict(), m.config, m.tokenizer)
    assert (out / "tokenizer.model").exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".")
    ]
    params = gm.ckpts.load_params(out)
    ref = np.load(DATA / name / "reference.npz")
    assert _rel(flax_logits_fn(CASES[name], params)(PROMPT), ref["logits"]) <= 1e-4
    again = gemmakit.load(out, dtype="float32", device="cpu", quant=None, progress=False, variant=m.config)
    assert again.tokenizer is not None


def test_sharded_keras_weights(tmp_path):
    """Big presets come as model_0000N.weights.h5 shards listed in model.weights.json: same tensors as one file."""
    keras_hub = pytest.importorskip("keras_hub")
    import gemmakit

    backbone = keras_hub.models.Backbone.from_preset(str(DATA / "keras-gemma2"))
    backbone.save_to_preset(str(tmp_path / "sharded"), max_shard_size=0.0001)  # GB: several shards
    assert len(list((tmp_path / "sharded").glob("model_*.weights.h5"))) > 1
    kw = dict(dtype="float32", device="cpu", quant=None, progress=False)
    a = gemmakit.load(tmp_path / "sharded", **kw).module.state_dict()
    b = gemmakit.load(DATA / "keras-gemma2", **kw).module.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in b)


def test_gemma1_qkv_einsum_against_the_library(tmp_path):
    """A Gemma 1 model with K == N goes out as one qkv_einsum and an untransposed [2, D, F] gating (the library's
    Gemma 1 layout), no post-norms, pre_ffw_norm = HF's post_attention_layernorm: the library's forward agrees."""
    pytest.importorskip("orbax.checkpoint")
    gm = pytest.importorskip("gemma.gm")
    import torch

    import gemmakit
    from gemmakit.config import GemmaConfig
    from gemmakit.loader import build
    from gemmakit.model import Gemma
    from gemmakit.weights.orbax import write_orbax

    cfg = GemmaConfig(
        family="gemma",
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
    )
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) * 0.2 for k, v in Gemma(cfg).state_dict().items()}
    module = build(cfg, state)
    out = write_orbax(tmp_path / "ckpt", module.state_dict(), cfg, None)
    params = gm.ckpts.load_params(out)
    assert params["layer_0"]["attn"]["qkv_einsum"]["w"].shape == (3, 4, 32, 16)
    assert params["layer_0"]["mlp"]["gating_einsum"].shape == (2, 32, 64)
    with torch.no_grad():
        ours = module(torch.tensor([PROMPT]))[0].numpy()
    assert _rel(ours, flax_logits_fn(cfg, params)(PROMPT)) <= 1e-4
    again = gemmakit.load(out, dtype="float32", device="cpu", quant=None, progress=False, variant=cfg)
    with torch.no_grad():
        assert _rel(again.module(torch.tensor([PROMPT]))[0].numpy(), ours) <= 1e-6


def test_nested_layout_saved_by_the_library(tmp_path):
    """A fine-tune saved with gm.ckpts.save_params (NESTED: layer_0/attn/q_einsum/w, mlp without 'w') loads too."""
    pytest.importorskip("orbax.checkpoint")
    gm = pytest.importorskip("gemma.gm")
    import gemmakit

    params = gm.ckpts.load_params(DATA / "flax-gemma3" / "ckpt")  # NESTED in memory
    gm.ckpts.save_params(params, tmp_path / "nested", wait_until_finished=True)
    m = gemmakit.load(
        tmp_path / "nested",
        dtype="float32",
        device="cpu",
        quant=None,
        progress=False,
        variant=CASES["flax-gemma3"],
    )
    import torch

    with torch.no_grad():
        got = m.module(torch.tensor([PROMPT]))[0].numpy()
    assert _rel(got, np.load(DATA / "flax-gemma3" / "reference.npz")["logits"]) <= 1e-4


@pytest.mark.parametrize(
    "change",
    [
        dict(vocab_size=262144, vocab_size_per_layer_input=262144),
        dict(
            attn_logit_softcapping=0.5
        ),  # Gemma4Backbone can soft-cap attention, transformers' Gemma 4 cannot
    ],
    ids=["real-vocabulary", "attention-soft-cap"],
)
def test_gemma4_variants_against_keras_hub(change, tmp_path):
    """The committed keras-gemma4 case at Gemma 4's real vocabulary (262144 rows, also in the per-layer table), and
    with an attention soft-cap, built and saved by keras-hub (bf16): gemmakit fp32 matches keras-hub's own fp32
    forward and greedy tokens."""
    keras_hub = pytest.importorskip("keras_hub")
    import keras
    import torch

    import gemmakit
    from framework_fixtures import keras_gemma4_backbone, randomize_gemma4

    cfg = CASES["keras-gemma4"].replace(**change)
    keras.utils.set_random_seed(0)
    backbone = keras_gemma4_backbone(cfg, "bfloat16")
    randomize_gemma4(backbone)
    backbone.save_to_preset(str(tmp_path / "preset"))
    ref = keras_hub.models.Backbone.from_preset(str(tmp_path / "preset"), dtype="float32")
    m = gemmakit.load(tmp_path / "preset", dtype="float32", device="cpu", quant=None, progress=False)
    assert m.config.replace(name="", max_position_embeddings=256) == cfg
    ids = PROMPT + ([140000, 262143] if cfg.vocab_size == 262144 else [])
    with torch.no_grad():
        ours = m.module(torch.tensor([ids]))[0].numpy()
    theirs = keras_logits(ref, ids)
    assert _rel(ours, theirs) <= 1e-4 and (ours.argmax(-1) == theirs.argmax(-1)).all()
    greedy: list[int] = []
    for _ in range(4):
        with torch.no_grad():
            nxt = int(m.module(torch.tensor([ids + greedy]))[0, -1].argmax())
        assert nxt == int(keras_logits(ref, ids + greedy)[-1].argmax())
        greedy.append(nxt)
