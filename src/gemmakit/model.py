"""The one Gemma 1/2/3/3n/4 text decoder, driven by GemmaConfig, with Hugging Face parameter names.

Read top to bottom: RoPE -> attention (GQA, sliding window, soft-cap, QK-norm, Gemma 4's per-layer head dims, k=v
and KV sharing) -> GeGLU MLP -> block (Gemma 4: + experts, per-layer input; Gemma 3n: AltUp streams and LAuReL,
altup.py) -> model; the KV cache is kv_cache.py. Numerics follow shared/docs/gemma-spec.md §1 and §3; Gemma 4 follows
transformers 5.24 `models/gemma4/modeling_gemma4.py` (cited as HF-G4), Gemma 3n `models/gemma3n/modeling_gemma3n.py`
(HF-3N); comments cite the sections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_share
from .altup import AltUp, Laurel, altup_layer, expand_streams, gaussian_topk, merge_streams, std_multiplier
from .config import SLIDING, GemmaConfig
from .kv_cache import KVCache, LayerCache  # noqa: F401  (public here: the cache of this model)
from .moe import Experts, Router
from .norm import RMSNorm


def rope_inv_freq(head_dim: int, base: float, scale: float, device: torch.device | None = None,
                  fraction: float = 1.0) -> Tensor:
    """inv_freq[i] = 1 / base^(2i/H), divided by the linear scaling factor (spec §1.4; HF rope utils).

    Gemma 4's proportional RoPE (HF `_compute_proportional_rope_parameters`): only the first int(fraction * H // 2)
    pairs rotate, still with exponents 2i/H of the full head dim; the other pairs get frequency 0 (cos 1, sin 0).
    """
    pairs = int(fraction * head_dim // 2)
    exponent = torch.arange(0, 2 * pairs, 2, dtype=torch.int64, device=device).float() / head_dim
    inv = 1.0 / (base**exponent)
    if pairs < head_dim // 2:
        inv = torch.cat((inv, torch.zeros(head_dim // 2 - pairs, device=device)))
    return inv / scale


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (B, 1, T, H) for positions (B, T); half-split ("NeoX") layout, cast to the model dtype."""
    freqs = positions.float()[..., None] * inv_freq  # (B, T, H/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, H)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def softcap(x: Tensor, cap: float) -> Tensor:
    return torch.tanh(x / cap) * cap


def visible(qpos: Tensor, kpos: Tensor, window: int | None, bidirectional: bool = False) -> Tensor:
    """(B, 1, T, S) bool: key j is visible from query i iff it is real (pos >= 0), not in the future, and, on
    sliding layers, 0 <= i - j < W (spec §1.5). Padding queries (pos -1) see everything: outputs discarded, no NaN.
    An encoder (bidirectional) also sees the future, and on sliding layers |i - j| <= W (W a radius, config.py)."""
    diff = qpos[:, :, None] - kpos[:, None, :]  # (B, T, S)
    allowed = kpos[:, None, :] >= 0  # (B, 1, S)
    if bidirectional:
        if window is not None:
            allowed = allowed & (diff.abs() <= window)
    else:
        allowed = allowed & (diff >= 0)
        if window is not None:
            allowed &= diff < window
    allowed = allowed | (qpos < 0)[:, :, None]  # (B, T, S)
    return allowed[:, None]


def plain_causal(qpos: Tensor, kpos: Tensor, window: int | None, bidirectional: bool) -> bool:
    """Whether `visible` would be the plain causal mask: every row's queries are its keys, at consecutive
    positions from >= 0, and the window (if any) spans them all. SDPA's causal kernel then skips the blocks above
    the diagonal (a fresh prompt's prefill: 4.9 -> 4.4 ms per 270M layer at 520 tokens, the same values)."""
    T = qpos.shape[1]
    if bidirectional or T < 2 or qpos.shape != kpos.shape or (window is not None and T > window):
        return False
    start = qpos[:, :1]
    return bool((start >= 0).all()) and torch.equal(qpos, kpos) and torch.equal(
        qpos, start + torch.arange(T, device=qpos.device))


def span_mask(length: int, window: int | None, bidirectional: bool) -> Tensor | None:
    """(1, 1, L, L) bool mask of one packed sequence of `length` tokens (positions 0..L-1, see `visible`); None
    when every key is visible (an encoder's global layers, or a sequence within the window), so SDPA needs none."""
    if bidirectional and (window is None or length - 1 <= window):
        return None
    pos = torch.arange(length)[None]
    return visible(pos, pos, window, bidirectional)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)
        self.kind = cfg.layer_types[layer]
        self.sliding = self.kind == SLIDING
        self.window = cfg.sliding_window if self.sliding else None
        self.bidirectional = cfg.use_bidirectional_attention  # an encoder (EmbeddingGemma): no causal mask
        self.scaling = cfg.scaling  # query_pre_attn_scalar ** -0.5, applied to q·k like HF (spec §1.5); Gemma 4: 1.0
        self.softcap = cfg.attn_logit_softcapping
        self.rope = apply_rope  # the fast path's is native (quant/qlinear.py swap_in_fast_ops)
        # Gemma 4 KV sharing (HF-G4 kv_sharing_modes): a shared layer has no k/v weights and attends to the keys and
        # values its source layer computed in this same forward; a source "stores" them for the shared layers.
        self.shared = cfg.kv_source(layer) != layer
        self.stores = any(cfg.kv_source(j) == layer != j for j in range(cfg.num_hidden_layers))
        d, h, eps = cfg.hidden_size, self.head_dim, cfg.rms_norm_eps
        self.q_proj = nn.Linear(d, self.n_heads * h, bias=False)
        if not self.shared:
            self.k_proj = nn.Linear(d, self.n_kv * h, bias=False)
            # attention_k_eq_v (HF-G4 use_alternative_attention): values are k_proj's output, normed without RoPE.
            self.v_proj = None if cfg.k_eq_v(layer) else nn.Linear(d, self.n_kv * h, bias=False)
        self.o_proj = nn.Linear(self.n_heads * h, d, bias=False)
        self.q_norm = self.k_norm = self.v_norm = None
        if cfg.qk_norm:  # Gemma 3/4: per-head RMSNorm after projection, before RoPE
            self.q_norm = RMSNorm(h, eps, cfg.norm_offset)
            if not self.shared:
                self.k_norm = RMSNorm(h, eps, cfg.norm_offset)
        if cfg.v_norm and not self.shared:  # HF-G4 / HF-3N v_norm: RMSNorm without a weight
            self.v_norm = RMSNorm(h, eps, scale=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """q (B, T, N*H) and, on layers that compute their own, k and v (B, T, K*H)."""
        if self.shared:
            return self.q_proj(x), None, None
        k = self.k_proj(x)
        return self.q_proj(x), k, k if self.v_proj is None else self.v_proj(x)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], qpos: Tensor, cache: LayerCache | None,
                masks: dict, shared: dict | None = None, spans: list[tuple[int, int]] | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self._project(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, N, T, H)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = self.rope(q, *rope)
        if self.shared:  # (keys, values, key positions) of the source layer, from this forward (HF-G4)
            keys, values, kpos = shared[self.kind]
        else:
            k = k.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, H)
            v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            if self.k_norm is not None:
                k = self.k_norm(k)
            k = self.rope(k, *rope)
            if self.v_norm is not None:
                v = self.v_norm(v)
            if cache is None:
                keys, values, kpos = k, v, qpos
            else:
                keys, values, kpos = cache.update(k, v, qpos)
            if self.stores:
                shared[self.kind] = keys, values, kpos
        if spans is not None:
            out = self._attend_packed(q, keys, values, spans, masks)
        else:
            key = (self.window, kpos.shape[1], cache is not None and cache.ring)  # same for all layers of a kind
            if key not in masks:
                masks[key] = (visible(qpos, kpos, self.window, self.bidirectional),
                              plain_causal(qpos, kpos, self.window, self.bidirectional))
            out = self._attend(q, keys, values, *masks[key])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend_packed(self, q: Tensor, k: Tensor, v: Tensor, spans: list[tuple[int, int]], masks: dict) -> Tensor:
        """Attention of sequences packed end to end in one row (B = 1), each over its own [start, end) tokens:
        the linear layers see no padding, and SDPA runs per sequence, mask-free where all its keys are visible."""
        out = torch.empty_like(q)  # (1, N, T, H)
        for start, end in spans:
            key = ("span", self.window, end - start)
            if key not in masks:
                mask = span_mask(end - start, self.window, self.bidirectional)
                masks[key] = None if mask is None else mask.to(q.device)
            out[:, :, start:end] = self._attend(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                masks[key])
        return out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, causal: bool = False) -> Tensor:
        """allowed: (B, 1, T, S) bool, or None where every key is visible (packed encoder sequences); causal: it is
        the plain causal mask (plain_causal)."""
        B, N, T, H = q.shape
        if self.softcap is None and T == 1 and not torch.is_grad_enabled():
            # Decode: query heads sharing a KV head become rows of one matmul; at T=1 this beats SDPA's kernel
            # (measured 141 us -> ~30 us per layer on the 270M). Same math: scale, mask, fp32 softmax.
            rep = N // self.n_kv
            if B == 1 and self.n_kv == 1:  # MQA, one sequence: two plain GEMMs (bmm's dispatch cost ~40 us each)
                scores = (q.reshape(N, H) @ k[0, 0].T) * self.scaling  # (N, S)
                if allowed is not None:
                    scores = scores.masked_fill(~allowed[0, 0], float("-inf"))
                probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
                return (probs @ v[0, 0]).reshape(1, N, 1, H)
            qg = q.reshape(B, self.n_kv, rep, H)  # (B, K, rep, H)
            scores = (qg @ k.transpose(-1, -2)) * self.scaling  # (B, K, rep, S)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            return (probs @ v).reshape(B, N, 1, H)
        if self.softcap is None:
            if causal:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                                      enable_gqa=self.n_kv != self.n_heads)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scaling,
                                                  enable_gqa=self.n_kv != self.n_heads)
        # Gemma 2: scale -> soft-cap 50 -> mask -> fp32 softmax -> cast back (spec §1.5, HF eager order).
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = softcap((q @ k.transpose(-1, -2)) * self.scaling, self.softcap)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v


class MLP(nn.Module):
    """GeGLU with tanh-approximated GELU (spec §1.6; exact-erf GELU is wrong even where configs say "gelu").
    Gemma 3n's sparse layers pass the gate through a Gaussian top-k first (HF-3N Gemma3nTextMLP)."""

    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        f = cfg.layer_intermediate(layer)  # Gemma 4 E2B: 2F on KV-shared layers; Gemma 3n: a per-layer list
        self.gate_proj = nn.Linear(cfg.hidden_size, f, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, f, bias=False)
        self.down_proj = nn.Linear(f, cfg.hidden_size, bias=False)
        sparsity = cfg.activation_sparsity(layer)
        self.std_multiplier = std_multiplier(sparsity) if sparsity > 0.0 else None
        self.geglu = geglu  # the fast path's is native (quant/qlinear.py swap_in_fast_ops)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        if self.std_multiplier is not None:
            gate = gaussian_topk(gate, self.std_multiplier)
        return self.down_proj(self.geglu(gate, self.up_proj(x)))


def geglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.gelu(gate, approximate="tanh") * up


class Block(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.post_norms = cfg.post_norms
        d, eps, off = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        self.input_layernorm = RMSNorm(d, eps, off)
        # Gemma 1: "post_attention_layernorm" is the pre-MLP norm; Gemma 2/3/4: a true post-attention norm (spec §1.1).
        self.post_attention_layernorm = RMSNorm(d, eps, off)
        if self.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(d, eps, off)
            self.post_feedforward_layernorm = RMSNorm(d, eps, off)
        self.moe = cfg.enable_moe_block
        if self.moe:  # Gemma 4 26B-A4B: routed experts beside the dense MLP, each with its own norms (HF-G4)
            self.router, self.experts = Router(cfg), Experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(d, eps, off)
            self.pre_feedforward_layernorm_2 = RMSNorm(d, eps, off)
            self.post_feedforward_layernorm_2 = RMSNorm(d, eps, off)
        self.ple = cfg.hidden_size_per_layer_input
        if self.ple:  # Gemma 4 E2B/E4B: this layer's slice of the per-layer input embeddings, gated in (HF-G4)
            self.per_layer_input_gate = nn.Linear(d, self.ple, bias=False)
            self.per_layer_projection = nn.Linear(self.ple, d, bias=False)
            self.post_per_layer_input_norm = RMSNorm(d, eps, off)
        self.altup = AltUp(cfg) if cfg.altup_num_inputs else None
        if self.altup is not None:  # Gemma 3n: AltUp streams around the layer, LAuReL beside attention (HF-3N)
            self.laurel = Laurel(cfg)
            self.correct_scale = cfg.altup_correct_scale
        if cfg.family == "gemma4":  # a loaded per-layer output scale (HF-G4 layer_scalar: a persistent buffer)
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], qpos: Tensor, cache: LayerCache | None,
                masks: dict, shared: dict | None = None, per_layer_input: Tensor | None = None,
                spans: list[tuple[int, int]] | None = None) -> Tensor:
        """x: (B, T, D), or for Gemma 3n the stacked AltUp streams (S, B, T, D). spans: see Gemma.hidden_states."""
        if self.altup is not None:
            return altup_layer(self, x, lambda h: self.self_attn(h, rope, qpos, cache, masks, shared, spans),
                               per_layer_input)
        h = self.self_attn(self.input_layernorm(x), rope, qpos, cache, masks, shared, spans)
        if not self.post_norms:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            h = self.post_feedforward_layernorm_1(h) + self._experts(x)
        x = x + self.post_feedforward_layernorm(h)
        if self.ple:
            # HF-G4 decoder layer: x + norm(proj(gelu_tanh(gate(x)) * per_layer_input))
            g = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x if self.layer_scalar is None else x * self.layer_scalar

    def _experts(self, x: Tensor) -> Tensor:
        """The MoE branch of HF-G4 Gemma4TextDecoderLayer: the router reads the residual stream itself (its own
        scale-free norm), the experts read it through pre_feedforward_layernorm_2; output normed once more."""
        flat = x.reshape(-1, x.shape[-1])  # (B*T, D)
        weights, index = self.router(flat)
        y = self.experts(self.pre_feedforward_layernorm_2(flat), index, weights)
        return self.post_feedforward_layernorm_2(y.reshape(x.shape))


def _random(*shape: int, std: float = 1.0) -> Tensor:
    """A normal(0, std) tensor; left empty on the meta device (loading), where normal_ costs a 1.5 s import."""
    weight = torch.empty(*shape)
    return weight if weight.device.type == "meta" else nn.init.normal_(weight, std=std)


class Gemma(nn.Module):
    """Gemma decoder + tied LM head. forward(ids, positions, cache) -> fp32 logits.

    Parameter names equal transformers' (`model.layers.0.self_attn.q_proj.weight`), so HF safetensors load by
    identity and PEFT adapters line up.
    """

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                               _weight=_random(cfg.vocab_size, cfg.hidden_size))
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        if cfg.hidden_size_per_layer_input:  # Gemma 4 PLE: one packed table for all layers (HF-G4 Gemma4TextModel)
            width = cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
            if cfg.vocab_size_per_layer_input:  # EmbeddingGemma 2's per-layer inputs are projection-only: no table
                self.model.embed_tokens_per_layer = nn.Embedding(
                    cfg.vocab_size_per_layer_input, width, _weight=_random(cfg.vocab_size_per_layer_input, width))
            self.model.per_layer_model_projection = nn.Linear(cfg.hidden_size, width, bias=False)
            self.model.per_layer_projection_norm = RMSNorm(cfg.hidden_size_per_layer_input, cfg.rms_norm_eps,
                                                           cfg.norm_offset)
        if cfg.altup_num_inputs:  # Gemma 3n: the streams' projections from the embedding and back (HF-3N)
            d, extra = cfg.hidden_size, cfg.altup_num_inputs - 1
            self.model.altup_projections = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(extra))
            self.model.altup_unembed_projections = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(extra))
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: dict[tuple, Tensor] = {}
        self.fused_decode = None  # a native whole-model decode step, attached by the fast path (quant/fused.py)

    @property
    def head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (the final norm's weight is always kept in it, also when linears are quantized)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def _rope_key(self, layer: int) -> tuple:
        """What this layer's RoPE depends on: base, linear scale, head dim, rotated share (spec §1.4; HF-G4)."""
        cfg = self.config
        return cfg.rope_base(layer), cfg.rope_scale(layer), cfg.layer_head_dim(layer), cfg.rotary_fraction(layer)

    def inv_freq(self, layer: int, device: torch.device) -> Tensor:
        """RoPE frequencies of this layer (local and global layers differ, spec §1.4; Gemma 4 also in head dim
        and rotated share)."""
        key = (*self._rope_key(layer), str(device))
        if key not in self._inv_freq:
            base, scale, dim, fraction = self._rope_key(layer)
            self._inv_freq[key] = rope_inv_freq(dim, base, scale, device, fraction)
        return self._inv_freq[key]

    def _rope(self, layer: int, positions: Tensor, dtype: torch.dtype, memo: dict) -> tuple[Tensor, Tensor]:
        """cos/sin for this layer's RoPE, computed once per forward per distinct kind of layer."""
        key = self._rope_key(layer)
        if key not in memo:
            memo[key] = rope_cos_sin(positions.clamp(min=0), self.inv_freq(layer, positions.device), dtype)
        return memo[key]

    def per_layer_inputs(self, ids: Tensor, x: Tensor) -> Tensor:
        """Gemma 4 PLE (HF-G4 get_per_layer_inputs + project_per_layer_inputs): (B, T, L, P) from the token's row of
        the packed table (scaled by sqrt(P) rounded to the dtype) and a projection of the scaled embedding x
        (* D^-0.5 as a Python float, RMSNorm per layer), combined as (proj + table) * 2^-0.5. EmbeddingGemma 2 has
        no table: the normed projection alone (HF-EG2 EmbeddingGemma2TextPLE)."""
        cfg, m = self.config, self.model
        shape = (*ids.shape, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
        proj = m.per_layer_model_projection(x) * cfg.hidden_size**-0.5
        proj = m.per_layer_projection_norm(proj.reshape(shape))
        if not cfg.vocab_size_per_layer_input:
            return proj
        # Gemma 3n's table has fewer rows than the vocabulary (262144 of 262400): other ids read row 0 (HF-3N).
        ids = torch.where((ids >= 0) & (ids < cfg.vocab_size_per_layer_input), ids, 0)
        table = m.embed_tokens_per_layer(ids)
        scale = torch.tensor(cfg.hidden_size_per_layer_input**0.5, dtype=table.dtype, device=table.device)
        table = (table * scale).reshape(shape)
        return (proj + table) * 2.0**-0.5

    def hidden_states(self, ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                      rows: list[int] | None = None, spans: list[tuple[int, int]] | None = None) -> Tensor:
        """Final-normed hidden states (B, T, D). positions: (B, T), -1 marks padding.

        With a cache, `rows` selects which cache rows these B sequences are (default: all rows, in order).
        spans: sequences packed end to end in one row without padding (B = 1, no cache; an encoder's batches):
        [start, end) of each, whose positions restart at 0; each attends only within itself.
        """
        if spans is not None and (cache is not None or ids.shape[0] != 1):
            raise ValueError("packed spans need one row (B = 1) and no KV cache")
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        if ids.device.type == "cpu":
            cpu_share.adapt()  # threads on the cores other programs leave free (same results, any count)
        x = self.model.embed_tokens(ids)
        # sqrt(D) rounded to the model dtype before the multiply: 25.25 not 25.298 in bf16 (spec §1.2; HF-G4 too).
        x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype, device=x.device)
        ple = self.per_layer_inputs(ids, x) if self.config.hidden_size_per_layer_input else None
        memo: dict = {}
        masks: dict = {}
        shared: dict = {}  # Gemma 4 KV sharing: layer type -> (keys, values, key positions) of its source layer
        if cache is not None:
            cache.prepare(ids.shape[1], rows)
        if cache is not None and self.fused_decode is not None and self.fused_decode.applies(x, cache):
            x = self.fused_decode(x, positions, cache, ple)  # plain decode step: all layers in one native call
        else:
            altup = self.config.altup_num_inputs > 0
            if altup:
                x = expand_streams(x, self.model.altup_projections)  # (S, B, T, D)
            for i, block in enumerate(self.model.layers):
                layer_cache = cache.layers[i] if cache is not None else None
                x = block(x, self._rope(i, positions, x.dtype, memo), positions, layer_cache, masks, shared,
                          None if ple is None else ple[:, :, i], spans)
            if altup:
                x = merge_streams(x, self.model.altup_unembed_projections)
        if cache is not None:
            cache.advance()
        return self.model.norm(x)

    def head(self, h: Tensor, score: bool = False) -> Tensor:
        """Tied LM head in the model dtype, returned as fp32; Gemma 2's final soft-cap 30 (spec §1.1). score: many
        positions scored (evaluation), where a quantized head may spend a second product on accuracy."""
        emb = self.model.embed_tokens
        if self.config.tie_word_embeddings and hasattr(emb, "attend"):
            logits = emb.attend(h, score)  # a quantized tied embedding computes its own head (quant/qlinear.py)
        elif self.config.tie_word_embeddings:
            logits = h @ emb.weight.T
        else:
            logits = self.lm_head(h)
        if self.config.final_logit_softcapping is not None:
            logits = softcap(logits, self.config.final_logit_softcapping)
        return logits.float()

    def forward(self, ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, rows: list[int] | None = None) -> Tensor:
        h = self.hidden_states(ids, positions, cache, rows)
        return self.head(h[:, -1:] if last_only else h, score=cache is None and not last_only)


# ----------------------------------------------------------------------------------------------------------------
# KV cache. Global layers keep every position; sliding layers keep a ring of W (+ slack) slots, so memory stays
# bounded on long generations. Each slot remembers its position (-1 = empty) and masks are computed from positions,
# which makes left-padded batches, chunked prefill and multi-token verification (speculative decoding) one code path.
