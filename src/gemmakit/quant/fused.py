"""The native decode step: every layer of a fast-path model for a few new tokens per row, in one call (decode.c).

A 270M decode step is ~12 ms of weight reads at memory bandwidth; run as ~40 PyTorch ops per layer it also paid
~10 ms of dispatch. `attach` gives a model whose projections are QLinear a `fused_decode` that Gemma.hidden_states
calls for decode steps, speculative verification and short prompts (up to STEP_ROWS tokens over rows 0..B-1 of a
float32 cache, or over any one row, no autograd); long prefills, other sets of cache rows and LoRA run the modules.
The math is model.py's; tests hold the two paths to the same logits and greedy tokens, and a verified draft to
bit-identical logits with single steps.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from ..config import SLIDING
from . import kernels
from .qlinear import QLinear

_P = ctypes.c_void_p
# Tokens per native step (decode rows, drafts to verify, a short prompt); longer inputs run the modules. The step
# is the faster up to ~128 tokens (270M prefill, AVX2, 2 cores: 17 tokens 27 vs 40 ms, 65: 65 vs 75, 128: even,
# 200: 189 vs 175: the modules' SDPA and larger GEMM tiles win).
STEP_ROWS = 96
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


class _Mat(ctypes.Structure):  # blocks.h qmat_t
    _fields_ = [("data", _P), ("type", ctypes.c_long), ("rows", ctypes.c_long), ("cols", ctypes.c_long),
                ("row_bytes", ctypes.c_long)]


class _Layer(ctypes.Structure):
    _fields_ = [("q", _Mat), ("k", _Mat), ("v", _Mat), ("o", _Mat), ("gate", _Mat), ("up", _Mat), ("down", _Mat),
                ("attn_norm", _P), ("q_norm", _P), ("k_norm", _P),
                ("post_attn_norm", _P), ("pre_ffw_norm", _P), ("post_ffw_norm", _P),
                ("inv_freq", _P), ("k_cache", _P), ("v_cache", _P), ("slot_pos", _P),
                ("slots", ctypes.c_long), ("ring", ctypes.c_long), ("window", ctypes.c_long)]


class _Dims(ctypes.Structure):
    _fields_ = [("dim", ctypes.c_long), ("n_heads", ctypes.c_long), ("n_kv", ctypes.c_long),
                ("head_dim", ctypes.c_long), ("inter", ctypes.c_long),
                ("eps", ctypes.c_float), ("scaling", ctypes.c_float), ("softcap", ctypes.c_float)]


def _scale(norm: nn.Module | None) -> Tensor | None:
    """(1 + w) in fp32, as every RMSNorm applies it."""
    return None if norm is None else (norm.weight.detach().float() + 1.0).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedDecode:
    """Weights, norm scales and RoPE frequencies of every layer as one pointer table, plus a per-cache copy with
    that cache's buffers filled in."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        cfg = model.config
        self.lib = lib
        self.dims = _Dims(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.rms_norm_eps, cfg.scaling, cfg.attn_logit_softcapping or 0.0)
        self.keep: list[Tensor] = []  # scales and frequencies the pointer table points into
        self.layers = (_Layer * cfg.num_hidden_layers)()
        for i, block in enumerate(model.model.layers):
            att = block.self_attn
            inv_freq = model.inv_freq(i, torch.device("cpu")).float().contiguous()
            scales = [_scale(block.input_layernorm), _scale(att.q_norm), _scale(att.k_norm),
                      _scale(block.post_attention_layernorm), _scale(getattr(block, "pre_feedforward_layernorm", None)),
                      _scale(getattr(block, "post_feedforward_layernorm", None))]
            self.keep += [t for t in scales if t is not None] + [inv_freq]
            L = self.layers[i]
            for field, proj in zip(("q", "k", "v", "o", "gate", "up", "down"), PROJECTIONS, strict=True):
                w = block.get_submodule(proj).qweight
                setattr(L, field, _Mat(w.data.data_ptr(), int(w.qtype), w.rows, w.cols, w.data.shape[1]))
            (L.attn_norm, L.q_norm, L.k_norm, L.post_attn_norm, L.pre_ffw_norm, L.post_ffw_norm) = map(_ptr, scales)
            L.inv_freq = inv_freq.data_ptr()
            L.window = cfg.sliding_window if cfg.layer_types[i] == SLIDING and cfg.sliding_window else 0

    def applies(self, x: Tensor, cache) -> bool:
        """Up to STEP_ROWS new tokens over rows 0..B-1 (or one row) of a float32 CPU cache, outside autograd, where
        every token's keys can be written before any attends: ring slack for the T - 1 earlier tokens, or no
        ring wrapping yet (a prompt's first columns)."""
        B, T = x.shape[:2]
        first = cache.layers[0]
        if not (B * T <= STEP_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_grad_enabled() and first.k.dtype == torch.float32
                and (first.rows is None or first.prefix is not None or len(first.rows) == 1)):
            return False
        _, slack, ring = self._base(cache)
        return T == 1 or slack >= T - 1 or first.end <= ring

    def _table(self, cache) -> ctypes.Array:
        """The layer table for the rows the cache is prepared for: rows 0..B-1 read the cache's own table; one other
        row r a copy whose buffer pointers start at row r (one per row, kept)."""
        table = self._base(cache)[0]
        first = cache.layers[0]
        if first.rows is None or first.prefix is not None:
            return table
        r = int(first.rows[0])
        shifted = cache.native_rows.get(r)
        if shifted is None:
            shifted = type(table)()
            ctypes.memmove(shifted, table, ctypes.sizeof(table))
            for L, c in zip(shifted, cache.layers, strict=True):
                L.k_cache += r * c.k.stride(0) * c.k.element_size()
                L.v_cache += r * c.v.stride(0) * c.v.element_size()
                L.slot_pos += r * c.slot_pos.stride(0) * c.slot_pos.element_size()
            cache.native_rows[r] = shifted
        return shifted

    def _base(self, cache) -> tuple[ctypes.Array, int, int]:
        """This cache's copy of the layer table, its ring slack and its smallest ring (built once per cache: its
        buffers never move)."""
        if getattr(cache, "native", None) is None:
            table = type(self.layers)()
            ctypes.memmove(table, self.layers, ctypes.sizeof(table))
            slack = ring = 1 << 30
            for L, c in zip(table, cache.layers, strict=True):
                if not (c.k.is_contiguous() and c.v.is_contiguous() and c.slot_pos.is_contiguous()):
                    raise RuntimeError("the native decode step needs contiguous cache buffers")
                L.k_cache, L.v_cache, L.slot_pos = c.k.data_ptr(), c.v.data_ptr(), c.slot_pos.data_ptr()
                L.slots, L.ring = c.k.shape[2], int(c.ring)
                if c.ring:
                    slack, ring = min(slack, L.slots - L.window), min(ring, L.slots)
            cache.native, cache.native_rows = (table, slack, ring), {}
        return cache.native

    def __call__(self, x: Tensor, positions: Tensor, cache, ple: Tensor | None = None) -> Tensor:
        """x: (B, T, D) embedded tokens of the prepared rows (0..B-1, or one row) -> hidden states after the last
        layer (before the final norm). The cache must already be prepared for this step (KVCache.prepare). ple:
        Gemma 4's only (None)."""
        B, T, _ = x.shape
        x = x.clone(memory_format=torch.contiguous_format)  # the native step updates it in place
        pos = positions.reshape(-1).to(torch.long).contiguous()
        first = cache.layers[0]
        cols = (first.starts[:, None] + torch.arange(T)).reshape(-1).contiguous()
        self.lib.decode_layers(self._table(cache), len(self.layers), ctypes.byref(self.dims), x.data_ptr(),
                               B * T, T, pos.data_ptr(), cols.data_ptr(), first.end, torch.get_num_threads())
        return x


def attach(model: nn.Module) -> None:
    """Give a model whose projections are all QLinear its native decode step, if the native library is built;
    otherwise leave the module path."""
    lib = kernels.library()
    if lib is None:
        return
    if model.config.family == "gemma4":
        from .fused_gemma4 import attach as attach_gemma4  # here: fused_gemma4 builds on this module

        attach_gemma4(model, lib)
        return
    if model.config.family == "gemma3n":
        from .fused_gemma3n import attach as attach_gemma3n  # here: fused_gemma3n builds on this module

        attach_gemma3n(model, lib)
        return
    if model.config.family not in ("gemma", "gemma2", "gemma3"):
        return
    for block in model.model.layers:
        if not all(isinstance(block.get_submodule(p), QLinear) for p in PROJECTIONS):
            return
    model.fused_decode = FusedDecode(model, lib)
