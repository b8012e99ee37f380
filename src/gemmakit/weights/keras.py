"""keras-hub presets (what Kaggle's Keras downloads and `save_to_preset` hold): read them and write them back.

A preset folder has `config.json` = {"class_name": "GemmaBackbone" | "Gemma3Backbone", "config": {...}}, the weights
in `model.weights.h5` (or shards listed in `model.weights.json`), and the SentencePiece model in
`assets/tokenizer/vocabulary.spm` (`tokenizer.json` is Keras's tokenizer config, not a Hugging Face tokenizer).
h5 keys follow Keras's saving_lib: `layers/<snake_case class name>{,_1,...}/.../vars/0`; each `vars` group carries the
layer's own name (`decoder_block_3`), which orders the blocks. bf16 is stored as opaque 2-byte data with a
`dtype="bfloat16"` attribute (keras/src/saving/saving_lib.py H5Entry). Sources: keras_hub 0.32
`models/gemma/gemma_backbone.py`, `gemma_decoder_block.py`, `gemma_attention.py`, `models/gemma3/gemma3_backbone.py`.
Reading needs h5py only, never keras.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import GLOBAL, SLIDING, GemmaConfig
from ..errors import GemmaError
from ..tokenizer import Tokenizer
from .keras_gemma4 import BACKBONE as GEMMA4
from .keras_gemma4 import (
    GEMMA4_PREPROCESSOR,
    config_from_keras_gemma4,
    gemma4_from_keras,
    gemma4_to_keras,
    gemma4_tokenizer_flags,
    keras_gemma4_config,
)
from .names import KERAS_LAYER_NAMES, hf_to_keras_block, keras_block_to_hf
from .writers import atomic_write, float_state

BACKBONES = ("GemmaBackbone", "Gemma3Backbone", GEMMA4)
VOCAB = Path("assets") / "tokenizer" / "vocabulary.spm"
_VISION = (
    "gemma3_vision_encoder",
    "gemma3_interleave_embeddings",
)  # h5 groups of Gemma3Backbone's image path
_BLOCK = re.compile(r"^(?:gemma3_)?(?:gemma_)?decoder_block(?:_(\d+))?$")


def is_keras_preset(folder: Path) -> bool:
    """A folder whose config.json is a Keras object config (class_name), not a transformers one (model_type)."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and "class_name" in raw and "model_type" not in raw


def _h5py():
    try:
        import h5py
    except ImportError:
        raise GemmaError("reading a keras-hub preset needs h5py: pip install h5py") from None
    return h5py


def keras_vision_note(folder: Path) -> str | None:
    """A one-line note when the preset carries a vision (Gemma 3 4B and up, Gemma 4) or audio encoder (Gemma 4):
    its text decoder is loaded."""
    c = json.loads((folder / "config.json").read_text()).get("config", {})
    towers = [k.removesuffix("_encoder") for k in ("vision_encoder", "audio_encoder") if c.get(k) is not None]
    if not towers:
        return None
    return (
        f"{folder.name} is a multimodal keras-hub preset: its text decoder is loaded and its "
        f"{' and '.join(towers)} encoder is ignored (gemmakit runs text only)"
    )


def read_keras_config(folder: Path) -> GemmaConfig:
    raw = json.loads((folder / "config.json").read_text())
    cfg = config_from_keras(raw)
    task = (
        folder / "task.json"
    )  # Gemma4CausalLM can cap the logits once more on top of the backbone's own cap
    cap = json.loads(task.read_text()).get("config", {}).get("final_logit_cap") if task.exists() else None
    if cap is not None and cfg.final_logit_softcapping is not None:
        raise GemmaError(
            f"{folder}: task.json's final_logit_cap soft-caps logits the backbone already soft-caps; "
            "gemmakit applies one final soft-cap (set one of them to null)"
        )
    return cfg.replace(
        name=folder.name, final_logit_softcapping=cfg.final_logit_softcapping if cap is None else cap
    )


def config_from_keras(raw: dict[str, Any]) -> GemmaConfig:
    """A GemmaConfig from a keras-hub backbone config. Sliding layers and RoPE bases are implied by the class."""
    cls, c = raw.get("class_name"), raw.get("config", {})
    if cls not in BACKBONES:
        raise GemmaError(
            f"config.json is a keras-hub {cls!r}; gemmakit reads {', '.join(BACKBONES)} presets "
            "(Gemma 1-4 text decoders)"
        )
    if cls == GEMMA4:
        return config_from_keras_gemma4(c)
    n, d, h = c["num_query_heads"], c["hidden_dim"], c["head_dim"]
    # query_head_dim_normalize=False scales queries by (hidden / heads) ** -0.5 (gemma_attention.py), as HF's
    # query_pre_attn_scalar and the gemma library's BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS do.
    qpas = float(h if c.get("query_head_dim_normalize", True) else d // n)
    common = dict(
        vocab_size=c["vocabulary_size"],
        hidden_size=d,
        num_hidden_layers=c["num_layers"],
        num_attention_heads=n,
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=h,
        rms_norm_eps=c.get("layer_norm_epsilon", 1e-6),
        query_pre_attn_scalar=qpas,
    )
    post = (c.get("use_post_attention_norm", False), c.get("use_post_ffw_norm", False))
    sliding = bool(c.get("use_sliding_window_attention", False))
    if cls == "GemmaBackbone":
        # GemmaBackbone's intermediate_dim is the width of gate and up together: HF's intermediate_size is half.
        common["intermediate_size"] = c["intermediate_dim"] // 2
        if post == (False, False):
            if c.get("attention_logit_soft_cap") or c.get("final_logit_soft_cap") or sliding or qpas != h:
                raise GemmaError(
                    "this GemmaBackbone has no post-norms (Gemma 1) but Gemma 2's soft-caps, sliding "
                    "window or query scale; gemmakit cannot build that mix"
                )
            return GemmaConfig(family="gemma", **common)
        if post != (True, True):
            raise GemmaError(
                "this GemmaBackbone has only one of use_post_attention_norm/use_post_ffw_norm; Gemma 2 "
                "has both, Gemma 1 neither"
            )
        types = tuple(SLIDING if sliding and i % 2 == 0 else GLOBAL for i in range(c["num_layers"]))
        return GemmaConfig(
            family="gemma2",
            **common,
            layer_types=types,
            sliding_window=c.get("sliding_window_size", 4096) if sliding else None,
            attn_logit_softcapping=c.get("attention_logit_soft_cap"),
            final_logit_softcapping=c.get("final_logit_soft_cap"),
        )
    odd = [
        k
        for k, ok in (
            ("use_query_key_norm", c.get("use_query_key_norm", True)),
            ("use_post_attention_norm/use_post_ffw_norm", post == (True, True)),
            ("use_bidirectional_attention", not c.get("use_bidirectional_attention")),
            ("is_embedding_model", not c.get("is_embedding_model")),
            ("attention_logit_soft_cap", c.get("attention_logit_soft_cap") is None),
            ("local_rope_scaling_factor", c.get("local_rope_scaling_factor", 1.0) == 1.0),
        )
        if not ok
    ]
    if odd:
        raise GemmaError(
            f"this Gemma3Backbone sets {odd[0]} to a value Gemma 3's text decoder does not use; "
            "gemmakit cannot build it"
        )
    # Gemma3Backbone: intermediate_dim equals HF's; layers with i % 6 < 5 slide (RoPE base 1e4), others are global
    # (base 1e6, scaled by global_rope_scaling_factor) -- gemma3_backbone.py.
    types = tuple(SLIDING if sliding and i % 6 < 5 else GLOBAL for i in range(c["num_layers"]))
    return GemmaConfig(
        family="gemma3",
        **common,
        intermediate_size=c["intermediate_dim"],
        layer_types=types,
        sliding_window=c.get("sliding_window_size", 1024) if sliding else None,
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        max_position_embeddings=131072,
        rope_scaling_factor=float(c.get("global_rope_scaling_factor", 1.0)),
        final_logit_softcapping=c.get("final_logit_soft_cap"),
    )


def _weight_files(folder: Path) -> list[Path]:
    if (folder / "model.weights.h5").exists():
        return [folder / "model.weights.h5"]
    index = folder / "model.weights.json"  # sharded presets: {"weight_map": {path: "model_00000.weights.h5"}}
    if index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise GemmaError(
                f"{folder}: weight shard(s) {', '.join(missing)} listed in model.weights.json are missing"
            )
        return files
    raise GemmaError(
        f"{folder} is a keras-hub preset without model.weights.h5; download the whole preset folder"
    )


def _tensor(ds: Any) -> torch.Tensor:
    """bf16 datasets are opaque 2-byte blobs tagged dtype="bfloat16": reinterpret the bits, no ml_dtypes needed."""
    arr = ds[()]
    if ds.attrs.get("dtype") == "bfloat16" or (arr.dtype.kind == "V" and arr.dtype.itemsize == 2):
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _variables(files: list[Path]) -> dict[str, tuple[str, torch.Tensor]]:
    """'<layer group>/<sub path>' -> (name attr of the layer group's vars, tensor) for every `vars/0` in the files."""
    h5py = _h5py()
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for path in files:
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise GemmaError(f"{path} is not a readable HDF5 file ({e}); re-download the preset") from None
        with f:
            root = f.get("layers") or f.get("_layer_checkpoint_dependencies")
            if root is None:
                raise GemmaError(f"{path} has no 'layers' group; it is not a Keras 3 weights file")
            for top in root:
                group = root[top]
                name = group["vars"].attrs.get("name", top) if "vars" in group else top

                def visit(sub: str, obj: Any, top: str = top, name: str = name) -> None:
                    m = re.fullmatch(r"(.*?)/?vars/(\d+)", sub)  # a layer's k-th variable; [k] marks k > 0
                    if isinstance(obj, h5py.Dataset) and m:
                        k = "" if m.group(2) == "0" else f"[{m.group(2)}]"
                        out[f"{top}/{m.group(1)}{k}"] = (name, _tensor(obj))

                group.visititems(visit)
    return out


def read_keras_state_dict(
    folder: Path, cfg: GemmaConfig, *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """HF-named tensors from a preset's h5 weights (spec §4.2's einsum layouts, Keras flavour)."""
    n, h, d = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    variables = _variables(_weight_files(folder))
    if cfg.family == "gemma4":
        return {k: t.to(dtype) for k, t in gemma4_from_keras(variables, cfg, folder).items()}
    blocks: dict[str, int] = {}
    state: dict[str, torch.Tensor] = {}
    for key, (name, t) in variables.items():
        top, _, part = key.partition("/")
        t = t.to(dtype)
        if top == "reversible_embedding" or name == "token_embedding":
            state["model.embed_tokens.weight"] = t
            continue
        if top == "rms_normalization" or name == "final_normalization":
            state["model.norm.weight"] = t
            continue
        if top in _VISION:
            continue  # Gemma 3 4B+ presets: the image tower and its merge into the text; text decoder only
        m = _BLOCK.match(top)
        if m is None:
            raise GemmaError(
                f"{folder}: unexpected layer {top!r} in the weights; not a {cfg.family} text decoder"
            )
        layer = (
            int(name.rsplit("_", 1)[1]) if re.fullmatch(r"decoder_block_\d+", name) else int(m.group(1) or 0)
        )
        blocks[top] = layer
        hf = keras_block_to_hf(part, cfg.family)
        if hf is None:
            raise GemmaError(f"{folder}: unexpected tensor {key!r}; not a {cfg.family} text decoder")
        if part in ("attention/query_dense", "attention/key_dense", "attention/value_dense"):  # [heads, D, H]
            t = t.transpose(1, 2).reshape(-1, d)
        elif part == "attention/output_dense":  # [N, H, D] -> [D, N*H]
            t = t.reshape(n * h, d).T
        elif part in ("gating_ffw", "gating_ffw_2", "ffw_linear"):  # EinsumDense kernels are [in, out]
            t = t.T
        state[f"model.layers.{layer}.{hf}"] = t.contiguous()
    if len(set(blocks.values())) != len(blocks):
        raise GemmaError(
            f"{folder}: two decoder blocks claim the same layer number; the h5 file is inconsistent"
        )
    return state


def keras_tokenizer(folder: Path) -> Tokenizer | None:
    path = folder / VOCAB
    return Tokenizer.from_file(path) if path.exists() else None


def keras_config(cfg: GemmaConfig) -> dict[str, Any]:
    """The backbone's config.json; refuses configs keras-hub's classes cannot express (their layouts are fixed)."""
    n, d, h = cfg.num_attention_heads, cfg.hidden_size, cfg.head_dim
    if cfg.family == "gemma4":
        return keras_gemma4_config(cfg)
    if cfg.family not in ("gemma", "gemma2", "gemma3"):
        raise GemmaError(
            f"writing {cfg.family} as a keras-hub preset is not supported; write a Hugging Face folder"
        )
    if cfg.query_pre_attn_scalar not in (float(h), float(d // n)):
        raise GemmaError(
            f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} is neither head_dim nor hidden/heads, "
            "the two scales keras-hub can express; write a Hugging Face folder instead"
        )
    sliding = SLIDING in cfg.layer_types
    period = {"gemma": 1, "gemma2": 2, "gemma3": 6}[cfg.family]
    want = tuple(
        SLIDING if sliding and i % period < period - 1 else GLOBAL for i in range(cfg.num_hidden_layers)
    )
    bases = (1e4, 1e4) if cfg.family != "gemma3" else (1e6, 1e4)
    if (
        cfg.layer_types != want
        or (cfg.rope_theta, cfg.rope_local_base_freq if sliding else bases[1]) != bases
    ):
        raise GemmaError(
            "this config's sliding/global layer pattern or RoPE bases differ from what keras-hub's "
            f"{cfg.family} backbone implies; write a Hugging Face folder instead"
        )
    c: dict[str, Any] = dict(
        name="gemma3_backbone" if cfg.family == "gemma3" else "gemma_backbone",
        trainable=True,
        dtype={
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": "float32"},
            "registered_name": None,
        },
        vocabulary_size=cfg.vocab_size,
        num_layers=cfg.num_hidden_layers,
        num_query_heads=n,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_dim=d,
        head_dim=h,
        intermediate_dim=cfg.intermediate_size * (1 if cfg.family == "gemma3" else 2),
        layer_norm_epsilon=cfg.rms_norm_eps,
        dropout=0,
        query_head_dim_normalize=cfg.query_pre_attn_scalar == h,
        use_post_ffw_norm=cfg.post_norms,
        use_post_attention_norm=cfg.post_norms,
        final_logit_soft_cap=cfg.final_logit_softcapping,
        attention_logit_soft_cap=cfg.attn_logit_softcapping if cfg.family == "gemma2" else None,
        sliding_window_size=cfg.sliding_window or (1024 if cfg.family == "gemma3" else 4096),
        use_sliding_window_attention=sliding,
    )
    if cfg.family == "gemma3":
        c.update(
            image_size=896,
            use_query_key_norm=True,
            local_rope_scaling_factor=1.0,
            global_rope_scaling_factor=cfg.rope_scaling_factor,
            vision_encoder=None,
            use_bidirectional_attention=False,
            is_embedding_model=False,
            pooling_intermediate_dim=None,
            embedding_dim=None,
        )
    return c


def _keras_tensors(state: dict[str, torch.Tensor], cfg: GemmaConfig) -> dict[str, tuple[str, torch.Tensor]]:
    """h5 group path under `layers/` -> (layer name, tensor in Keras's layout): the inverse of the reader."""
    if cfg.family == "gemma4":
        return gemma4_to_keras(float_state(state, cfg), cfg)
    n, h, d = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    block = "gemma3_decoder_block" if cfg.family == "gemma3" else "gemma_decoder_block"
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for key, t in float_state(state, cfg).items():
        if key == "model.embed_tokens.weight":
            out["reversible_embedding"] = ("token_embedding", t)
            continue
        if key == "model.norm.weight":
            out["rms_normalization"] = ("final_normalization", t)
            continue
        layer, hf = re.match(r"^model\.layers\.(\d+)\.(.+)$", key).groups()
        part = hf_to_keras_block(hf, cfg.family)
        if part in ("attention/query_dense", "attention/key_dense", "attention/value_dense"):
            t = t.reshape(-1, h, d).transpose(1, 2)  # [heads*H, D] -> [heads, D, H]
        elif part == "attention/output_dense":
            t = t.T.reshape(n, h, d)
        elif part in ("gating_ffw", "gating_ffw_2", "ffw_linear"):
            t = t.T
        top = block + (f"_{layer}" if layer != "0" else "")
        out[f"{top}/{part}"] = (KERAS_LAYER_NAMES.get(part, part.rpartition("/")[2]), t)
        out.setdefault(top, (f"decoder_block_{layer}", None))
        if part.startswith("attention/"):
            out.setdefault(f"{top}/attention", ("attention", None))
    return out


def _write_h5(
    tmp: str, tensors: dict[str, tuple[str, Any]], backbone: str, dtype: str, inputs: tuple[str, ...]
) -> None:
    """tensors: group path -> (layer name, its variables: one tensor, a list of them (vars/0, vars/1, ...) or None)."""
    h5py = _h5py()
    with h5py.File(tmp, "w") as f:
        f.create_group("vars").attrs["name"] = backbone
        for i, name in enumerate(inputs):
            f.create_group(f"layers/input_layer{f'_{i}' if i else ''}/vars").attrs["name"] = name
        for path, (name, ts) in tensors.items():
            g = f.require_group(f"layers/{path}/vars")
            g.attrs["name"] = name
            for i, t in enumerate([] if ts is None else ts if isinstance(ts, list) else [ts]):
                if dtype == "bfloat16":  # opaque 2-byte blobs tagged like Keras's own bf16 writes
                    raw = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("V2")
                    g.create_dataset(str(i), data=raw).attrs["dtype"] = "bfloat16"
                else:
                    g.create_dataset(str(i), data=t.float().contiguous().numpy())


def _object(pkg: str, kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """A Keras serialized object: keras_hub.src.models.gemma3.gemma3_causal_lm -> Gemma3CausalLM, etc."""
    words = {
        "backbone": "Backbone",
        "tokenizer": "Tokenizer",
        "causal_lm": "CausalLM",
        "causal_lm_preprocessor": "CausalLMPreprocessor",
    }
    cls = {"gemma3": "Gemma3", "gemma4": "Gemma4"}.get(pkg, "Gemma") + words[kind]
    return {
        "module": f"keras_hub.src.models.{pkg}.{pkg}_{kind}",
        "class_name": cls,
        "config": config,
        "registered_name": f"keras_hub>{cls}",
    }


def write_keras_preset(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    cfg: GemmaConfig,
    tokenizer: Tokenizer | None,
    *,
    dtype: str = "float32",
) -> Path:
    """A preset keras-hub's `from_preset` loads (GemmaCausalLM / Gemma3CausalLM too): config.json, model.weights.h5,
    tokenizer.json + assets/tokenizer/vocabulary.spm, preprocessor.json, task.json, metadata.json, as
    `save_to_preset` writes them. Each file is written atomically."""
    if dtype not in ("float32", "bfloat16"):
        raise GemmaError(f"unknown dtype {dtype!r} for a keras-hub preset; use float32 or bfloat16")
    if tokenizer is None:
        raise GemmaError(
            "a keras-hub preset carries its tokenizer; this model was loaded without one (pass tokenizer=)"
        )
    c = keras_config(cfg)
    c["dtype"]["config"]["name"] = dtype
    pkg = cfg.family if cfg.family in ("gemma3", "gemma4") else "gemma"
    folder = Path(folder)
    (folder / VOCAB).parent.mkdir(parents=True, exist_ok=True)
    tensors = _keras_tensors(state, cfg)
    inputs = ("token_ids", "padding_mask") + ("position_ids",) * (pkg == "gemma4")
    atomic_write(folder / "model.weights.h5", lambda tmp: _write_h5(tmp, tensors, c["name"], dtype, inputs))
    tok_cfg: dict[str, Any] = dict(
        name=f"{pkg}_tokenizer",
        trainable=True,
        dtype={
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": "int32"},
            "registered_name": None,
        },
        config_file="tokenizer.json",
        proto=None,
        sequence_length=None,
        add_bos=False,
        add_eos=False,
    )
    if cfg.family == "gemma3":  # Gemma3Tokenizer insists on the image tokens unless told there are none
        tok_cfg["has_vision_tokens"] = all(
            tokenizer.token_id(p) is not None for p in ("<start_of_image>", "<end_of_image>", "<img>")
        )
    if pkg == "gemma4":
        tok_cfg.update(gemma4_tokenizer_flags(tokenizer))
    files = {"config.json": _object(pkg, "backbone", c), "tokenizer.json": _object(pkg, "tokenizer", tok_cfg)}
    pre_cfg: dict[str, Any] = dict(
        name=f"{pkg}_causal_lm_preprocessor",
        trainable=True,
        dtype={**c["dtype"], "config": {"name": "float32"}},
        tokenizer=files["tokenizer.json"],
        config_file="preprocessor.json",
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
    )
    if cfg.family == "gemma3":
        pre_cfg.update(num_vision_tokens_per_image=256, max_images_per_prompt=2)
    if pkg == "gemma4":
        pre_cfg.update(GEMMA4_PREPROCESSOR)
    files["preprocessor.json"] = _object(pkg, "causal_lm_preprocessor", pre_cfg)
    files["task.json"] = _object(
        pkg,
        "causal_lm",
        {
            "backbone": files["config.json"],
            "preprocessor": files["preprocessor.json"],
            "name": f"{pkg}_causal_lm",
        },
    )
    files["metadata.json"] = {
        "keras_version": "3",
        "keras_hub_version": "0.32.0",
        "parameter_count": cfg.num_params(),
        "tasks": ["CausalLM"],
    }
    for name, obj in files.items():
        text = json.dumps(obj, indent=4) + "\n"
        atomic_write(folder / name, lambda tmp, text=text: Path(tmp).write_text(text))
    tokenizer.save(folder / VOCAB)
    return folder
