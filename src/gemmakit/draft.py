"""Gemma 4 assistant drafters (multi-token prediction): the model that proposes tokens for its target to verify.

transformers 5.25 `models/gemma4_assistant/modeling_gemma4_assistant.py` (cited as HF-A) and
`generation/candidate_generator.py` SinglePositionMultiTokenCandidateGenerator (HF-MTP). A drafter is a small
Gemma 4 decoder whose layers own no keys or values: every layer reads the target's KV cache, the full-attention
layers that of the target's last full-attention layer, the sliding layers that of its last sliding layer. Its input
is the target's (scaled) embedding of the last token concatenated with the target's final hidden state that
predicted it, projected down (pre_projection); its output is the next token's logits and a hidden state projected
back to the target's width (post_projection), which feeds the next draft step. All steps of a round sit at one
position, the last token's, so the drafter keeps no cache of its own. The head is the drafter's tied embedding, or,
with `use_ordered_embeddings`, a centroid-routed head that scores only the tokens of the top-k centroids' clusters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import GLOBAL, SLIDING, GemmaConfig
from .config_gemma4 import gemma4_from_hf
from .errors import GemmaError
from .model import MLP, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from .quant.qlinear import QWeight, quantize_q8, swap_in
from .weights.gguf import GGMLQuantizationType as QT

ASSISTANT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


@dataclass(frozen=True)
class DrafterConfig:
    text: GemmaConfig  # the drafter's decoder (num_kv_shared_layers 0 here: its layers simply have no k/v)
    backbone_hidden_size: int  # the target's width: the hidden state it passes in and gets back
    use_ordered_embeddings: bool = False  # the centroid-routed head (HF-A Gemma4AssistantMaskedEmbedder)
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    model_type: str = "gemma4_assistant"

    def to_hf(self) -> dict[str, Any]:
        """transformers' Gemma4AssistantConfig dict (what the tests build the reference from, and `save` writes)."""
        text = {**self.text.to_hf(), "num_kv_shared_layers": self.text.num_hidden_layers,
                "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}
        if self.model_type == "gemma4_unified_assistant":
            text["model_type"] = "gemma4_unified_text"
            for k in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block", "num_experts",
                      "top_k_experts", "moe_intermediate_size"):
                text.pop(k, None)
        text.pop("architectures", None)
        arch = "Gemma4UnifiedAssistantForCausalLM" if "unified" in self.model_type else "Gemma4AssistantForCausalLM"
        return dict(architectures=[arch], model_type=self.model_type, text_config=text,
                    backbone_hidden_size=self.backbone_hidden_size,
                    use_ordered_embeddings=self.use_ordered_embeddings, num_centroids=self.num_centroids,
                    centroid_intermediate_top_k=self.centroid_intermediate_top_k, tie_word_embeddings=True)


def drafter_config_from_hf(raw: dict[str, Any]) -> DrafterConfig:
    """Read a gemma4_assistant / gemma4_unified_assistant config.json; refuse what HF-A validate_architecture does."""
    model_type = raw.get("model_type")
    if model_type not in ASSISTANT_TYPES:
        raise GemmaError(f"config.json has model_type {model_type!r}, not a Gemma 4 assistant drafter "
                         f"({' or '.join(ASSISTANT_TYPES)})")
    text = dict(raw.get("text_config") or {})
    text["model_type"] = "gemma4_unified_text" if "unified" in model_type else "gemma4_text"
    if text.get("hidden_size_per_layer_input") or text.get("enable_moe_block") or text.get("use_double_wide_mlp"):
        raise GemmaError("an assistant drafter has no per-layer embeddings, experts or double-wide MLP; this "
                         "config.json has one: it is not a Gemma 4 assistant")
    layers = text.get("num_hidden_layers", 30)
    if text.get("num_kv_shared_layers") not in (None, 0, layers):
        raise GemmaError("every layer of a Gemma 4 assistant reads the target's keys and values "
                         f"(num_kv_shared_layers must be {layers})")
    cfg = gemma4_from_hf({**text, "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0})
    return DrafterConfig(cfg, int(raw.get("backbone_hidden_size", 1536 if model_type == ASSISTANT_TYPES[0] else 3840)),
                         bool(raw.get("use_ordered_embeddings", False)), int(raw.get("num_centroids", 2048)),
                         int(raw.get("centroid_intermediate_top_k", 32)), model_type)


def is_drafter_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") in ASSISTANT_TYPES
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


class DraftAttention(nn.Module):
    """A query-only Gemma 4 attention (HF-G4 Gemma4TextAttention on a KV-shared layer): q_proj, q_norm, RoPE at the
    draft position, softmax over the target's keys (scale 1.0: q_norm sets it), o_proj."""

    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.layer_head_dim(layer)
        self.kind = cfg.layer_types[layer]
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], kv: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        keys, values, bias = kv  # (B, K, S, H) twice, (B, 1, 1, S) additive mask: 0 seen, -inf not
        B, K = x.shape[0], keys.shape[1]
        if keys.shape[-1] != self.head_dim or self.n_heads % K:
            raise GemmaError(f"the drafter's {self.kind} layers have {self.n_heads} heads of {self.head_dim} but the "
                             f"target's keys have {K} heads of {keys.shape[-1]}: this drafter is for another model")
        q = apply_rope(self.q_norm(self.q_proj(x).reshape(B, 1, self.n_heads, self.head_dim).transpose(1, 2)), *rope)
        q = q.reshape(B, K, self.n_heads // K, self.head_dim)  # query heads grouped by their KV head
        scores = (q @ keys.transpose(-1, -2)).float() + bias
        out = torch.softmax(scores, dim=-1).to(q.dtype) @ values  # (B, K, rep, H)
        return self.o_proj(out.reshape(B, 1, self.n_heads * self.head_dim))


class DraftBlock(nn.Module):
    """HF-G4 Gemma4TextDecoderLayer without PLE or experts: sandwich norms around attention and MLP, layer_scalar."""

    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = DraftAttention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        self.input_layernorm = RMSNorm(d, eps, 0.0)
        self.post_attention_layernorm = RMSNorm(d, eps, 0.0)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, 0.0)
        self.post_feedforward_layernorm = RMSNorm(d, eps, 0.0)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], kv: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, kv))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class MaskedEmbedder(nn.Module):
    """HF-A Gemma4AssistantMaskedEmbedder: route the hidden state to its top-k centroids and score only the tokens of
    their clusters (token_ordering lists the vocabulary cluster by cluster); every other token gets the smallest
    score minus 1, so it is never the arg-max and has near-zero probability."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        v, c = cfg.text.vocab_size, cfg.num_centroids
        if v % c:
            raise GemmaError(f"vocab_size {v} is not a multiple of num_centroids {c}")
        self.top_k = cfg.centroid_intermediate_top_k
        self.centroids = nn.Linear(cfg.text.hidden_size, c, bias=False)
        self.register_buffer("token_ordering", torch.arange(v, dtype=torch.long))

    def forward(self, h: Tensor, head_weight: Tensor) -> Tensor:
        """h (B, D) -> logits (B, V) in h's dtype."""
        top = torch.topk(self.centroids(h), k=self.top_k, dim=-1).indices  # (B, top_k)
        clusters = self.token_ordering.view(self.centroids.out_features, -1)
        tokens = clusters[top].reshape(h.shape[0], -1)  # (B, top_k * V/C) token ids
        scores = (h[:, None] @ head_weight[tokens].transpose(-1, -2))[:, 0]  # (B, top_k * V/C)
        out = torch.full((h.shape[0], head_weight.shape[0]), scores.min().item() - 1.0, dtype=h.dtype,
                         device=h.device)
        return out.scatter_(-1, tokens, scores)


class Drafter(nn.Module):
    """The assistant network, with transformers' parameter names (HF-A Gemma4AssistantForCausalLM)."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        t = cfg.text
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)  # tied: the LM head
        self.model.layers = nn.ModuleList(DraftBlock(t, i) for i in range(t.num_hidden_layers))
        self.model.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, 0.0)
        self.pre_projection = nn.Linear(2 * cfg.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, cfg.backbone_hidden_size, bias=False)
        self.masked_embedding = MaskedEmbedder(cfg) if cfg.use_ordered_embeddings else None
        self._inv_freq: dict[str, Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def _rope(self, kind: str, position: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        t = self.config.text
        layer = t.layer_types.index(kind)
        if kind not in self._inv_freq:
            self._inv_freq[kind] = rope_inv_freq(t.layer_head_dim(layer), t.rope_base(layer), t.rope_scale(layer),
                                                 position.device, t.rotary_fraction(layer))
        return rope_cos_sin(position[:, None], self._inv_freq[kind], dtype)

    def prepare(self, position: Tensor, kv: dict[str, tuple[Tensor, Tensor, Tensor]]) -> DraftInputs:
        """What every step of a round shares, computed once: RoPE at the round's constant position per layer type,
        and the target's keys and values with their visibility as an additive mask (0 seen, -inf not)."""
        kinds = set(self.config.text.layer_types)
        ropes = {kind: self._rope(kind, position, self.dtype) for kind in kinds}
        biases = {}
        for kind in kinds:
            keys, values, allowed = kv[kind]
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
            biases[kind] = keys, values, bias.masked_fill_(~allowed, float("-inf"))[:, None, None]
        return DraftInputs(ropes, biases)

    def step(self, inputs: Tensor, prepared: DraftInputs) -> tuple[Tensor, Tensor]:
        """One draft step over prepared inputs (see forward)."""
        x = self.pre_projection(inputs.to(self.dtype))[:, None]  # (B, 1, D)
        for block in self.model.layers:
            kind = block.self_attn.kind
            x = block(x, prepared.ropes[kind], prepared.kv[kind])
        h = self.model.norm(x)[:, 0]
        head = self.model.embed_tokens.weight
        logits = self.masked_embedding(h, head) if self.masked_embedding is not None else h @ head.T
        return logits.float(), self.post_projection(h)

    def forward(self, inputs: Tensor, position: Tensor, kv: dict[str, tuple[Tensor, Tensor, Tensor]]
                ) -> tuple[Tensor, Tensor]:
        """inputs (B, 2 * backbone): [target embedding of the last token, target hidden state]; position (B,) of
        that token; kv: layer type -> (keys, values, visible (B, S)) of the target. -> (fp32 logits (B, V), the
        hidden state for the next step (B, backbone))."""
        return self.step(inputs, self.prepare(position, kv))

    def threads(self) -> int:
        """Threads for a draft step: one for a small drafter (the E2B/E4B assistants' 256-wide products take tens of
        microseconds, less than waking and joining a second thread, and far less on a busy machine, where a
        2-thread op waits for a descheduled thread: 6 ms a step on one thread, 13-170 ms on two, measured at
        load 7 on 2 cores); torch's setting for a wide one (the 31B assistant's 1024 x 8192 MLP)."""
        sizes = [m.in_features * m.out_features for m in self.modules() if hasattr(m, "in_features")]
        return 1 if max(sizes, default=0) <= 4 << 20 else torch.get_num_threads()


@dataclass
class DraftInputs:
    """A round's shared inputs for Drafter.step (Drafter.prepare)."""

    ropes: dict[str, tuple[Tensor, Tensor]]
    kv: dict[str, tuple[Tensor, Tensor, Tensor]]


def target_kv(target_cfg: GemmaConfig, cache: Any, rows: list[int], positions: Tensor, sliding: Tensor
              ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """The keys and values a drafter reads: per layer type, the cache of the target's last layer of that type that
    computes its own (HF-G4 kv_sharing_modes "store"), for `rows`, with what a query at `positions` (R,) sees.

    Full-attention layers: filled slots at positions <= the query's (the last verification may have left a rejected
    draft's key at exactly that position; transformers' drafter sees it too: HF-MTP crops the shared states to the
    sequence length). Sliding layers: positions in [sliding[:, 0], sliding[:, 1]] (sliding_window_span).
    """
    first = target_cfg.first_kv_shared_layer
    out = {}
    prefix = rows == list(range(len(rows)))  # rows 0..R-1: views of the cache, not copies
    idx = slice(0, len(rows)) if prefix else torch.tensor(rows, device=positions.device)
    for kind in (SLIDING, GLOBAL):
        layers = [i for i in range(first) if target_cfg.layer_types[i] == kind]
        if not layers:
            continue
        c = cache.layers[layers[-1]]
        kpos = c.slot_pos[idx]
        if kind == SLIDING:
            allowed = (kpos >= sliding[:, :1]) & (kpos <= sliding[:, 1:])
        else:
            allowed = (kpos >= 0) & (kpos <= positions[:, None])
        used = int(allowed.any(0).nonzero().max()) + 1 if bool(allowed.any()) else 1  # slots past it: all unseen
        out[kind] = c.k[idx, :, :used], c.v[idx, :, :used], allowed[:, :used]
    return out


def sliding_window_span(window: int, start: int, end: int, query: int, prefill: bool) -> tuple[int, int]:
    """The positions of the target's sliding-layer keys a drafter at `query` sees after a target forward over
    positions [start, end], as transformers' assisted generation hands them over: its DynamicSlidingWindowLayer
    (recording the past) returns the last W - 1 + T keys, or all after a prefill; HF-MTP crops them to the first
    query + 1 entries; the assistant's flipped bidirectional window mask keeps the last W + 1 of those. Keys past
    the query position (rejected drafts of that forward) can be among them once the sequence outgrows the window."""
    lo = 0 if prefill else max(0, start - window + 1)
    hi = min(end, lo + query)
    return max(lo, hi - window), hi


def check_pair(drafter: Drafter, target_cfg: GemmaConfig) -> None:
    """A clear error when a drafter does not belong to this target (widths, vocabulary, head shapes, layer kinds)."""
    cfg, t = drafter.config, drafter.config.text
    if target_cfg.family != "gemma4":
        raise GemmaError(f"assistant drafters are for Gemma 4 targets; this model is {target_cfg.family}")
    if cfg.backbone_hidden_size != target_cfg.hidden_size or t.vocab_size != target_cfg.vocab_size:
        raise GemmaError(f"this drafter was made for a target of width {cfg.backbone_hidden_size} and vocabulary "
                         f"{t.vocab_size}; the model has {target_cfg.hidden_size} and {target_cfg.vocab_size}: "
                         "load the assistant that belongs to this model")
    for kind in set(t.layer_types):
        if kind not in target_cfg.layer_types[: target_cfg.first_kv_shared_layer]:
            raise GemmaError(f"the drafter has {kind} layers but the target computes no keys for that layer type")
        mine = t.layer_head_dim(t.layer_types.index(kind))
        theirs = target_cfg.layer_head_dim(target_cfg.layer_types.index(kind))
        if mine != theirs:
            raise GemmaError(f"the drafter's {kind} head dim is {mine}, the target's {theirs}: another model's drafter")


def first_step_inputs(target: Any, tokens: Tensor, hidden: Tensor) -> Tensor:
    """[target's scaled embedding of `tokens` (B,), `hidden` (B, D)]: the drafter's input (HF-MTP
    target_model_input_embeddings is the scaled embedding, sqrt(D) rounded to the dtype, spec §1.2)."""
    emb = target.model.embed_tokens(tokens)
    emb = emb * torch.tensor(target.config.hidden_size**0.5, dtype=emb.dtype, device=emb.device)
    return torch.cat([emb, hidden.to(emb.dtype)], dim=-1)


def propose(drafter: Drafter, target: Any, token: Tensor, hidden: Tensor, position: Tensor,
            kv: dict[str, tuple[Tensor, Tensor, Tensor]], k: int, pick: Any) -> tuple[Tensor, list[Tensor]]:
    """k drafted tokens per row (B, k) and each step's fp32 logits, as HF-MTP's loop: each step feeds the token it
    chose and its own projected hidden state back, at the same position. `pick(logits) -> (B,)` chooses (arg-max
    for greedy; a sample from the drafter's processed distribution otherwise)."""
    drafted, logits_seen = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(drafter.threads())
    try:
        prepared = drafter.prepare(position, kv)
        for _ in range(k):
            logits, hidden = drafter.step(first_step_inputs(target, token, hidden), prepared)
            token = pick(logits)
            drafted.append(token)
            logits_seen.append(logits)
    finally:
        torch.set_num_threads(threads)
    return (torch.stack(drafted, 1) if drafted else token.new_zeros(token.shape[0], 0)), logits_seen


def load_drafter_state(path: Path, dtype: torch.dtype) -> tuple[DrafterConfig, dict[str, Tensor]]:
    """(config, tensors under transformers' names) of an assistant Hugging Face folder."""
    from .weights.hf import _read_weights, _weight_files

    cfg = drafter_config_from_hf(json.loads((path / "config.json").read_text()))
    state: dict[str, Tensor] = {}
    for f in _weight_files(path):
        state.update(_read_weights(f, None))  # small, and token_ordering is int64: converted in build_drafter
    if "model.embed_tokens.weight" not in state and "lm_head.weight" in state:
        state["model.embed_tokens.weight"] = state["lm_head.weight"]
    state.pop("lm_head.weight", None)
    return cfg, state


def build_drafter(cfg: DrafterConfig, state: dict[str, Tensor], source: Path | str, dtype: torch.dtype) -> Drafter:
    """A Drafter from its tensors, strictly: every tensor present with its shape, nothing unexpected."""
    with torch.device("meta"):
        module = Drafter(cfg)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an unexpected tensor {extra[0]}"
        raise GemmaError(f"{source} {what}; it is not a Gemma 4 assistant drafter of its config.json")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise GemmaError(f"{source}: {k} has shape {tuple(state[k].shape)}, the config needs {shape}")
    state = {k: v if v.dtype == torch.long else v.to(dtype) for k, v in state.items()}
    module.load_state_dict(state, assign=True, strict=True)
    module._inv_freq = {}
    return module.eval()


def drafter_on_blocks(drafter: Drafter, blocks: dict[str, QWeight] | None = None) -> Drafter:
    """The drafter's projections as QLinear: over `blocks` (HF name -> a GGUF file's own blocks) where given, else
    Q8_0 blocks of its float weights, for the projections whose width is a multiple of 32. The embedding (the head's
    rows, gathered per cluster) and the centroid router stay float: a router's top-k is sensitive to rounding, as
    llama.cpp keeps MoE routers in F32. Drafts may differ a little from the float drafter's; the target's output
    never does (it verifies every draft)."""
    weights = {}
    for name, m in drafter.named_modules():
        if not isinstance(m, nn.Linear) or name == "masked_embedding.centroids":
            continue
        given = (blocks or {}).get(f"{name}.weight")
        if given is not None:
            weights[f"{name}.weight"] = given
        elif m.in_features % 32 == 0:
            w = m.weight.detach().float()
            weights[f"{name}.weight"] = QWeight.from_bytes(quantize_q8(w), QT.Q8_0, *w.shape)
    swap_in(drafter, weights)
    return drafter


def greedy_pick(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1)


def sample_pick(probs_of: Any, generator: torch.Generator | None) -> Any:
    """A picker that samples from the drafter's processed distribution (its probabilities kept for the acceptance
    test by the caller, through probs_of)."""
    def pick(logits: Tensor) -> Tensor:
        return torch.multinomial(probs_of(logits), 1, generator=generator).squeeze(-1)
    return pick


__all__ = ["ASSISTANT_TYPES", "Drafter", "DrafterConfig"]
