"""GemmaConfig: every number that changes the logits, with Hugging Face field names, plus the official presets.

One config drives the one model definition in model.py; generation differences (Gemma 1/2/3) are fields here.
Numbers and their sources: shared/docs/gemma-spec.md §1-2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import GemmaError

FAMILIES = ("gemma", "gemma2", "gemma3")
SLIDING, GLOBAL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class GemmaConfig:
    family: str  # "gemma" (Gemma 1), "gemma2" or "gemma3": selects norm layout, QK-norm, default layer pattern
    vocab_size: int  # rows of the (tied) embedding
    hidden_size: int  # D
    intermediate_size: int  # F, width of each of gate/up
    num_hidden_layers: int  # L
    num_attention_heads: int  # N query heads
    num_key_value_heads: int  # K kv heads (1 = MQA)
    head_dim: int  # H; never D/N (spec §1.5)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192  # the context length
    rope_theta: float = 10_000.0  # RoPE base of global layers (and of all layers in Gemma 1/2)
    rope_local_base_freq: float = 10_000.0  # RoPE base of sliding-window layers (Gemma 3)
    rope_scaling_factor: float = 1.0  # linear position scaling, global layers only (Gemma 3 4B/12B/27B: 8)
    query_pre_attn_scalar: float = 256.0  # attention scale = this ** -0.5 (spec §1.5)
    attn_logit_softcapping: float | None = None  # Gemma 2: 50, applied to scaled scores before the mask
    final_logit_softcapping: float | None = None  # Gemma 2: 30, applied to the logits
    sliding_window: int | None = None  # W: key j visible from query i iff 0 <= i - j < W, on sliding layers
    layer_types: tuple[str, ...] = field(default=())  # per layer SLIDING or GLOBAL; default from the family
    tie_word_embeddings: bool = True  # every official model ties the LM head to the embedding
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    name: str = ""  # preset name or the source's own name, for display only

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise GemmaError(f"unknown Gemma family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.family, self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.family == "gemma":  # Gemma 1 always scales queries by head_dim ** -0.5 (HF GemmaAttention)
            object.__setattr__(self, "query_pre_attn_scalar", float(self.head_dim))
        if len(self.layer_types) != self.num_hidden_layers:
            raise GemmaError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise GemmaError("config has sliding-window layers but no sliding_window size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise GemmaError("num_attention_heads must be a multiple of num_key_value_heads")

    # Derived facts, named so the model code reads like the spec.
    @property
    def post_norms(self) -> bool:
        """Gemma 2/3 norm the attention and MLP outputs too (spec §1.1); Gemma 1 does not."""
        return self.family != "gemma"

    @property
    def qk_norm(self) -> bool:
        return self.family == "gemma3"

    @property
    def scaling(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def rope_base(self, layer: int) -> float:
        return self.rope_local_base_freq if self.layer_types[layer] == SLIDING else self.rope_theta

    def rope_scale(self, layer: int) -> float:
        return 1.0 if self.layer_types[layer] == SLIDING else self.rope_scaling_factor

    @property
    def end_of_turn_id(self) -> int:
        """<end_of_turn> id, a stop token for instruction-tuned models (spec §5.2)."""
        return 106 if self.family == "gemma3" else 107

    def replace(self, **changes: Any) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count with the embedding counted once (it is tied)."""
        d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                         self.num_key_value_heads, self.head_dim)
        attn = d * n * h * 2 + d * k * h * 2 + (2 * h if self.qk_norm else 0)
        norms = d * (4 if self.post_norms else 2)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return head + self.vocab_size * d + self.num_hidden_layers * (attn + 3 * d * f + norms) + d

    def to_hf(self) -> dict[str, Any]:
        """The equivalent transformers config.json dict (the reference the parity tests build)."""
        model_type = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[self.family]
        arch = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[self.family]
        d: dict[str, Any] = dict(
            architectures=[arch], model_type=model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=self.max_position_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=False, torch_dtype="float32",
        )
        if self.family == "gemma3":
            full = {"rope_type": "default", "rope_theta": self.rope_theta}
            if self.rope_scaling_factor != 1.0:
                full = {"rope_type": "linear", "factor": self.rope_scaling_factor, "rope_theta": self.rope_theta}
            d["rope_parameters"] = {"full_attention": full,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq}}
        else:
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.family != "gemma":
            qpas = self.query_pre_attn_scalar
            d.update(query_pre_attn_scalar=int(qpas) if qpas == int(qpas) else qpas, sliding_window=self.sliding_window,
                     layer_types=list(self.layer_types), attn_logit_softcapping=self.attn_logit_softcapping,
                     final_logit_softcapping=self.final_logit_softcapping)
        return d


def default_layer_types(family: str, n_layers: int) -> tuple[str, ...]:
    """Gemma 1: all global. Gemma 2: even layers slide. Gemma 3: every 6th layer (i % 6 == 5) is global (spec §1.5)."""
    if family == "gemma":
        return (GLOBAL,) * n_layers
    if family == "gemma2":
        return tuple(SLIDING if i % 2 == 0 else GLOBAL for i in range(n_layers))
    return tuple(GLOBAL if i % 6 == 5 else SLIDING for i in range(n_layers))


def from_hf(cfg: dict[str, Any]) -> GemmaConfig:
    """Read a transformers config.json (v4 or v5 field spellings; multimodal Gemma 3 nests a text_config)."""
    if "text_config" in cfg and cfg.get("model_type") == "gemma3":
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
    model_type = cfg.get("model_type")
    family = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}.get(model_type)
    if family is None:
        raise GemmaError(f"config.json has model_type {model_type!r}; gemmakit supports gemma, gemma2, gemma3_text")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu", "gelu_pytorch_tanh"):  # Gemma 1 Hub configs say "gelu" but mean tanh-GELU (spec §1.6)
        raise GemmaError(f"config.json has activation {act!r}; Gemma uses gelu_pytorch_tanh")
    rope = cfg.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    local = rope.get("sliding_attention", {})
    legacy_scaling = cfg.get("rope_scaling") or {}
    theta = full.get("rope_theta", cfg.get("rope_theta", 1e6 if family == "gemma3" else 1e4))
    factor = full.get("factor", legacy_scaling.get("factor", 1.0)) if (
        full.get("rope_type", legacy_scaling.get("rope_type", "default")) == "linear") else 1.0
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if family == "gemma3" and not types and cfg.get("sliding_window_pattern"):
        p = cfg["sliding_window_pattern"]
        types = [SLIDING if (i + 1) % p else GLOBAL for i in range(layers)]
    n_heads = cfg["num_attention_heads"]
    return GemmaConfig(
        family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=layers, num_attention_heads=n_heads,
        num_key_value_heads=cfg.get("num_key_value_heads", n_heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        rope_theta=float(theta),
        rope_local_base_freq=float(local.get("rope_theta", cfg.get("rope_local_base_freq", 1e4))),
        rope_scaling_factor=float(factor),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 256),
        attn_logit_softcapping=cfg.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_logit_softcapping=cfg.get("final_logit_softcapping") if family != "gemma" else None,
        sliding_window=cfg.get("sliding_window") if family != "gemma" else None,
        layer_types=tuple(types or ()), tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        bos_token_id=_first(cfg.get("bos_token_id"), 2), eos_token_id=_first(cfg.get("eos_token_id"), 1),
        pad_token_id=_first(cfg.get("pad_token_id"), 0), name=cfg.get("_name_or_path", "") or "",
    )


def _first(v: Any, default: int) -> int:
    if isinstance(v, list):
        return v[0] if v else default
    return default if v is None else int(v)


# Official presets (spec §2; sources: gemma_pytorch config.py, google-deepmind/gemma _config.py, HF convert scripts).
def _g1(**kw: Any) -> GemmaConfig:
    return GemmaConfig(family="gemma", vocab_size=256000, head_dim=256, max_position_embeddings=8192, **kw)


def _g2(**kw: Any) -> GemmaConfig:
    kw.setdefault("query_pre_attn_scalar", 256.0)
    return GemmaConfig(family="gemma2", vocab_size=256000, max_position_embeddings=8192, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **kw)


def _g3(**kw: Any) -> GemmaConfig:
    kw.setdefault("head_dim", 256)
    kw.setdefault("query_pre_attn_scalar", 256.0)
    return GemmaConfig(family="gemma3", vocab_size=262144, rope_theta=1e6, rope_local_base_freq=1e4, **kw)


PRESETS: dict[str, GemmaConfig] = {
    "gemma-2b": _g1(name="gemma-2b", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                    num_attention_heads=8, num_key_value_heads=1),
    "gemma-7b": _g1(name="gemma-7b", hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=16),
    "gemma-2-2b": _g2(name="gemma-2-2b", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256),
    "gemma-2-9b": _g2(name="gemma-2-9b", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256),
    "gemma-2-27b": _g2(name="gemma-2-27b", hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                       num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144.0),
    "gemma-3-270m": _g3(name="gemma-3-270m", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, sliding_window=512,
                        max_position_embeddings=32768),
    "gemma-3-1b": _g3(name="gemma-3-1b", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, sliding_window=512,
                      max_position_embeddings=32768),
    "gemma-3-4b": _g3(name="gemma-3-4b", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, sliding_window=1024, rope_scaling_factor=8.0,
                      max_position_embeddings=131072),
    "gemma-3-12b": _g3(name="gemma-3-12b", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, sliding_window=1024, rope_scaling_factor=8.0,
                       max_position_embeddings=131072),
    "gemma-3-27b": _g3(name="gemma-3-27b", hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                       num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168.0,
                       sliding_window=1024, rope_scaling_factor=8.0, max_position_embeddings=131072),
}


def preset(name: str) -> GemmaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise GemmaError(f"unknown variant {name!r}; known variants: {', '.join(PRESETS)}") from None


def embed_scale(hidden_size: int) -> float:
    """sqrt(D) in Python float; the model rounds it to its dtype before the multiply (spec §1.2)."""
    return math.sqrt(hidden_size)
