"""Gemma's RMSNorm, shared by the decoder (model.py) and Gemma 3n's AltUp and LAuReL blocks (altup.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Gemma RMSNorm: computed in fp32, scaled by (offset + w), one rounding at the end (spec §1.3).

    Gemma 1-3 store a zero-centred weight and scale by 1 + w (GGUF files carry 1 + w; the loader subtracts the 1,
    spec §4.4). Gemma 3n and 4 scale by w itself (offset 0, Gemma3nRMSNorm, HF-G4 Gemma4RMSNorm), and their v_norm
    has no weight at all.
    """

    def __init__(self, dim: int, eps: float, offset: float = 1.0, scale: bool = True) -> None:
        super().__init__()
        self.eps, self.offset, self.dim = eps, offset, dim
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset)) if scale else None

    def forward(self, x: Tensor) -> Tensor:
        # One fused op: x * rsqrt(mean(x^2) + eps) * (offset + w), all in fp32, rounded once.
        w = self.weight.float() if self.weight is not None else None
        if w is not None and self.offset:
            w = w + self.offset
        return F.rms_norm(x.float(), (self.dim,), w, self.eps).to(x.dtype)
