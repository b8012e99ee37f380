"""Adapters as module swaps: inject LoRALinear into a Gemma, save/load them in the PEFT file format, merge them.

The PEFT format (peft `save_pretrained`, read by `PeftModel.from_pretrained`): a folder with `adapter_config.json`
and `adapter_model.safetensors`, whose keys are the module path under the causal-LM model prefixed by
`base_model.model.`, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. gemmakit uses
transformers' parameter names, so the paths are the same without any table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import GemmaError
from ..weights.writers import atomic_write
from .linear import LoRALinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
EXTRA_NAME = (
    "gemmakit_adapter.json"  # facts PEFT has no field for (the base's quantization), beside its files
)


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    base_model: str = ""  # where the base came from, recorded in adapter_config.json
    extra: dict[str, Any] = field(default_factory=dict)  # gemmakit facts (base quantization), in EXTRA_NAME

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise GemmaError(
                f"unknown LoRA target(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TARGETS)}"
            )

    def to_peft(self) -> dict[str, Any]:
        """adapter_config.json contents: the fields PEFT's LoraConfig needs for a plain LoRA."""
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model or None,
            "revision": None,
        }

    @classmethod
    def from_peft(cls, raw: dict[str, Any], source: Path) -> LoRAConfig:
        if raw.get("peft_type") != "LORA":
            raise GemmaError(f"{source}: peft_type is {raw.get('peft_type')!r}; gemmakit loads LoRA adapters")
        unsupported = {k: raw.get(k) for k in ("use_dora", "use_rslora", "fan_in_fan_out") if raw.get(k)}
        if raw.get("bias", "none") != "none":
            unsupported["bias"] = raw["bias"]
        for k in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
            if raw.get(k):
                unsupported[k] = raw[k]
        if unsupported:
            raise GemmaError(f"{source}: adapter options {unsupported} are not supported; use a plain LoRA")
        targets = raw.get("target_modules")
        if isinstance(targets, str):
            raise GemmaError(
                f"{source}: target_modules is a regex ({targets!r}); list the module names instead"
            )
        return cls(
            r=int(raw["r"]),
            alpha=float(raw["lora_alpha"]),
            dropout=float(raw.get("lora_dropout", 0.0)),
            targets=tuple(targets or ()),
            base_model=raw.get("base_model_name_or_path") or "",
        )


def inject(module: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of `module` and wrap each target linear in a LoRALinear; returns the wrapped names."""
    for p in module.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, child in list(module.named_modules()):
        if name.rpartition(".")[2] in cfg.targets and not isinstance(child, LoRALinear):
            parent, _, attr = name.rpartition(".")
            lora = LoRALinear.from_base(child, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
            setattr(module.get_submodule(parent), attr, lora.train(child.training))  # eval model: no dropout
            wrapped.append(name)
    if not wrapped:
        raise GemmaError(f"no module named {', '.join(cfg.targets)} found to attach LoRA to")
    module.lora_config = cfg
    if getattr(module, "fused_decode", None) is not None:
        module.fused_decode = None  # the native decode step (Q8 fast path) reads the base weights only
    return wrapped


def lora_layers(module: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear))


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's saved names (`base_model.model.<path>.lora_A.weight`), fp32, contiguous, on CPU."""
    out = {}
    for name, layer in lora_layers(module):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().cpu().contiguous()
    if not out:
        raise GemmaError("this model has no LoRA layers to save; call inject() first")
    return out


def save_adapter(module: nn.Module, folder: str | Path, cfg: LoRAConfig | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into `folder`, each file atomically."""
    cfg = cfg or getattr(module, "lora_config", None)
    if cfg is None:
        raise GemmaError("no LoRAConfig given and the module carries none; call inject() first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(module)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(cfg.to_peft(), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    if cfg.extra:
        extra = json.dumps(cfg.extra, indent=2, sort_keys=True) + "\n"
        atomic_write(folder / EXTRA_NAME, lambda tmp: Path(tmp).write_text(extra))
    return folder


def read_adapter(folder: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    folder = Path(folder).expanduser()
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.exists():
        raise GemmaError(f"{folder} is not a LoRA adapter folder: it has no {CONFIG_NAME}")
    if not weights.exists():
        raise GemmaError(
            f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter was not saved completely"
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise GemmaError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise GemmaError(f"{weights} cannot be read ({e}); the file is truncated or corrupt") from None
    cfg = LoRAConfig.from_peft(raw, cfg_path)
    if (folder / EXTRA_NAME).exists():
        cfg = replace(cfg, extra=json.loads((folder / EXTRA_NAME).read_text()))
    return cfg, state


def load_adapter(module: nn.Module, folder: str | Path) -> LoRAConfig:
    """Inject the adapter saved in `folder` into `module` and load its weights strictly."""
    cfg, state = read_adapter(folder)
    inject(module, cfg)
    load_adapter_weights(module, state, Path(folder))
    return cfg


def load_adapter_weights(module: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy PEFT-named LoRA tensors into the module's LoRA layers; every key must match, both ways."""
    params = {}
    for name, layer in lora_layers(module):
        params[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        params[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    state = {_strip_adapter_name(k): v for k, v in state.items()}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has unexpected {extra[0]}"
        raise GemmaError(
            f"{source}: the adapter {what} ({len(missing)} missing, {len(extra)} unexpected); "
            "it was trained for another model or other target modules"
        )
    with torch.no_grad():
        for k, p in params.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise GemmaError(
                    f"{source}: {k} has shape {tuple(state[k].shape)}, the model needs "
                    f"{tuple(p.shape)}; the adapter belongs to another model size"
                )
            p.copy_(state[k])


def merge(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every LoRA layer into a plain nn.Linear (in place); returns `module`, now adapter-free."""
    for name, layer in list(lora_layers(module)):
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, layer.merge(dtype))
    module.lora_config = None
    return module


def unload(module: nn.Module) -> nn.Module:
    """Remove every adapter, putting the untouched base layers back (the inverse of inject)."""
    for name, layer in list(lora_layers(module)):
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, layer.base_layer)
    module.lora_config = None
    return module


def _strip_adapter_name(key: str) -> str:
    """PEFT may save `...lora_A.default.weight` from multi-adapter models; the file format drops the name."""
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
