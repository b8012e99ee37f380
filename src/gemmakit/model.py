"""The one Gemma 1/2/3 text decoder, driven by GemmaConfig, with Hugging Face parameter names.

Read top to bottom: RMSNorm(1+w) -> RoPE -> attention (GQA, sliding window, soft-cap, QK-norm) -> GeGLU MLP -> block
-> model, then the KV cache. Numerics follow shared/docs/gemma-spec.md §1 and §3; comments cite the sections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SLIDING, GemmaConfig


class RMSNorm(nn.Module):
    """Gemma RMSNorm: computed in fp32, scaled by (1 + w), one rounding at the end (spec §1.3).

    The stored weight is zero-centred as in HF; GGUF files carry 1 + w and the loader subtracts the 1 (spec §4.4).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused op: x * rsqrt(mean(x^2) + eps) * (1 + w), all in fp32, rounded once.
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float() + 1.0, self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, base: float, scale: float, device: torch.device | None = None) -> Tensor:
    """inv_freq[i] = 1 / base^(2i/H), divided by the linear scaling factor (spec §1.4; HF rope utils)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (base**exponent) / scale


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


def visible(qpos: Tensor, kpos: Tensor, window: int | None) -> Tensor:
    """(B, 1, T, S) bool: key j is visible from query i iff it is real (pos >= 0), not in the future, and, on
    sliding layers, 0 <= i - j < W (spec §1.5). Padding queries (pos -1) see everything: outputs discarded, no NaN."""
    diff = qpos[:, :, None] - kpos[:, None, :]  # (B, T, S)
    allowed = (kpos[:, None, :] >= 0) & (diff >= 0)
    if window is not None:
        allowed &= diff < window
    allowed |= (qpos < 0)[:, :, None]
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.sliding = cfg.layer_types[layer] == SLIDING
        self.window = cfg.sliding_window if self.sliding else None
        self.scaling = cfg.scaling  # query_pre_attn_scalar ** -0.5, applied to q·k like HF (spec §1.5)
        self.softcap = cfg.attn_logit_softcapping
        d, h = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * h, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * h, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * h, bias=False)
        self.o_proj = nn.Linear(self.n_heads * h, d, bias=False)
        self.qkv_proj: nn.Module | None = None  # q/k/v fused into one matrix by quantization: one call, not three
        if cfg.qk_norm:  # Gemma 3: per-head RMSNorm after projection, before RoPE
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], qpos: Tensor, cache: LayerCache | None,
                masks: dict) -> Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                              self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, N, T, H)
        k = k.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, H)
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            keys, values, kpos = k, v, qpos
        else:
            keys, values, kpos = cache.update(k, v, qpos)
        key = (self.window, kpos.shape[1], cache is not None and cache.ring)  # same for all layers of a kind
        if key not in masks:
            masks[key] = visible(qpos, kpos, self.window)
        out = self._attend(q, keys, values, masks[key])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        B, N, T, H = q.shape
        if self.softcap is None and T == 1 and not torch.is_grad_enabled():
            # Decode: query heads sharing a KV head become rows of one matmul; at T=1 this beats SDPA's kernel
            # (measured 141 us -> ~30 us per layer on the 270M). Same math: scale, mask, fp32 softmax.
            rep = N // self.n_kv
            if B == 1 and self.n_kv == 1:  # MQA, one sequence: two plain GEMMs (bmm's dispatch cost ~40 us each)
                scores = (q.reshape(N, H) @ k[0, 0].T) * self.scaling  # (N, S)
                scores = scores.masked_fill(~allowed[0, 0], float("-inf"))
                probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
                return (probs @ v[0, 0]).reshape(1, N, 1, H)
            qg = q.reshape(B, self.n_kv, rep, H)  # (B, K, rep, H)
            scores = (qg @ k.transpose(-1, -2)) * self.scaling  # (B, K, rep, S)
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            return (probs @ v).reshape(B, N, 1, H)
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scaling,
                                                  enable_gqa=self.n_kv != self.n_heads)
        # Gemma 2: scale -> soft-cap 50 -> mask -> fp32 softmax -> cast back (spec §1.5, HF eager order).
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = softcap((q @ k.transpose(-1, -2)) * self.scaling, self.softcap)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v


class MLP(nn.Module):
    """GeGLU with tanh-approximated GELU (spec §1.6; exact-erf GELU is wrong even where configs say "gelu")."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up fused by quantization
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.post_norms = cfg.post_norms
        eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        # Gemma 1: "post_attention_layernorm" is the pre-MLP norm; Gemma 2/3: a true post-attention norm (spec §1.1).
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        if self.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], qpos: Tensor, cache: LayerCache | None,
                masks: dict) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, qpos, cache, masks)
        if not self.post_norms:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma(nn.Module):
    """Gemma decoder + tied LM head. forward(ids, positions, cache) -> fp32 logits.

    Parameter names equal transformers' (`model.layers.0.self_attn.q_proj.weight`), so HF safetensors load by
    identity and PEFT adapters line up.
    """

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if weight.device.type != "meta":  # on meta (loading), skip init: normal_ there costs a 1.5 s import
            nn.init.normal_(weight)
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: dict[tuple[float, float, str], Tensor] = {}
        self.fused_decode = None  # a native whole-model decode step, attached by the Q8 fast path (quant/fused.py)

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

    def inv_freq(self, layer: int, device: torch.device) -> Tensor:
        """RoPE frequencies of this layer's base and linear scale (local and global layers differ, spec §1.4)."""
        cfg = self.config
        key = (cfg.rope_base(layer), cfg.rope_scale(layer), str(device))
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(cfg.head_dim, cfg.rope_base(layer), cfg.rope_scale(layer), device)
        return self._inv_freq[key]

    def _rope(self, layer: int, positions: Tensor, dtype: torch.dtype, memo: dict) -> tuple[Tensor, Tensor]:
        """cos/sin for this layer's RoPE base/scale, computed once per forward per distinct (base, scale)."""
        key = (self.config.rope_base(layer), self.config.rope_scale(layer))
        if key not in memo:
            memo[key] = rope_cos_sin(positions.clamp(min=0), self.inv_freq(layer, positions.device), dtype)
        return memo[key]

    def hidden_states(self, ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                      rows: list[int] | None = None) -> Tensor:
        """Final-normed hidden states (B, T, D). positions: (B, T), -1 marks padding.

        With a cache, `rows` selects which cache rows these B sequences are (default: all rows, in order).
        """
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        x = self.model.embed_tokens(ids)
        # sqrt(D) rounded to the model dtype before the multiply: 25.25 not 25.298 in bf16 (spec §1.2).
        x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype, device=x.device)
        memo: dict = {}
        masks: dict = {}
        if cache is not None:
            cache.prepare(ids.shape[1], rows)
        if cache is not None and self.fused_decode is not None and self.fused_decode.applies(x, cache):
            x = self.fused_decode(x, positions, cache)  # plain decode step: all layers in one native call
        else:
            for i, block in enumerate(self.model.layers):
                layer_cache = cache.layers[i] if cache is not None else None
                x = block(x, self._rope(i, positions, x.dtype, memo), positions, layer_cache, masks)
        if cache is not None:
            cache.advance()
        return self.model.norm(x)

    def head(self, h: Tensor) -> Tensor:
        """Tied LM head in the model dtype, returned as fp32; Gemma 2's final soft-cap 30 (spec §1.1)."""
        emb = self.model.embed_tokens
        if self.config.tie_word_embeddings and hasattr(emb, "attend"):
            logits = emb.attend(h)  # a quantized tied embedding computes its own head (quant/q8.py)
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
        return self.head(h[:, -1:] if last_only else h)


# ----------------------------------------------------------------------------------------------------------------
# KV cache. Global layers keep every position; sliding layers keep a ring of W (+ slack) slots, so memory stays
# bounded on long generations. Each slot remembers its position (-1 = empty) and masks are computed from positions,
# which makes left-padded batches, chunked prefill and multi-token verification (speculative decoding) one code path.
# Every row has its own length, so a server can prefill a new request into a free row while others decode.


@dataclass
class LayerCache:
    k: Tensor  # (B, K, S, H)
    v: Tensor
    slot_pos: Tensor  # (B, S) position held by each slot, -1 if empty
    ring: bool  # sliding layer whose capacity is below the sequence capacity: slots wrap around
    rows: Tensor | None = None  # rows written by the current forward (None = all), set by KVCache.prepare
    starts: Tensor | None = None  # (R,) first column each of those rows writes
    end: int = 0  # max column written + 1 over those rows: how far attention must look
    start: int | None = None  # the common first column when every row is written from the same column

    prefix: int | None = None  # the rows are exactly 0..prefix-1: read them through a view, not a gather

    def _view(self, t: Tensor) -> Tensor:
        if self.prefix is not None:
            return t[: self.prefix]
        return t if self.rows is None else t[self.rows]

    def update(self, k: Tensor, v: Tensor, qpos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new keys/values (R, K, T, H) and return (keys, values, key positions) attention should see."""
        T, S = k.shape[2], self.k.shape[2]
        if T == 1 and self.rows is None and self.start is not None:  # plain decode step: one slot, every row
            slot = self.start % S if self.ring else self.start
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.slot_pos[:, slot] = qpos[:, 0]
            end = S if self.ring else self.end
            return self.k[:, :, :end], self.v[:, :, :end], self.slot_pos[:, :end]
        rows = self.rows if self.rows is not None else torch.arange(k.shape[0], device=k.device)
        cols = self.starts[:, None] + torch.arange(T, device=k.device)  # (R, T)
        if self.ring and T > 1:
            # Earlier new tokens may need slots that later ones overwrite: attend over old + new, then store.
            keys = torch.cat([self._view(self.k), k], dim=2)
            values = torch.cat([self._view(self.v), v], dim=2)
            kpos = torch.cat([self._view(self.slot_pos), qpos], dim=1)
            keep = min(T, S)
            self._store(rows, cols[:, -keep:] % S, k[:, :, -keep:], v[:, :, -keep:], qpos[:, -keep:])
            return keys, values, kpos
        self._store(rows, cols % S if self.ring else cols, k, v, qpos)
        end = S if self.ring else self.end
        return (self._view(self.k)[:, :, :end], self._view(self.v)[:, :, :end],
                self._view(self.slot_pos)[:, :end])

    def _store(self, rows: Tensor, slots: Tensor, k: Tensor, v: Tensor, qpos: Tensor) -> None:
        r = rows[:, None]  # (R, 1) against slots (R, T): advanced indexing gives (R, T, K, H)
        self.k[r, :, slots] = k.transpose(1, 2)
        self.v[r, :, slots] = v.transpose(1, 2)
        self.slot_pos[r, slots] = qpos


class KVCache:
    """Per-layer caches for up to `capacity` columns per row, for a batch of B rows."""

    def __init__(self, cfg: GemmaConfig, batch: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str, slack: int = 0) -> None:
        self.capacity = capacity
        self.lengths = [0] * batch  # columns used per row
        self.native = None  # this cache's pointer table for the native decode step, built on first use
        window = (cfg.sliding_window or capacity) + slack
        self.layers: list[LayerCache] = []
        for t in cfg.layer_types:
            size = min(window, capacity) if t == SLIDING else capacity
            shape = (batch, cfg.num_key_value_heads, size, cfg.head_dim)
            self.layers.append(LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                          torch.zeros(shape, dtype=dtype, device=device),
                                          torch.full((batch, size), -1, dtype=torch.long, device=device),
                                          ring=size < capacity))

    @property
    def length(self) -> int:
        return max(self.lengths)

    def prepare(self, n_new: int, rows: list[int] | None = None) -> None:
        """Point every layer at the columns the next forward of n_new tokens per row will write."""
        idx = rows if rows is not None else list(range(len(self.lengths)))
        starts = [self.lengths[r] for r in idx]
        if max(starts) + n_new > self.capacity:
            raise RuntimeError(f"KV cache full: {max(starts)} + {n_new} > capacity {self.capacity}")
        device = self.layers[0].k.device
        rows_t = None if rows is None else torch.tensor(rows, device=device)
        starts_t = torch.tensor(starts, device=device)
        common = starts[0] if rows is None and len(set(starts)) == 1 else None
        prefix = len(rows) if rows is not None and rows == list(range(len(rows))) else None
        for layer in self.layers:
            layer.rows, layer.starts, layer.end, layer.start = rows_t, starts_t, max(starts) + n_new, common
            layer.prefix = prefix
        self._pending = (idx, n_new)

    def advance(self) -> None:
        idx, n_new = self._pending
        for r in idx:
            self.lengths[r] += n_new

    def rollback(self, row: int, length: int) -> None:
        """Forget a row's columns >= length (rejected speculative tokens); ring slack must cover the span."""
        for layer in self.layers:
            size = layer.slot_pos.shape[1]
            cols = torch.arange(length, self.lengths[row], device=layer.slot_pos.device)
            layer.slot_pos[row, cols % size if layer.ring else cols] = -1
        self.lengths[row] = length

    def reset(self, row: int) -> None:
        """Free a row for a new sequence."""
        self.rollback(row, 0)
