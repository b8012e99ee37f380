"""Flax/Orbax checkpoints of the DeepMind `gemma` library (Kaggle's Flax downloads, `gm.ckpts.save_params` output).

The released FLAT layout keys one dict per module: `transformer/layer_0/attn/q_einsum` -> {"w": [N, D, H]}; the
arrays live in a tensorstore OCDBT store (zarr arrays named `<module>.<leaf>`). The library's NESTED layout (its
`load_params` output, `layer_0/attn/q_einsum/w`) and fine-tuned trees under `rlx_networks/policy_network/` read
the same. No config is stored: the variant is the one official preset the shapes match, or `variant=`.
Shapes and names: gemma 3.3.0 `gm/nn/_modules.py`, `gm/ckpts/_checkpoint.py`, `gm/nn/_gemma.py`; spec §4.2.
Reading needs tensorstore, writing orbax-checkpoint: the optional extra `pip install 'gemmakit[jax]'`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PRESETS, GemmaConfig, preset
from ..errors import GemmaError
from ..tokenizer import Tokenizer
from .names import hf_to_orbax_layer, orbax_layer_to_hf
from .writers import float_state

EXTRA = "pip install 'gemmakit[jax]'"
_PREFIXES = ("rlx_networks/policy_network/", "transformer/")
_LEAVES = ("w", "scale", "input_embedding")


def is_orbax_checkpoint(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA"))


def _tensorstore() -> Any:
    try:
        import tensorstore
    except ImportError:
        raise GemmaError(f"reading a Flax/Orbax checkpoint needs tensorstore: {EXTRA}") from None
    return tensorstore


def _canonical(name: str) -> str:
    """'transformer/layer_0/mlp/gating_einsum.w' or 'layer_0/mlp/gating_einsum' -> 'layer_0/mlp/gating_einsum/w'."""
    name = name.replace(".", "/")
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    if name.rpartition("/")[2] not in _LEAVES:
        name += "/w"  # the NESTED layout drops the mlp's 'w' (gm/ckpts/_compat.py param_remapper)
    return name


def _open_arrays(folder: Path) -> dict[str, Any]:
    """Canonical name -> opened tensorstore array (shape known, nothing read yet), text decoder only."""
    ts = _tensorstore()
    kv = (
        {"driver": "ocdbt", "base": folder.resolve().as_uri() + "/"}
        if (folder / "manifest.ocdbt").exists()
        else {"driver": "file", "path": str(folder.resolve()) + "/"}
    )
    try:
        keys = [k.decode() for k in ts.KvStore.open(kv).result().list().result()]
        arrays = {
            k.rpartition("/")[0]: ("zarr3" if k.endswith("zarr.json") else "zarr")
            for k in keys
            if k.endswith("/.zarray") or k.endswith("/zarr.json")
        }
        if any(k.startswith("transformer/stacked_layers") for k in arrays):
            raise GemmaError(
                f"{folder} uses the gemma library's STACKED layout; load it with gm.ckpts.load_params "
                "and save_params it again (NESTED), then load that"
            )
        # the vision encoder and its projection are skipped: gemmakit runs the text decoder only
        return {
            _canonical(name): ts.open({"driver": driver, "kvstore": {**kv, "path": name}}, open=True).result()
            for name, driver in arrays.items()
            if not (name.startswith("SigLiPFromPatches_0") or "/mm_" in name)
        }
    except (ValueError, RuntimeError) as e:  # tensorstore's errors carry the store's message
        raise GemmaError(
            f"{folder} is not a readable Orbax checkpoint ({str(e).splitlines()[0]}); it may be incomplete"
        ) from None


def read_orbax_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every array's shape, from the zarr metadata only (for `info` and variant inference without reading data)."""
    return {k: tuple(a.shape) for k, a in _open_arrays(folder).items()}


def read_orbax_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every array of the checkpoint under its canonical name (no 'transformer/' prefix, '/'-joined), as stored."""
    arrays = _open_arrays(folder)
    if not arrays:
        raise GemmaError(f"{folder} holds no arrays; is it an Orbax checkpoint of the gemma library?")
    out: dict[str, torch.Tensor] = {}
    for name, handle in arrays.items():
        arr = np.asarray(handle.read().result())
        if arr.dtype.name == "bfloat16":  # ml_dtypes bf16: reinterpret the bits
            out[name] = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(arr.astype(np.float32))
    return out


def _shapes(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """The architecture the tensors imply: family from the norms present, widths and heads from the einsums."""
    if "embedder/input_embedding" not in raw or "layer_0/attn/attn_vec_einsum/w" not in raw:
        raise GemmaError(
            f"{source} lacks transformer/embedder or layer_0's attention; not a Gemma checkpoint"
        )
    layers = len({m.group(1) for k in raw if (m := re.match(r"^layer_(\d+)/", k))})
    shape = {k: tuple(getattr(v, "shape", v)) for k, v in raw.items()}  # tensors or shapes
    rows, d = shape["embedder/input_embedding"]
    n, h, _ = shape["layer_0/attn/attn_vec_einsum/w"]
    k = n if "layer_0/attn/qkv_einsum/w" in shape else shape["layer_0/attn/kv_einsum/w"][1]
    f = shape["layer_0/mlp/linear/w"][0]
    family = (
        "gemma3"
        if "layer_0/attn/_query_norm/scale" in raw
        else "gemma2"
        if "layer_0/post_ffw_norm/scale" in raw
        else "gemma"
    )
    return dict(
        family=family,
        rows=rows,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=n,
        num_key_value_heads=k,
        head_dim=h,
        intermediate_size=f,
    )


def orbax_config(raw: dict[str, Any], variant: str | GemmaConfig | None, source: Path) -> GemmaConfig:
    """variant= when given, else the single official preset with these shapes (soft-caps, windows, query scale and
    RoPE scaling are not in the tensors, so a custom shape needs variant=)."""
    if variant is not None:
        return variant if isinstance(variant, GemmaConfig) else preset(variant)
    s = _shapes(raw, source)
    keys = (
        "family",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
    )
    found = [
        c
        for c in PRESETS.values()
        if all(getattr(c, k) == s[k] for k in keys) and c.vocab_size <= s["rows"] <= c.vocab_size + 128
    ]
    if len(found) != 1:
        what = ", ".join(f"{k}={s[k]}" for k in keys)
        raise GemmaError(
            f"{source} carries no config and its shapes ({what}) match {len(found)} official presets; "
            "pass variant= (a preset name or a gemmakit.GemmaConfig)"
        )
    return found[0]


def _mlp_gate_up(w: torch.Tensor, cfg: GemmaConfig, source: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """gating_einsum is [2, F, D] (transpose_gating_einsum=True: Gemma 2 9B/27B, Gemma 3) or [2, D, F]; gate = 0."""
    f, d = cfg.intermediate_size, cfg.hidden_size
    if tuple(w.shape) == (2, d, f) and f != d:
        w = w.transpose(1, 2)
    if tuple(w.shape) != (2, f, d):
        raise GemmaError(
            f"{source}: mlp/gating_einsum has shape {tuple(w.shape)}, variant {cfg.name or cfg.family} "
            f"expects (2, {f}, {d}); pass the right variant="
        )
    return w[0], w[1]


def orbax_to_hf(
    raw: dict[str, torch.Tensor], cfg: GemmaConfig, source: Path, *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """HF-named tensors (spec §4.2): einsums reshaped, padding rows of G1/G2 tables (256128 -> 256000) dropped."""
    if cfg.family not in ("gemma", "gemma2", "gemma3"):
        raise GemmaError(
            f"{cfg.family} Orbax checkpoints are not supported (gemmakit follows the layouts of the gemma library "
            "3.3.0, which has Gemma 1-3 only); convert the Hugging Face checkpoint instead"
        )
    n, d = cfg.num_attention_heads, cfg.hidden_size
    state: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        t = t.to(dtype)
        if key == "embedder/input_embedding":
            state["model.embed_tokens.weight"] = t[: cfg.vocab_size] if t.shape[0] > cfg.vocab_size else t
            continue
        if key == "final_norm/scale":
            state["model.norm.weight"] = t
            continue
        m = re.match(r"^layer_(\d+)/(.+)$", key)
        if m is None:
            raise GemmaError(f"{source}: unexpected array {key!r}; not a Gemma text decoder checkpoint")
        pre, part = f"model.layers.{m.group(1)}.", m.group(2)
        if part == "attn/q_einsum/w":
            state[pre + "self_attn.q_proj.weight"] = t.transpose(1, 2).reshape(-1, d)
        elif part in ("attn/kv_einsum/w", "attn/qkv_einsum/w"):
            names = ("q", "k", "v") if part.startswith("attn/qkv") else ("k", "v")
            for name, part_t in zip(names, t, strict=True):
                state[pre + f"self_attn.{name}_proj.weight"] = part_t.transpose(1, 2).reshape(-1, d)
        elif part == "attn/attn_vec_einsum/w":  # [N, H, D] -> [D, N*H]
            state[pre + "self_attn.o_proj.weight"] = t.reshape(n * t.shape[1], d).T
        elif part == "mlp/gating_einsum/w":
            state[pre + "mlp.gate_proj.weight"], state[pre + "mlp.up_proj.weight"] = _mlp_gate_up(
                t, cfg, source
            )
        elif part == "mlp/linear/w":
            state[pre + "mlp.down_proj.weight"] = t.T
        elif (hf := orbax_layer_to_hf(part, cfg.family)) is not None:
            state[pre + hf] = t
        else:
            raise GemmaError(f"{source}: unexpected array {key!r}; not a {cfg.family} text decoder")
    return {k: v.contiguous() for k, v in state.items()}


def transposed_gating(cfg: GemmaConfig) -> bool:
    """Which gating layout the gemma library's config of this shape expects: [2, D, F] for Gemma 1 and Gemma2_2B
    (transpose_gating_einsum left False), [2, F, D] for every later config (gm/nn/_gemma.py)."""
    g2_2b = PRESETS["gemma-2-2b"]
    return not (
        cfg.family == "gemma"
        or (
            cfg.family == "gemma2"
            and cfg.hidden_size == g2_2b.hidden_size
            and cfg.num_hidden_layers == g2_2b.num_hidden_layers
        )
    )


def orbax_tree(state: dict[str, torch.Tensor], cfg: GemmaConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The released FLAT tree of HF-named tensors: the inverse of orbax_to_hf (G1/G2 tables padded to 256128)."""
    if cfg.family not in ("gemma", "gemma2", "gemma3"):
        raise GemmaError(
            f"writing {cfg.family} as an Orbax checkpoint is not supported (the gemma library 3.3.0 has Gemma 1-3 "
            "only); write a Hugging Face folder or a keras-hub preset"
        )
    n, k, h, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    tensors = float_state(state, cfg)
    tree: dict[str, dict[str, torch.Tensor]] = {}
    emb = tensors.pop("model.embed_tokens.weight")
    if cfg.family in ("gemma", "gemma2") and cfg.vocab_size == 256000:  # GDM num_embed=256128 (spec §2)
        emb = torch.cat([emb, emb.new_zeros(128, d)])
    tree["transformer/embedder"] = {"input_embedding": emb}
    tree["transformer/final_norm"] = {"scale": tensors.pop("model.norm.weight")}
    for i in range(cfg.num_hidden_layers):
        pre, out = f"model.layers.{i}.", f"transformer/layer_{i}/"
        q, kk, v = (
            tensors.pop(pre + f"self_attn.{x}_proj.weight").reshape(-1, h, d).transpose(1, 2) for x in "qkv"
        )
        if k == n:  # the library's Attention uses one qkv_einsum when num_kv_heads == num_heads
            tree[out + "attn/qkv_einsum"] = {"w": torch.stack([q, kk, v])}
        else:
            tree[out + "attn/q_einsum"] = {"w": q}
            tree[out + "attn/kv_einsum"] = {"w": torch.stack([kk, v])}
        tree[out + "attn/attn_vec_einsum"] = {
            "w": tensors.pop(pre + "self_attn.o_proj.weight").T.reshape(n, h, d)
        }
        gating = torch.stack(
            [tensors.pop(pre + "mlp.gate_proj.weight"), tensors.pop(pre + "mlp.up_proj.weight")]
        )
        tree[out + "mlp/gating_einsum"] = {"w": gating if transposed_gating(cfg) else gating.transpose(1, 2)}
        tree[out + "mlp/linear"] = {"w": tensors.pop(pre + "mlp.down_proj.weight").T}
        for name in [x for x in tensors if x.startswith(pre)]:
            module, _, leaf = hf_to_orbax_layer(name.removeprefix(pre), cfg.family).rpartition("/")
            tree[out + module] = {leaf: tensors.pop(name)}
    if tensors:
        raise GemmaError(f"cannot write {next(iter(tensors))} to an Orbax checkpoint")
    return tree


def write_orbax(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    cfg: GemmaConfig,
    tokenizer: Tokenizer | None,
    *,
    dtype: str = "float32",
) -> Path:
    """A checkpoint `gm.ckpts.load_params` reads (FLAT layout, as released), tokenizer.model inside. The folder is
    built beside the target and renamed into place, replacing an earlier checkpoint only once complete."""
    try:
        import ml_dtypes
        import orbax.checkpoint as ocp
    except ImportError:
        raise GemmaError(f"writing an Orbax checkpoint needs orbax-checkpoint: {EXTRA}") from None
    if dtype not in ("float32", "bfloat16"):
        raise GemmaError(f"unknown dtype {dtype!r} for an Orbax checkpoint; use float32 or bfloat16")
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    tree = {
        m: {leaf: t.float().cpu().numpy().astype(np_dtype) for leaf, t in leaves.items()}
        for m, leaves in orbax_tree(state, cfg).items()
    }
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp / "ckpt", tree)
        ckpt.wait_until_finished()
        ckpt.close()
        if tokenizer is not None:
            tokenizer.save(tmp / "ckpt" / "tokenizer.model")
        if folder.exists():
            if not is_orbax_checkpoint(folder) and any(folder.iterdir()):
                raise GemmaError(
                    f"{folder} exists and is not an Orbax checkpoint; choose a new output folder"
                )
            os.replace(folder, tmp / "old")
        os.replace(tmp / "ckpt", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
