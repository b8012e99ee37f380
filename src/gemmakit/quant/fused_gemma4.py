"""Gemma 4's native decode step (decode_gemma4.c): every layer kind of Gemma 4 for a few new tokens per row, in one
call, as quant/fused.py is for Gemma 1-3.

Gemma 4 on its PyTorch layers paid ~40-60 dispatched ops per layer around the native products (E2B widths decoded at
0.85x llama.cpp). The table here carries each layer's own head dim, KV heads and MLP width, which of its projections
exist (KV-shared layers have no k/v, attention_k_eq_v no v), the per-layer input gate and projection, and the MoE
router and experts; a KV-shared layer's cache pointers are its source layer's (KVCache holds one object for both).
The per-layer embeddings are computed before the call (a table row and one projection per step, model.py), the final
norm, head and soft-cap after it.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from ..config import SLIDING
from .experts import QExperts
from .fused import FusedDecode, _Mat
from .qlinear import QLinear, QWeight

_P, _L, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
_NORMS = ("attn_norm", "q_norm", "k_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm", "post_ffw_norm_1",
          "pre_ffw_norm_2", "post_ffw_norm_2")
_MODULE_NORMS = ("input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
                 "pre_feedforward_layernorm", "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                 "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2")


class _Layer4(ctypes.Structure):  # decode_gemma4.c layer4_t
    _fields_ = [*[(n, _Mat) for n in ("q", "k", "v", "o", "gate", "up", "down", "ple_gate", "ple_proj", "router")],
                ("gate_up_exps", _P), ("down_exps", _P), *[(n, _P) for n in _NORMS],
                ("router_scale", _P), ("expert_scale", _P), ("ple_norm", _P), ("inv_freq", _P),
                ("k_cache", _P), ("v_cache", _P), ("slot_pos", _P),
                ("slots", _L), ("ring", _L), ("window", _L), ("head_dim", _L), ("n_kv", _L), ("inter", _L),
                ("n_experts", _L), ("layer_scalar", _F)]


class _Dims4(ctypes.Structure):  # decode_gemma4.c dims4_t
    _fields_ = [("dim", _L), ("n_heads", _L), ("ple", _L), ("top_k", _L),
                ("eps", _F), ("scaling", _F), ("softcap", _F)]


def _mat(w: QWeight | None) -> _Mat:
    return _Mat() if w is None else _Mat(w.data.data_ptr(), int(w.qtype), w.rows, w.cols, w.data.shape[1])


def _part(block: nn.Module, name: str) -> nn.Module | None:
    """A submodule, None where the layer has none (KV-shared k/v and k_norm, k_eq_v's v, no PLE or MoE)."""
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _linear(block: nn.Module, name: str) -> QWeight | None:
    m = _part(block, name)
    return None if m is None else m.qweight


def _scale(norm: nn.Module | None) -> Tensor | None:
    """(offset + w) in fp32: a FastRMSNorm's precomputed scale, or a model.RMSNorm's (quant="q8" keeps those)."""
    if norm is None:
        return None
    if hasattr(norm, "scale") and isinstance(norm.scale, Tensor):
        return norm.scale.float().contiguous()
    return (norm.weight.detach().float() + norm.offset).contiguous()


def supported(model: nn.Module) -> bool:
    """Every product of every layer runs over blocks (QLinear, QExperts): the native step has no float path."""
    for block in model.model.layers:
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear) or (block.moe and name == "experts" and not isinstance(m, QExperts)):
                return False
    return True


class FusedDecodeGemma4(FusedDecode):
    """FusedDecode's cache handling and checks, with the Gemma 4 layer table."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        cfg = model.config
        self.lib = lib
        self.dims = _Dims4(cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_size_per_layer_input,
                           cfg.top_k_experts if cfg.enable_moe_block else 0, cfg.rms_norm_eps, cfg.scaling,
                           cfg.attn_logit_softcapping or 0.0)
        self.keep: list = []  # scales, frequencies and expert tables the pointer table points into
        self.layers = (_Layer4 * cfg.num_hidden_layers)()
        for i, block in enumerate(model.model.layers):
            self._fill(self.layers[i], i, block, model, cfg)

    def _keep(self, t: Tensor | None) -> int | None:
        if t is None:
            return None
        self.keep.append(t)
        return t.data_ptr()

    def _fill(self, L: _Layer4, i: int, block: nn.Module, model: nn.Module, cfg) -> None:
        att = block.self_attn
        for field, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            setattr(L, field, _mat(_linear(att, name)))
        for field, name in (("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"),
                            ("ple_gate", "per_layer_input_gate"), ("ple_proj", "per_layer_projection"),
                            ("router", "router.proj")):
            setattr(L, field, _mat(_linear(block, name)))
        for field, name in zip(_NORMS, _MODULE_NORMS, strict=True):
            setattr(L, field, self._keep(_scale(_part(block, name))))
        L.ple_norm = self._keep(_scale(_part(block, "post_per_layer_input_norm")))
        if block.moe:
            ex = block.experts
            for field, mats in (("gate_up_exps", ex.gate_up), ("down_exps", ex.down)):
                table = (_Mat * len(mats))(*map(_mat, mats))
                self.keep.append(table)
                setattr(L, field, ctypes.addressof(table))
            L.router_scale = self._keep(block.router.scale.detach().float().contiguous())
            L.expert_scale = self._keep(block.router.per_expert_scale.detach().float().contiguous())
            L.n_experts = ex.num_experts
        L.inv_freq = self._keep(model.inv_freq(i, torch.device("cpu")).float().contiguous())
        L.window = cfg.sliding_window if cfg.layer_types[i] == SLIDING and cfg.sliding_window else 0
        L.head_dim, L.n_kv, L.inter = att.head_dim, att.n_kv, block.mlp.gate_proj.out_features
        L.layer_scalar = 1.0 if block.layer_scalar is None else float(block.layer_scalar)  # Gemma 3n: none

    def __call__(self, x: Tensor, positions: Tensor, cache, ple: Tensor | None = None) -> Tensor:
        """x: (B, T, D) embedded tokens of rows 0..B-1, ple: their per-layer inputs (B, T, L, P) or None -> hidden
        states after the last layer (before the final norm). The cache must be prepared for this step."""
        B, T, _ = x.shape
        x = x.clone(memory_format=torch.contiguous_format)  # the native step updates it in place
        ple = None if ple is None else ple.float().contiguous()
        pos = positions.reshape(-1).to(torch.long).contiguous()
        first = cache.layers[0]
        cols = (first.starts[:, None] + torch.arange(T)).reshape(-1).contiguous()
        self.lib.decode_gemma4(self._table(cache), len(self.layers), ctypes.byref(self.dims), x.data_ptr(),
                               None if ple is None else ple.data_ptr(), B * T, T, pos.data_ptr(), cols.data_ptr(),
                               first.end, torch.get_num_threads())
        return x


def attach(model: nn.Module, lib: ctypes.CDLL) -> None:
    """Give a Gemma 4 whose every product runs over blocks its native decode step."""
    if supported(model) and all(isinstance(b.self_attn.q_proj, QLinear) for b in model.model.layers):
        model.fused_decode = FusedDecodeGemma4(model, lib)
