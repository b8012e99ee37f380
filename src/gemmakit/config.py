"""GemmaConfig: every number that changes the logits, with Hugging Face field names, plus the official presets.

One config drives the one model definition in model.py; generation differences (Gemma 1/2/3/4) are fields here.
Numbers and their sources: shared/docs/gemma-spec.md §1-2; Gemma 4: transformers 5.24
`models/gemma4/configuration_gemma4.py` (Gemma4TextConfig) and `modeling_gemma4.py` (cited as HF-G4 below);
Gemma 3n: transformers `models/gemma3n/configuration_gemma3n.py` (Gemma3nTextConfig, cited as HF-3N).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import GemmaError

FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3n", "gemma4")
SLIDING, GLOBAL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class GemmaConfig:
    family: str  # "gemma" (Gemma 1), "gemma2", "gemma3", "gemma3n" or "gemma4": norms, QK-norm, layer pattern
    vocab_size: int  # rows of the (tied) embedding
    hidden_size: int  # D
    intermediate_size: int  # F, width of each of gate/up (Gemma 3n: of layer 0; see intermediate_sizes)
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
    # An encoder (EmbeddingGemma): every query sees keys on both sides; on sliding layers iff |i - j| <= W, so W is
    # then a radius: HF Gemma 3 turns its config's W into W // 2 + 1 exclusive (= W // 2 inclusive) and from_hf
    # stores W // 2; EmbeddingGemma 2 configs already give the inclusive radius (HF masking_utils overlays).
    use_bidirectional_attention: bool = False
    layer_types: tuple[str, ...] = field(default=())  # per layer SLIDING or GLOBAL; default from the family
    tie_word_embeddings: bool = True  # every official model ties the LM head to the embedding
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    name: str = ""  # preset name or the source's own name, for display only
    # Gemma 4 (HF-G4 Gemma4TextConfig names; every default switches the feature off, so Gemma 1-3 are unchanged).
    global_head_dim: int | None = None  # H of full-attention layers (Gemma 4: 512); None = head_dim
    num_global_key_value_heads: int | None = None  # K of full-attention layers; HF-G4 applies it only with k_eq_v
    attention_k_eq_v: bool = False  # full-attention layers have no v_proj: values come from k_proj's output
    partial_rotary_factor: float = 1.0  # proportional RoPE on full-attention layers: share of H/2 pairs rotated
    hidden_size_per_layer_input: int = 0  # PLE: per-layer embedding width (0 = no per-layer embeddings)
    vocab_size_per_layer_input: int = 0  # PLE: rows of the packed [V_ple, L * ple] table
    num_kv_shared_layers: int = 0  # the last this-many layers reuse the KV of an earlier layer of their type
    use_double_wide_mlp: bool = False  # KV-shared layers get an MLP of width 2F
    enable_moe_block: bool = False  # every layer adds a routed mixture of experts beside its dense MLP
    num_experts: int = 0  # E experts per MoE layer
    top_k_experts: int = 0  # experts each token is routed to
    moe_intermediate_size: int = 0  # width of each expert's gate/up
    unified: bool = False  # Gemma 4 12B Unified (transformers `gemma4_unified_text`): the same decoder, never PLE/MoE
    # Gemma 3n (HF-3N Gemma3nTextConfig names). It also uses the per-layer embedding and KV-sharing fields above.
    altup_num_inputs: int = 0  # AltUp: parallel copies ("streams") of the residual stream; 0 = no AltUp
    altup_active_idx: int = 0  # the stream a layer computes on; the others are predicted and corrected
    altup_coef_clip: float | None = None  # training only: AltUp coefficient weights clamped to +-this (HF-3N)
    altup_correct_scale: bool = False  # the corrected active stream is scaled by correct_output_scale before PLE
    laurel_rank: int = 0  # LAuReL: width of the low-rank residual branch beside attention; 0 = none
    activation_sparsity_pattern: tuple[float, ...] = ()  # per layer: share of gate activations a Gaussian top-k
    #   zeroes (E2B/E4B: 0.95 in the first 10 layers); () = none
    intermediate_sizes: tuple[int, ...] = ()  # per-layer MLP widths (HF-3N intermediate_size given as a list)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise GemmaError(f"unknown Gemma family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.family, self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.family == "gemma":  # Gemma 1 always scales queries by head_dim ** -0.5 (HF GemmaAttention)
            object.__setattr__(self, "query_pre_attn_scalar", float(self.head_dim))
        if self.family in ("gemma3n", "gemma4"):  # no query scale: scaling = 1.0, q_norm sets it (HF-G4, HF-3N)
            object.__setattr__(self, "query_pre_attn_scalar", 1.0)
        if self.family == "gemma4":
            object.__setattr__(self, "global_head_dim", self.global_head_dim or self.head_dim)
        for name, kind in (("activation_sparsity_pattern", float), ("intermediate_sizes", int)):
            object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        if self.family == "gemma3n":  # one entry per layer, as transformers stores them (HF-3N __post_init__)
            n = self.num_hidden_layers
            object.__setattr__(self, "intermediate_sizes", self.intermediate_sizes or (self.intermediate_size,) * n)
            object.__setattr__(self, "activation_sparsity_pattern", self.activation_sparsity_pattern or (0.0,) * n)
        if len(self.layer_types) != self.num_hidden_layers:
            raise GemmaError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise GemmaError("config has sliding-window layers but no sliding_window size")
        if self.num_attention_heads % self.num_key_value_heads or (
                self.num_global_key_value_heads and self.num_attention_heads % self.num_global_key_value_heads):
            raise GemmaError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.family == "gemma4":
            from .config_gemma4 import check_gemma4

            check_gemma4(self)
        elif self.family == "gemma3n":
            from .config_gemma3n import check_gemma3n

            check_gemma3n(self)
        _check_family_fields(self)

    # Derived facts, named so the model code reads like the spec.
    @property
    def post_norms(self) -> bool:
        """Gemma 2/3 norm the attention and MLP outputs too (spec §1.1); Gemma 1 does not."""
        return self.family != "gemma"

    @property
    def qk_norm(self) -> bool:
        return self.family in ("gemma3", "gemma3n", "gemma4")

    @property
    def v_norm(self) -> bool:
        """Gemma 3n and 4 RMS-normalise the values too, without a weight (HF-G4, HF-3N)."""
        return self.family in ("gemma3n", "gemma4")

    @property
    def norm_offset(self) -> float:
        """Gemma 1-3 norms scale by (1 + w) (spec §1.3); Gemma 3n and 4 by w itself (Gemma3nRMSNorm, HF-G4)."""
        return 0.0 if self.family in ("gemma3n", "gemma4") else 1.0

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, layer: int) -> int:
        """The layer whose keys/values `layer` attends to: itself, or for a KV-shared layer the last layer of its
        type before the shared block (HF-G4 Gemma4TextConfig.kv_sharing_modes: that layer "stores", these "reuse")."""
        first = self.first_kv_shared_layer
        if layer < first:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(first) if self.layer_types[i] == kind)

    def layer_head_dim(self, layer: int) -> int:
        """Full-attention layers of Gemma 4 have their own head dim (HF-G4 per_layer_config head_dim)."""
        return (self.global_head_dim or self.head_dim) if self.layer_types[layer] == GLOBAL else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        if self.layer_types[layer] == GLOBAL and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def k_eq_v(self, layer: int) -> bool:
        """HF-G4 use_alternative_attention: attention_k_eq_v on a full-attention layer."""
        return self.attention_k_eq_v and self.layer_types[layer] == GLOBAL

    def layer_intermediate(self, layer: int) -> int:
        """MLP width: Gemma 3n's per-layer list; doubled on KV-shared layers when use_double_wide_mlp (HF-G4)."""
        if self.intermediate_sizes:
            return self.intermediate_sizes[layer]
        wide = self.use_double_wide_mlp and layer >= self.first_kv_shared_layer
        return self.intermediate_size * (2 if wide else 1)

    def activation_sparsity(self, layer: int) -> float:
        return self.activation_sparsity_pattern[layer] if self.activation_sparsity_pattern else 0.0

    def rotary_fraction(self, layer: int) -> float:
        """Share of the head's frequency pairs RoPE rotates: partial_rotary_factor on full-attention layers."""
        return self.partial_rotary_factor if self.layer_types[layer] == GLOBAL else 1.0

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
        return 106 if self.family in ("gemma3", "gemma3n", "gemma4") else 107

    def replace(self, **changes: Any) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count with the embedding counted once (it is tied); Gemma 4's layer_scalar is a buffer."""
        d, n, L = self.hidden_size, self.num_attention_heads, self.num_hidden_layers
        total = self.vocab_size * d + d + (0 if self.tie_word_embeddings else self.vocab_size * d)
        if self.hidden_size_per_layer_input:  # PLE table, its projection and norm; per layer gate, proj, norm
            p = self.hidden_size_per_layer_input
            total += (self.vocab_size_per_layer_input + d) * L * p + p + L * (2 * d * p + d)
        if self.enable_moe_block:  # router (proj, scale, per-expert scale), experts, three extra norms
            e, i = self.num_experts, self.moe_intermediate_size
            total += L * (d * e + d + e + 3 * e * i * d + 3 * d)
        if self.altup_num_inputs:  # stream (un)embedding projections; per layer the router, its norm, coefficients
            s = self.altup_num_inputs
            total += 2 * (s - 1) * d * d + L * (d * s + d + s * s + s**3 + d)
        if self.laurel_rank:  # per layer: left and right factors, post-norm
            total += L * (2 * d * self.laurel_rank + d)
        for layer in range(L):
            h, k = self.layer_head_dim(layer), self.layer_kv_heads(layer)
            total += 2 * d * n * h + (h if self.qk_norm else 0)  # q, o, q_norm
            if self.kv_source(layer) == layer:  # k (+ v) and k_norm; shared layers have none
                total += d * k * h * (1 if self.k_eq_v(layer) else 2) + (h if self.qk_norm else 0)
            total += 3 * d * self.layer_intermediate(layer) + d * (4 if self.post_norms else 2)
        return total

    def to_hf(self) -> dict[str, Any]:
        """The equivalent transformers config.json dict (the reference the parity tests build)."""
        if self.family == "gemma4":
            from .config_gemma4 import gemma4_to_hf

            return gemma4_to_hf(self)
        if self.family == "gemma3n":
            from .config_gemma3n import gemma3n_to_hf

            return gemma3n_to_hf(self)
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
        if self.use_bidirectional_attention:  # HF halves the window it reads back (see the field's comment)
            d.update(use_bidirectional_attention=True, architectures=["Gemma3TextModel"])
        if self.family != "gemma":
            qpas = self.query_pre_attn_scalar
            window = self.sliding_window * 2 if self.use_bidirectional_attention and self.sliding_window else (
                self.sliding_window)
            d.update(query_pre_attn_scalar=int(qpas) if qpas == int(qpas) else qpas, sliding_window=window,
                     layer_types=list(self.layer_types), attn_logit_softcapping=self.attn_logit_softcapping,
                     final_logit_softcapping=self.final_logit_softcapping)
        return d


def default_layer_types(family: str, n_layers: int) -> tuple[str, ...]:
    """Gemma 1: all global. Gemma 2: even layers slide. Gemma 3: every 6th layer (i % 6 == 5) is global (spec §1.5).
    Gemma 4: the same 5:1 pattern with the last layer forced to global (HF-G4 Gemma4TextConfig.__post_init__).
    Gemma 3n: every 5th layer is global (HF-3N Gemma3nTextConfig.__post_init__)."""
    if family == "gemma3n":
        return tuple(GLOBAL if (i + 1) % 5 == 0 else SLIDING for i in range(n_layers))
    if family == "gemma":
        return (GLOBAL,) * n_layers
    if family == "gemma2":
        return tuple(SLIDING if i % 2 == 0 else GLOBAL for i in range(n_layers))
    types = tuple(GLOBAL if i % 6 == 5 else SLIDING for i in range(n_layers))
    return types[:-1] + (GLOBAL,) if family == "gemma4" and types else types


def from_hf(cfg: dict[str, Any]) -> GemmaConfig:
    """Read a transformers config.json (v4 or v5 field spellings; multimodal Gemma 3 nests a text_config)."""
    if "text_config" in cfg and cfg.get("model_type") in ("gemma3", "gemma3n", "gemma4", "gemma4_unified"):
        cfg = {**cfg["text_config"], "model_type": cfg["model_type"] + "_text"}
    model_type = cfg.get("model_type")
    if model_type == "embedding_gemma2" and "text_config" in cfg:
        cfg = {**cfg["text_config"], "model_type": "embedding_gemma2_text"}
        model_type = cfg["model_type"]
    if model_type == "embedding_gemma2_text":
        from .config_gemma4 import embedding_gemma2_from_hf

        return embedding_gemma2_from_hf(cfg)
    if model_type in ("gemma4_text", "gemma4_unified_text"):
        from .config_gemma4 import gemma4_from_hf

        return gemma4_from_hf(cfg)
    if model_type == "gemma3n_text":
        from .config_gemma3n import gemma3n_from_hf

        return gemma3n_from_hf(cfg)
    family = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}.get(model_type)
    if family is None:
        raise GemmaError(f"config.json has model_type {model_type!r}; gemmakit supports gemma, gemma2, gemma3_text, "
                         "gemma3n_text, gemma4_text, gemma4_unified_text, embedding_gemma2_text (and the text part of "
                         "gemma3/gemma3n/gemma4/gemma4_unified/embedding_gemma2)")
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
        sliding_window=_window(cfg) if family != "gemma" else None,
        use_bidirectional_attention=bool(cfg.get("use_bidirectional_attention")) and family == "gemma3",
        layer_types=tuple(types or ()), tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        bos_token_id=_first(cfg.get("bos_token_id"), 2), eos_token_id=_first(cfg.get("eos_token_id"), 1),
        pad_token_id=_first(cfg.get("pad_token_id"), 0), name=cfg.get("_name_or_path", "") or "",
    )


def _window(cfg: dict[str, Any]) -> int | None:
    """Gemma 3 bidirectional (EmbeddingGemma): HF reads W as W // 2 + 1 exclusive, i.e. |i - j| <= W // 2
    (transformers Gemma3TextConfig.__post_init__ and _bidirectional_window_overlay; llama.cpp: n_swa / 2)."""
    w = cfg.get("sliding_window")
    if w and cfg.get("use_bidirectional_attention") and cfg.get("model_type") in ("gemma3_text", "gemma3"):
        return int(w) // 2
    return w


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GemmaConfig)}
# Fields that only some families use; any other family must leave them at their defaults (off).
_FAMILY_FIELDS = {
    "gemma4": ("global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "partial_rotary_factor",
               "use_double_wide_mlp", "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size",
               "unified"),
    "gemma3n": ("altup_num_inputs", "altup_active_idx", "altup_coef_clip", "altup_correct_scale", "laurel_rank",
                "activation_sparsity_pattern", "intermediate_sizes"),
    "gemma3n+gemma4": ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers"),
}


def check_kv_sharing(cfg: GemmaConfig) -> None:
    """The shared layers need an earlier layer of each of their types to compute keys/values (HF kv_sharing_modes)."""
    n = cfg.num_hidden_layers
    if not 0 <= cfg.num_kv_shared_layers < n:
        raise GemmaError(f"num_kv_shared_layers={cfg.num_kv_shared_layers} must lie in [0, {n}): some layer must "
                         "compute the keys and values the shared layers reuse")
    first = cfg.first_kv_shared_layer
    if not set(cfg.layer_types[first:]) <= set(cfg.layer_types[:first]):
        raise GemmaError("a KV-shared layer has a layer type that no earlier layer computes keys/values for")


def _check_family_fields(cfg: GemmaConfig) -> None:
    for owners, names in _FAMILY_FIELDS.items():
        if cfg.family in owners.split("+"):
            continue
        odd = [k for k in names if getattr(cfg, k) != _DEFAULTS[k]]
        if odd:
            names = owners.replace("gemma3n", "Gemma 3n").replace("gemma4", "Gemma 4").replace("+", "/")
            raise GemmaError(f"{odd[0]} is a {names} setting; this config is family {cfg.family!r}")


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


def _g4(*, layer_types: tuple[str, ...] = (SLIDING,) * 5 + (GLOBAL,), **kw: Any) -> GemmaConfig:
    """A Gemma 4 preset; `layer_types` is the repeating pattern (the layer count is a multiple of it)."""
    kw.setdefault("sliding_window", 512)
    kw.setdefault("max_position_embeddings", 131072)
    if kw.get("hidden_size_per_layer_input"):
        kw["vocab_size_per_layer_input"] = 262144
    return GemmaConfig(family="gemma4", vocab_size=262144, head_dim=256, global_head_dim=512, rope_theta=1e6,
                       rope_local_base_freq=1e4, partial_rotary_factor=0.25, final_logit_softcapping=30.0,
                       layer_types=layer_types * (kw["num_hidden_layers"] // len(layer_types)), **kw)


def _g3n(**kw: Any) -> GemmaConfig:
    """A Gemma 3n preset: transformers' Gemma3nTextConfig defaults (the E4B Hub config) where not given."""
    n = kw["num_hidden_layers"]
    return GemmaConfig(family="gemma3n", vocab_size=262400, hidden_size=2048, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=256, max_position_embeddings=32768, rope_theta=1e6,
                       rope_local_base_freq=1e4, sliding_window=512, final_logit_softcapping=30.0,
                       hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144, altup_num_inputs=4,
                       altup_coef_clip=120.0, altup_correct_scale=True, laurel_rank=64,
                       activation_sparsity_pattern=(0.95,) * 10 + (0.0,) * (n - 10),
                       **kw)


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
    # Gemma 4 text decoders: transformers models/gemma4/convert_gemma4_weights.py `_VARIANTS` (the Hub configs), the
    # same numbers as google-deepmind/gemma gemma/gm/nn/gemma4/_gemma4.py. Defaults there: head_dim 256,
    # global_head_dim 512, sliding_window 512, context 131072, RoPE theta 1e6 proportional x0.25 / 1e4.
    "gemma-4-e2b": _g4(name="gemma-4-e2b", hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                       layer_types=(SLIDING,) * 4 + (GLOBAL,), num_attention_heads=8, num_key_value_heads=1,
                       hidden_size_per_layer_input=256, num_kv_shared_layers=20, use_double_wide_mlp=True),
    "gemma-4-e4b": _g4(name="gemma-4-e4b", hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
                       num_attention_heads=8, num_key_value_heads=2, hidden_size_per_layer_input=256,
                       num_kv_shared_layers=18),
    "gemma-4-31b": _g4(name="gemma-4-31b", hidden_size=5376, intermediate_size=21504, num_hidden_layers=60,
                       num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4,
                       attention_k_eq_v=True, sliding_window=1024, max_position_embeddings=262144),
    "gemma-4-26b-a4b": _g4(name="gemma-4-26b-a4b", hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                           num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
                           attention_k_eq_v=True, enable_moe_block=True, num_experts=128, top_k_experts=8,
                           moe_intermediate_size=704, sliding_window=1024, max_position_embeddings=262144),
    # Gemma 4 12B Unified (transformers 5.25 `gemma4_unified`): dense, no PLE, no MoE, 48 layers, global head dim
    # 512; window 1024 and context 262144 are Gemma4UnifiedTextConfig's defaults, and 3840 is its vision embedder's
    # default output width (= the text width). transformers ships no convert script with the Hub numbers: the head
    # counts and F are Gemma 3 12B's, to be checked against google/gemma-4-12B-it's config.json.
    "gemma-4-12b": _g4(name="gemma-4-12b", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, sliding_window=1024,
                       max_position_embeddings=262144, unified=True),
    # Gemma 3n text decoders (google/gemma-3n-E2B / -E4B text_config; E4B = transformers' Gemma3nTextConfig
    # defaults; E2B: 30 layers of width 8192, the last 10 KV-shared; both: 20 layers that compute keys/values, as
    # llama.cpp's gemma3n loader assumes).
    "gemma-3n-e2b": _g3n(name="gemma-3n-e2b", num_hidden_layers=30, intermediate_size=8192, num_kv_shared_layers=10),
    "gemma-3n-e4b": _g3n(name="gemma-3n-e4b", num_hidden_layers=35, intermediate_size=16384,
                         num_kv_shared_layers=15),
}


def preset(name: str) -> GemmaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise GemmaError(f"unknown variant {name!r}; known variants: {', '.join(PRESETS)}") from None


def embed_scale(hidden_size: int) -> float:
    """sqrt(D) in Python float; the model rounds it to its dtype before the multiply (spec §1.2)."""
    return math.sqrt(hidden_size)
