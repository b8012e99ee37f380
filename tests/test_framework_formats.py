"""keras-hub presets and gemma-library Flax/Orbax checkpoints: parity with the libraries' own forwards, traps, writers.

The fixtures under tests/data/frameworks/ were saved by keras-hub 0.32 and gemma 3.3.0 themselves (bf16 weights),
with each library's fp32 logits and greedy tokens (tests/framework_fixtures.py); no keras or jax is needed here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import gemmakit
from framework_fixtures import CASES, DATA
from gemmakit.config import GLOBAL, SLIDING, preset
from gemmakit.errors import GemmaError
from gemmakit.loader import load_tokenizer, sniff
from gemmakit.model import Gemma
from gemmakit.weights.keras import config_from_keras, read_keras_state_dict, write_keras_preset
from gemmakit.weights.orbax import orbax_config, orbax_to_hf, orbax_tree, read_orbax_state_dict

BIN = Path(sys.executable).parent


def _source(name: str) -> Path:
    return DATA / name / ("ckpt" if name.startswith("flax") else "")


def _load(name: str, **kw) -> gemmakit.Model:
    variant = CASES[name] if name.startswith("flax") else None
    return gemmakit.load(
        _source(name), dtype="float32", device="cpu", quant=None, progress=False, variant=variant, **kw
    )


def _logits(module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.tensor([ids]))
    return (out if isinstance(out, torch.Tensor) else out[0])[0].float().numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_the_library_forward(name):
    """fp32, quant=None: rel max-abs logit diff <= 1e-4, top-1 agreement 1.0, the library's greedy tokens."""
    ref = np.load(DATA / name / "reference.npz")
    m = _load(name)
    ids = ref["ids"].tolist()
    got = _logits(m.module, ids)
    assert np.abs(got - ref["logits"]).max() / np.abs(ref["logits"]).max() <= 1e-4
    assert (got.argmax(-1) == ref["logits"].argmax(-1)).all()
    greedy: list[int] = []
    for _ in range(len(ref["greedy"])):
        greedy.append(int(_logits(m.module, ids + greedy)[-1].argmax()))
    assert greedy == ref["greedy"].tolist()
    assert m.tokenizer is not None and m.tokenizer.vocab_size == 512
    if name.startswith("keras"):  # the whole config comes from config.json and the backbone class
        assert m.config.replace(name="", max_position_embeddings=256) == CASES[name]


def test_keras_traps_in_the_config():
    """intermediate_dim is gate+up in GemmaBackbone, one width in Gemma3Backbone; query_head_dim_normalize=False is
    (hidden/heads)**-0.5; sliding layers and RoPE bases come from the class."""
    raw = {n: json.loads((DATA / n / "config.json").read_text()) for n in ("keras-gemma2", "keras-gemma3")}
    assert (
        raw["keras-gemma2"]["config"]["intermediate_dim"] == 128
        and raw["keras-gemma3"]["config"]["intermediate_dim"] == 64
    )
    g2, g3 = config_from_keras(raw["keras-gemma2"]), config_from_keras(raw["keras-gemma3"])
    assert g2.intermediate_size == g3.intermediate_size == 64
    assert g2.layer_types == (SLIDING, GLOBAL) * 2 and (g2.rope_theta, g2.sliding_window) == (1e4, 4)
    assert g3.layer_types == (SLIDING,) * 5 + (GLOBAL, SLIDING)
    assert (g3.rope_theta, g3.rope_local_base_freq, g3.rope_scaling_factor) == (1e6, 1e4, 8.0)
    raw["keras-gemma2"]["config"]["query_head_dim_normalize"] = False
    assert config_from_keras(raw["keras-gemma2"]).query_pre_attn_scalar == 32 // 4  # not head_dim 16
    raw["keras-gemma2"]["config"]["use_post_ffw_norm"] = False
    with pytest.raises(GemmaError, match="only one of"):
        config_from_keras(raw["keras-gemma2"])
    raw["keras-gemma3"]["config"]["use_query_key_norm"] = False
    with pytest.raises(GemmaError, match="use_query_key_norm"):
        config_from_keras(raw["keras-gemma3"])
    with pytest.raises(GemmaError, match="PaliGemmaBackbone"):
        config_from_keras({"class_name": "PaliGemmaBackbone", "config": {}})
    with pytest.raises(GemmaError, match="lacks vocabulary_size"):
        config_from_keras({"class_name": "Gemma4Backbone", "config": {}})


@pytest.mark.parametrize("name", ["keras-gemma1", "keras-gemma2"])
def test_keras_pre_ffw_norm_and_bf16_bits(name):
    """pre_ffw_norm is HF's post_attention_layernorm in Gemma 1, pre_feedforward_layernorm in Gemma 2; bf16 blobs are
    read bit for bit."""
    folder = DATA / name
    with h5py.File(folder / "model.weights.h5") as f:
        ds = f["layers/gemma_decoder_block_1/pre_ffw_norm/vars/0"]
        assert ds.dtype.kind == "V" and ds.attrs["dtype"] == "bfloat16"
        bits = torch.from_numpy(ds[()].view(np.int16))
    cfg = CASES[name]
    state = read_keras_state_dict(folder, cfg, dtype=torch.bfloat16)
    hf = "post_attention_layernorm" if cfg.family == "gemma" else "pre_feedforward_layernorm"
    assert torch.equal(state[f"model.layers.1.{hf}.weight"].view(torch.int16), bits)
    if cfg.family == "gemma2":
        assert not torch.equal(
            state["model.layers.1.post_attention_layernorm.weight"].view(torch.int16), bits
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["keras-gemma1", "keras-gemma3", "keras-gemma4", "flax-gemma2"])
def test_keras_preset_round_trip(name, dtype, tmp_path):
    """write_keras_preset -> load gives the same logits (bf16 weights survive a bf16 write exactly)."""
    m = _load(name)
    cfg = m.config  # flax-gemma2's 27B-style scale goes out as query_head_dim_normalize=False
    out = write_keras_preset(tmp_path / "preset", m.module.state_dict(), cfg, m.tokenizer, dtype=dtype)
    assert sniff(out) == "keras" and (out / "assets/tokenizer/vocabulary.spm").exists()
    again = gemmakit.load(out, dtype="float32", device="cpu", quant=None, progress=False)
    assert again.config.replace(name="", max_position_embeddings=0) == cfg.replace(
        name="", max_position_embeddings=0
    )
    ids = np.load(DATA / name / "reference.npz")["ids"].tolist()
    np.testing.assert_array_equal(_logits(again.module, ids), _logits(m.module, ids))
    assert again.tokenizer.encode("hello there") == m.tokenizer.encode("hello there")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_keras_writer_refuses_what_keras_cannot_express(tmp_path):
    m = _load("keras-gemma3")
    odd = m.config.replace(layer_types=(SLIDING,) * 6 + (GLOBAL,))
    with pytest.raises(GemmaError, match="layer pattern"):
        write_keras_preset(tmp_path / "x", m.module.state_dict(), odd, m.tokenizer)
    with pytest.raises(GemmaError, match="neither head_dim"):
        write_keras_preset(
            tmp_path / "x", m.module.state_dict(), m.config.replace(query_pre_attn_scalar=20.0), m.tokenizer
        )


def test_orbax_tree_inverts_the_reader():
    """orbax_tree (the writer's FLAT layout) read back through orbax_to_hf gives the same tensors; K == N uses
    qkv_einsum, Gemma 1 the untransposed [2, D, F] gating."""
    raw = read_orbax_state_dict(_source("flax-gemma3"))
    cfg = CASES["flax-gemma3"]
    state = orbax_to_hf(raw, cfg, Path("x"))
    tree = orbax_tree(state, cfg)
    assert tree["transformer/layer_0/mlp/gating_einsum"]["w"].shape == (2, 64, 32)
    flat = {f"{k.removeprefix('transformer/')}/{leaf}": t for k, v in tree.items() for leaf, t in v.items()}
    assert flat.keys() == raw.keys()
    for k, t in flat.items():
        assert torch.equal(t, raw[k].float()), k
    g1 = preset("gemma-2b").replace(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=(),
    )
    with torch.device("meta"):
        module = Gemma(g1)
    tree = orbax_tree(module.state_dict(), g1)
    assert tree["transformer/layer_0/attn/qkv_einsum"]["w"].shape == (3, 2, 32, 16)
    assert tree["transformer/layer_0/mlp/gating_einsum"]["w"].shape == (2, 32, 64)


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-2-27b", "gemma-3-1b", "gemma-7b"])
def test_orbax_variant_from_shapes(name):
    """Official shapes name their preset (G1/G2 tables padded to 256128 rows); meta tensors, nothing allocated."""
    cfg = preset(name)
    with torch.device("meta"):
        state = Gemma(cfg).state_dict()
    flat = {
        f"{k.removeprefix('transformer/')}/{leaf}": t
        for k, v in orbax_tree(state, cfg).items()
        for leaf, t in v.items()
    }
    assert flat["embedder/input_embedding"].shape[0] == (
        cfg.vocab_size + 128 if cfg.vocab_size == 256000 else cfg.vocab_size
    )
    assert orbax_config(flat, None, Path("x")) is preset(name)
    hf = orbax_to_hf(flat, cfg, Path("x"))
    assert hf["model.embed_tokens.weight"].shape[0] == cfg.vocab_size


def test_orbax_without_variant_or_extra(monkeypatch):
    with pytest.raises(GemmaError, match="variant="):
        gemmakit.load(_source("flax-gemma2"), quant=None, progress=False)
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    with pytest.raises(GemmaError, match=r"gemmakit\[jax\]"):
        gemmakit.load(_source("flax-gemma2"), quant=None, progress=False, variant=CASES["flax-gemma2"])


def test_sniff_and_tokenizer_beside(tmp_path):
    assert sniff(DATA / "keras-gemma1") == "keras" and sniff(_source("flax-gemma3")) == "orbax"
    with pytest.raises(GemmaError, match="holds the Orbax checkpoint ckpt/"):
        sniff(DATA / "flax-gemma3")
    assert load_tokenizer(_source("flax-gemma3")).vocab_size == 512  # tokenizer.model one folder up
    assert load_tokenizer(DATA / "keras-gemma3").vocab_size == 512


def test_convert_and_info_on_these_loads(tmp_path, capsys):
    """The rest of gemmakit on a keras load: convert to GGUF and safetensors, `info` via the CLI."""
    from gemmakit.cli.convert import convert
    from gemmakit.cli.info import info

    convert(
        out=tmp_path / "m.gguf",
        model=str(DATA / "keras-gemma3"),
        to="gguf",
        qtype="f32",
        adapter=None,
        variant=None,
    )
    convert(
        out=tmp_path / "hf",
        model=str(DATA / "keras-gemma3"),
        to="hf",
        qtype="f16",
        adapter=None,
        variant=None,
    )
    ids = np.load(DATA / "keras-gemma3" / "reference.npz")["ids"].tolist()
    base = _logits(_load("keras-gemma3").module, ids)
    for src in (tmp_path / "m.gguf", tmp_path / "hf"):
        m = gemmakit.load(src, dtype="float32", device="cpu", quant=None, progress=False)
        np.testing.assert_allclose(_logits(m.module, ids), base, rtol=0, atol=1e-5)
    info(model=str(DATA / "keras-gemma2"))  # the CLI command, in process
    out = capsys.readouterr().out
    assert "gemma2" in out and "keras" in out and "50.0 / 30.0" in out


def test_a_lora_fine_tune_returns_to_keras(tmp_path):
    """An adapter trained on a keras-hub preset, merged by `convert --adapter --to keras-preset`: the written preset
    gives the adapted model's logits; the Model API generates from the load (what chat and the server run)."""
    from gemmakit.cli.convert import convert
    from gemmakit.lora import LoRAConfig, inject, save_adapter

    m = _load("keras-gemma3")
    inject(m.module, LoRAConfig(r=4, alpha=8, targets=("q_proj", "down_proj")))
    with torch.no_grad():
        for n, p in m.module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_adapter(m.module, tmp_path / "adapter")
    ids = np.load(DATA / "keras-gemma3" / "reference.npz")["ids"].tolist()
    adapted = _logits(_load("keras-gemma3", adapter=tmp_path / "adapter").module, ids)
    out = tmp_path / "preset"
    convert(
        out=out,
        model=str(DATA / "keras-gemma3"),
        to="keras-preset",
        adapter=tmp_path / "adapter",
        variant=None,
    )
    again = gemmakit.load(out, dtype="float32", device="cpu", quant=None, progress=False)
    np.testing.assert_allclose(_logits(again.module, ids), adapted, rtol=0, atol=1e-5)
    assert np.abs(adapted - _logits(_load("keras-gemma3").module, ids)).max() > 1e-3  # the adapter mattered
    with pytest.raises(GemmaError, match="already holds a model"):
        convert(out=out, model=str(DATA / "keras-gemma3"), to="keras-preset", adapter=None, variant=None)
    text = again.generate("hello", max_new_tokens=4, temperature=0.0)
    assert isinstance(getattr(text, "text", text), str)


def test_keras_multimodal_preset_loads_its_text_decoder(tmp_path):
    """Gemma 3 4B+ presets carry `gemma3_vision_encoder` and `gemma3_interleave_embeddings` layers (names as
    keras-hub 0.32 saves a Gemma3Backbone with a Gemma3VisionEncoder): skipped with a note, the text loads."""
    import shutil

    from gemmakit.loader import GemmaNote

    folder = tmp_path / "vision"
    shutil.copytree(DATA / "keras-gemma3", folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["config"]["vision_encoder"] = {"class_name": "Gemma3VisionEncoder", "config": {}}
    (folder / "config.json").write_text(json.dumps(raw))
    with h5py.File(folder / "model.weights.h5", "a") as f:
        g = f.create_group("layers/gemma3_vision_encoder/vision_encoder/patch_embedding/vars")
        g.attrs["name"] = "patch_embedding"
        g.create_dataset("0", data=np.zeros((14, 14, 3, 8), np.float32))
        f.create_group("layers/gemma3_interleave_embeddings/vars").attrs["name"] = "interleave_embeddings"
    with pytest.warns(GemmaNote, match="vision encoder is ignored"):
        m = gemmakit.load(folder, dtype="float32", device="cpu", quant=None, progress=False)
    ids = np.load(DATA / "keras-gemma3" / "reference.npz")["ids"].tolist()
    np.testing.assert_array_equal(_logits(m.module, ids), _logits(_load("keras-gemma3").module, ids))
