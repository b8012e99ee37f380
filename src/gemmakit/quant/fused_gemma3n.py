"""Gemma 3n's native decode step (decode_gemma3n.c): every Gemma 3n layer for a few new tokens per row in one call,
as quant/fused_gemma4.py is for Gemma 4.

Gemma 3n on its PyTorch layers paid ~100 dispatched ops per layer around the native products (AltUp predict and
correct, LAuReL, the Gaussian top-k: ~3 ms per layer; E2B widths decoded at 0.66x llama.cpp). The table here is
Gemma 4's (attention with QK-norm, V-norm and KV sharing, the MLP, the per-layer input gate and projection) plus each
layer's AltUp router, coefficients and output scale, LAuReL factors and top-k quantile, and the stream projections
(the streams are made from the embedding and merged in the call too: ~40 ops and 6 ms a step at E2B widths as
PyTorch). The per-layer inputs are computed before it, the final norm, head and soft-cap after it (model.py).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from .fused import _Mat
from .fused_gemma4 import FusedDecodeGemma4, _Dims4, _Layer4, _mat, _scale
from .qlinear import QLinear

_P, _L, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
_FLOAT_LINEARS = ("altup.prediction_coefs", "altup.correction_coefs")  # S x S*S: too narrow for blocks, fp32


class _AltUp(ctypes.Structure):  # decode_gemma3n.c altup_t
    _fields_ = [("router", _Mat), ("laurel_left", _Mat), ("laurel_right", _Mat), ("router_norm", _P),
                ("laurel_norm", _P), ("correct_scale", _P), ("pred_coefs", _P), ("corr_coefs", _P),
                ("std_multiplier", _F)]


class _Dims3n(ctypes.Structure):  # decode_gemma3n.c dims3n_t
    _fields_ = [("streams", _L), ("active", _L), ("proj", _P), ("unembed", _P)]


def supported(model: nn.Module) -> bool:
    """Every product of every layer runs over blocks (QLinear), but the AltUp coefficients (float nn.Linear)."""
    for block in model.model.layers:
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear) and not isinstance(m, QLinear) and name not in _FLOAT_LINEARS:
                return False
        if not all(isinstance(block.get_submodule(n), nn.Linear) for n in _FLOAT_LINEARS):
            return False
    streams = [*model.model.altup_projections, *model.model.altup_unembed_projections]
    return len(streams) <= 14 and all(isinstance(m, QLinear) for m in streams)  # at most 8 streams


class FusedDecodeGemma3n(FusedDecodeGemma4):
    """FusedDecode's cache handling and checks; Gemma 4's layer table beside a table of AltUp and LAuReL parts."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        cfg = model.config
        self.lib = lib
        self.dims = _Dims4(cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_size_per_layer_input, 0,
                           cfg.rms_norm_eps, cfg.scaling, cfg.attn_logit_softcapping or 0.0)
        self.keep: list = []
        self.d3 = _Dims3n(cfg.altup_num_inputs, cfg.altup_active_idx, self._mats(model.model.altup_projections),
                          self._mats(model.model.altup_unembed_projections))
        self.layers = (_Layer4 * cfg.num_hidden_layers)()
        self.alt = (_AltUp * cfg.num_hidden_layers)()
        for i, block in enumerate(model.model.layers):
            self._fill(self.layers[i], i, block, model, cfg)
            self._fill_altup(self.alt[i], block)

    def _mats(self, linears: nn.ModuleList) -> int | None:
        if not len(linears):
            return None
        table = (_Mat * len(linears))(*(_mat(m.qweight) for m in linears))
        self.keep.append(table)
        return ctypes.addressof(table)

    def _fill_altup(self, A: _AltUp, block: nn.Module) -> None:
        altup, laurel = block.altup, block.laurel
        A.router = _mat(altup.modality_router.qweight)
        A.laurel_left, A.laurel_right = _mat(laurel.linear_left.qweight), _mat(laurel.linear_right.qweight)
        A.router_norm = self._keep(_scale(altup.router_norm))
        A.laurel_norm = self._keep(_scale(laurel.post_laurel_norm))
        if block.correct_scale:
            A.correct_scale = self._keep(altup.correct_output_scale.detach().float().contiguous())
        A.pred_coefs = self._keep(altup.prediction_coefs.weight.detach().float().contiguous())
        A.corr_coefs = self._keep(altup.correction_coefs.weight.detach().float().contiguous())
        A.std_multiplier = block.mlp.std_multiplier or 0.0

    def __call__(self, x: Tensor, positions: Tensor, cache, ple: Tensor | None = None) -> Tensor:
        """x: (B, T, D) embedded tokens of rows 0..B-1, ple: their per-layer inputs (B, T, L, P) -> hidden states
        after the last layer, the streams merged (before the final norm). The cache must be prepared for this step."""
        B, T, _ = x.shape
        x = x.clone(memory_format=torch.contiguous_format)  # the native step updates it in place
        ple = ple.float().contiguous()
        pos = positions.reshape(-1).to(torch.long).contiguous()
        first = cache.layers[0]
        cols = (first.starts[:, None] + torch.arange(T)).reshape(-1).contiguous()
        self.lib.decode_gemma3n(self._table(cache), self.alt, len(self.layers), ctypes.byref(self.dims),
                                ctypes.byref(self.d3), x.data_ptr(), ple.data_ptr(), B * T, T, pos.data_ptr(),
                                cols.data_ptr(), first.end, torch.get_num_threads())
        return x


def attach(model: nn.Module, lib: ctypes.CDLL) -> None:
    """Give a Gemma 3n whose every product runs over blocks its native decode step."""
    if supported(model):
        model.fused_decode = FusedDecodeGemma3n(model, lib)
