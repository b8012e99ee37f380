"""keras-hub Gemma4Backbone presets: the traps of its config and h5 layout, its multimodal and task variants, the
writer's refusals, and the rest of gemmakit (info, verify, convert) on such a load.

Parity with keras-hub's own forward runs in test_framework_formats.py (the committed keras-gemma4 fixture, saved by
keras-hub 0.32 with bf16 weights; tests/framework_fixtures.py); keras-hub reading our writes, and the real
262144-row vocabulary, in test_framework_references.py (slow, the `frameworks` extra).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import gemmakit
from framework_fixtures import CASES, DATA
from gemmakit.errors import GemmaError
from gemmakit.loader import GemmaNote
from gemmakit.weights.keras import config_from_keras, read_keras_state_dict, write_keras_preset

FOLDER = DATA / "keras-gemma4"
IDS = np.load(FOLDER / "reference.npz")["ids"].tolist()
KW = dict(dtype="float32", device="cpu", quant=None, progress=False)


def _logits(m: gemmakit.Model) -> np.ndarray:
    with torch.no_grad():
        return m.module(torch.tensor([IDS]))[0].numpy()


def _h5(path: str) -> torch.Tensor:
    """A bf16 variable of the fixture, bit for bit."""
    with h5py.File(FOLDER / "model.weights.h5") as f:
        return torch.from_numpy(np.ascontiguousarray(f[f"layers/{path}"][()]).view(np.int16)).view(
            torch.bfloat16
        )


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return read_keras_state_dict(FOLDER, CASES["keras-gemma4"], dtype=torch.bfloat16)


def test_norms_scalars_and_numbered_groups(state):
    """Gemma 4 norms multiply by w in keras-hub and transformers alike: copied bit for bit, no +1 (the fixture's
    scales sit near 1). The per-layer projection norm and the final norm are both `rms_normalization{,_1}` in the
    h5: their layer names decide. layer_scalar (a Keras scalar) arrives as HF's [1]."""
    block = "gemma4_text_decoder_block_2"
    assert torch.equal(
        state["model.layers.2.input_layernorm.weight"], _h5(f"{block}/pre_attention_norm/vars/0")
    )
    assert abs(state["model.layers.2.input_layernorm.weight"].float().mean().item() - 1.0) < 0.3
    assert torch.equal(
        state["model.layers.2.pre_feedforward_layernorm.weight"], _h5(f"{block}/pre_ffw_norm/vars/0")
    )
    assert torch.equal(state["model.per_layer_projection_norm.weight"], _h5("rms_normalization/vars/0"))
    assert torch.equal(state["model.norm.weight"], _h5("rms_normalization_1/vars/0"))
    assert state["model.layers.2.layer_scalar"].shape == (1,)
    assert torch.equal(state["model.layers.2.layer_scalar"], _h5(f"{block}/vars/0").reshape(1))
    assert state["model.layers.2.layer_scalar"].item() != 1.0


def test_layer_kinds_and_experts(state):
    """Global layer 1: one KV head of dim 32 and k=v (no v_proj); shared layers 3-4: no k/v at all and a double-wide
    MLP; the expert bank's gate [E, D, I] / up / down [E, I, D] become HF's gate_up_proj [E, 2I, D], down [E, D, I]."""
    assert state["model.layers.1.self_attn.k_proj.weight"].shape == (32, 32)
    assert state["model.layers.1.self_attn.q_proj.weight"].shape == (4 * 32, 32)
    assert "model.layers.1.self_attn.v_proj.weight" not in state
    assert state["model.layers.0.self_attn.v_proj.weight"].shape == (2 * 16, 32)
    assert not [
        k for k in state if k.startswith(("model.layers.3.self_attn.k", "model.layers.4.self_attn.v"))
    ]
    assert state["model.layers.3.mlp.gate_proj.weight"].shape == (64, 32)
    assert state["model.layers.2.mlp.gate_proj.weight"].shape == (32, 32)
    bank = "gemma4_text_decoder_block_1/moe_expert_bank/vars"
    gate_up, down = state["model.layers.1.experts.gate_up_proj"], state["model.layers.1.experts.down_proj"]
    assert gate_up.shape == (4, 16, 32) and down.shape == (4, 32, 8)
    assert torch.equal(gate_up[:, :8], _h5(f"{bank}/0").transpose(1, 2))
    assert torch.equal(gate_up[:, 8:], _h5(f"{bank}/1").transpose(1, 2))
    assert torch.equal(down, _h5(f"{bank}/2").transpose(1, 2))
    assert torch.equal(state["model.layers.1.router.per_expert_scale"], _h5(f"{bank}/3"))
    # q: Keras [N, D, H] -> HF [N*H, D]
    assert torch.equal(
        state["model.layers.0.self_attn.q_proj.weight"],
        _h5("gemma4_text_decoder_block/attention/query_dense/vars/0").transpose(1, 2).reshape(-1, 32),
    )


def _raw() -> dict:
    return json.loads((FOLDER / "config.json").read_text())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"is_embedding_model": True}, "is_embedding_model"),
        ({"local_rope_scaling_factor": 2.0}, "local_rope_scaling_factor"),
        ({"use_sliding_window_attention": False}, "without a sliding window"),
        ({"layer_types": ["full_attention"] * 4 + ["sliding_attention"]}, "last layer"),
        ({"global_rope_partial_rotary_factor": 0.01}, "rotates a different number of pairs"),
        ({"layer_types": ["full_attention"] * 4}, "is not 5 of"),
    ],
)
def test_config_refusals(change, match):
    raw = _raw()
    raw["config"].update(change)
    with pytest.raises(GemmaError, match=match):
        config_from_keras(raw)


def test_config_defaults_and_pattern():
    """Without layer_types the pattern decides (the last of each `sliding_window_pattern` is global); absent RoPE
    wavelengths are 1e6 global / 1e4 local; absent vocab_size_per_layer_input is the vocabulary; no
    num_global_key_value_heads means no k=v."""
    raw = _raw()
    c = raw["config"]
    c.update(
        layer_types=None,
        sliding_window_pattern=5,
        num_kv_shared_layers=0,
        num_global_key_value_heads=None,
        vocab_size_per_layer_input=None,
        global_rope_wavelength=None,
        local_rope_wavelength=None,
    )
    cfg = config_from_keras(raw)
    assert cfg.layer_types == ("sliding_attention",) * 4 + ("full_attention",)
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.vocab_size_per_layer_input) == (1e6, 1e4, 512)
    assert not cfg.attention_k_eq_v and cfg.num_global_key_value_heads is None


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "preset"
    shutil.copytree(FOLDER, folder)
    return folder


def test_task_final_logit_cap(tmp_path):
    """Gemma4CausalLM may soft-cap the logits itself (task.json final_logit_cap): one cap is taken, two refused."""
    folder = _copy(tmp_path)
    task = json.loads((folder / "task.json").read_text())
    task["config"]["final_logit_cap"] = 30.0
    (folder / "task.json").write_text(json.dumps(task))
    with pytest.raises(GemmaError, match="final_logit_cap"):
        gemmakit.load(folder, **KW)
    raw = json.loads((folder / "config.json").read_text())
    raw["config"]["final_logit_soft_cap"] = None
    (folder / "config.json").write_text(json.dumps(raw))
    m = gemmakit.load(folder, **KW)
    assert m.config.final_logit_softcapping == 30.0
    np.testing.assert_array_equal(_logits(m), _logits(gemmakit.load(FOLDER, **KW)))


def test_multimodal_preset_loads_its_text_decoder(tmp_path):
    """A Gemma4Backbone with image and audio towers (groups as keras-hub 0.32 names them): a one-line note, and the
    text decoder computes as without them."""
    folder = _copy(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["config"]["vision_encoder"] = {"class_name": "Gemma4VisionEncoder", "config": {}}
    raw["config"]["audio_encoder"] = {"class_name": "Gemma4AudioEncoder", "config": {}}
    (folder / "config.json").write_text(json.dumps(raw))
    with h5py.File(folder / "model.weights.h5", "a") as f:
        for top in ("gemma4_vision_encoder/patch_embedder/input_proj", "gemma4_audio_encoder/proj"):
            g = f.create_group(f"layers/{top}/vars")
            g.attrs["name"] = top.rsplit("/", 1)[1]
            g.create_dataset("0", data=np.zeros((4, 8), np.float32))
        f.create_group("layers/gemma4_interleave_embeddings/vars").attrs["name"] = "interleave_embeddings"
    with pytest.warns(GemmaNote, match="vision and audio encoder is ignored"):
        m = gemmakit.load(folder, **KW)
    np.testing.assert_array_equal(_logits(m), _logits(gemmakit.load(FOLDER, **KW)))


def test_writer_refuses_what_gemma4backbone_cannot_express(tmp_path):
    """Also: no Gemma 4 Orbax checkpoint, the gemma library 3.3.0 (the last for Python 3.11) has no Gemma 4."""
    from gemmakit.weights.orbax import orbax_tree

    m = gemmakit.load(FOLDER, **KW)
    with pytest.raises(GemmaError, match="Gemma 1-3 only"):
        orbax_tree(m.module.state_dict(), m.config)  # what write_orbax writes
    with pytest.raises(GemmaError, match="bidirectionally"):
        write_keras_preset(
            tmp_path / "x", {}, m.config.replace(use_bidirectional_attention=True), m.tokenizer
        )
    assert not (tmp_path / "x" / "model.weights.h5").exists()


def test_info_verify_and_convert_on_a_gemma4_keras_load(tmp_path, capsys):
    """`info` names the Gemma 4 features; `verify` runs (random weights fail its perplexity check, as they should;
    transformers cannot read the preset and says so); `convert` to keras-preset and hf gives the same logits."""
    from gemmakit.cli.convert import convert
    from gemmakit.cli.info import info
    from gemmakit.evaluate.verify import verify

    info(model=str(FOLDER))
    out = capsys.readouterr().out
    assert "gemma4" in out and "keras" in out and "k=v" in out and "top 2 per token" in out
    report = verify(FOLDER, fast=False)
    checks = {c.name: c for c in report.checks}
    assert (
        checks["transformers parity"].ok is None and "convert --to hf" in checks["transformers parity"].note
    )
    assert checks["perplexity on plain English/code"].ok is False  # random weights
    base = _logits(gemmakit.load(FOLDER, **KW))
    convert(
        out=tmp_path / "k", model=str(FOLDER), to="keras-preset", adapter=None, variant=None, dtype="bfloat16"
    )
    convert(out=tmp_path / "hf", model=str(FOLDER), to="hf", adapter=None, variant=None)
    for out_dir in (tmp_path / "k", tmp_path / "hf"):
        np.testing.assert_allclose(_logits(gemmakit.load(out_dir, **KW)), base, rtol=0, atol=1e-5)
    written = json.loads((tmp_path / "k" / "task.json").read_text())
    assert written["class_name"] == "Gemma4CausalLM"
    assert written["config"]["preprocessor"]["config"]["tokenizer"]["config"]["has_vision_tokens"] is False


def test_attention_soft_cap_stays_keras(tmp_path):
    """Gemma4Backbone can soft-cap attention logits; gemmakit runs it (it changes the logits) but neither
    transformers' Gemma 4 nor llama.cpp can say it: writing HF or GGUF is refused, a keras-hub preset keeps it."""
    from gemmakit.cli.convert import convert

    folder = _copy(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["config"]["attention_logit_soft_cap"] = 0.5
    (folder / "config.json").write_text(json.dumps(raw))
    m = gemmakit.load(folder, **KW)
    assert m.config.attn_logit_softcapping == 0.5
    assert np.abs(_logits(m) - _logits(gemmakit.load(FOLDER, **KW))).max() > 1e-3
    with pytest.raises(GemmaError, match="soft-caps its attention"):
        convert(out=tmp_path / "hf", model=str(folder), to="hf", adapter=None, variant=None)
    with pytest.raises(GemmaError, match="attention soft-cap"):
        convert(
            out=tmp_path / "m.gguf", model=str(folder), to="gguf", qtype="f32", adapter=None, variant=None
        )
    again = write_keras_preset(tmp_path / "k", m.module.state_dict(), m.config, m.tokenizer)
    np.testing.assert_array_equal(_logits(gemmakit.load(again, **KW)), _logits(m))
