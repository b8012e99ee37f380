"""LoRALinear: a frozen base linear plus a trainable low-rank update, built by `from_base`, folded by `merge`.

Math (Hu et al. 2021; torchtune `LoRALinear`, PEFT `lora.Linear`, mlx-lm `LoRALinear.from_base`/`fuse`):

    y = base(x) + (alpha / r) * B(A(dropout(x)))      A: [r, in], B: [out, r]

A is Kaiming-uniform (a = sqrt(5)) and B is zero, exactly PEFT's default init, so a fresh adapter leaves the model's
output unchanged. The base may be an nn.Linear or a weight-only quantized layer (QLoRA): it is only called, never
differentiated with respect to its weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import GemmaError
from ..quant.weight_only import Int4Linear, Int8Linear


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise GemmaError(f"LoRA rank must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise GemmaError(f"LoRA dropout must lie in [0, 1), got {dropout}")
        self.base_layer = base  # PEFT's attribute name, so module trees read the same
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device, dtype = _weight_device_dtype(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        for p in base.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_base(
        cls, base: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0
    ) -> LoRALinear:
        """Wrap `base` (nn.Linear, Int8Linear or Int4Linear) with a fresh adapter whose output is zero."""
        if not isinstance(base, nn.Linear | Int8Linear | Int4Linear):
            raise GemmaError(f"LoRA wraps linear layers, not {type(base).__name__}")
        if isinstance(base, nn.Linear) and base.bias is not None:
            raise GemmaError("LoRA here targets Gemma's bias-free projections; this linear has a bias")
        return cls(base, r=r, alpha=alpha, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        # The adapter runs in its own dtype (fp32 on a bf16 base trains stably), as PEFT does.
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return y + update.to(y.dtype)

    def delta_weight(self) -> Tensor:
        """(alpha / r) * B @ A, the [out, in] update that merge() adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with the update folded in (a quantized base is dequantized first)."""
        base = self.base_layer
        w = base.weight.detach() if isinstance(base, nn.Linear) else base.dequantize(torch.float32)
        dtype = dtype or (base.weight.dtype if isinstance(base, nn.Linear) else self.lora_A.weight.dtype)
        merged = (w.float() + self.delta_weight().detach()).to(dtype)
        out = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        out.weight = nn.Parameter(merged, requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _weight_device_dtype(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    if isinstance(base, nn.Linear):
        return base.weight.device, base.weight.dtype
    return base.scale.device, base.scale.dtype
