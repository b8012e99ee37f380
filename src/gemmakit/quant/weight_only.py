"""Weight-only int8 (per output channel) and int4 (grouped) linear layers, in plain PyTorch.

The weights are frozen integers plus float scales; every forward dequantizes them to the activation dtype and runs
an ordinary matmul. That is slower than a fused kernel but exact to define, works on any device, and lets autograd
flow to the *input* (the weights get no gradient), which is all QLoRA needs: LoRA adapters train on top of a
quantized frozen base (Dettmers et al. 2023, with int8/int4 in place of NF4). `quantize_model` swaps every
`nn.Linear` after construction and `dequantize_model` swaps back, so the reference float path is one call away
(STYLE habit 6). Scheme: symmetric round-to-nearest, as in gpt-fast's `quantize.py` int8 path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GemmaError

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # int4 scale group along the input dimension (llama.cpp Q4_0 and gpt-fast use 32)


class Int8Linear(nn.Module):
    """y = x @ (q * s[:, None]).T with q int8 [out, in] and one fp32 scale per output row (absmax / 127)."""

    def __init__(
        self, in_features: int, out_features: int, *, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        _check_plain(linear)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        out = cls(linear.in_features, linear.out_features, device=w.device)
        out.qweight.copy_(q)
        out.scale.copy_(scale)
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight [out, in] this layer multiplies by."""
        dtype = dtype or self.scale.dtype
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """Symmetric int4 in groups of `group_size` input columns: q in [-8, 7], scale = absmax / 7 per (row, group).

    Two values per byte: column 2j in the low nibble, 2j + 1 in the high nibble, stored as q + 8.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group_size: int = DEFAULT_GROUP_SIZE,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise GemmaError(
                f"int4 needs in_features ({in_features}) divisible by an even group_size "
                f"({group_size}); pick a group size that divides it"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scale", torch.ones(out_features, in_features // group_size, dtype=torch.float32, device=device)
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        _check_plain(linear)
        out = cls(linear.in_features, linear.out_features, group_size=group_size, device=linear.weight.device)
        w = linear.weight.detach().float().reshape(linear.out_features, -1, group_size)  # (out, groups, g)
        scale = w.abs().amax(dim=2).clamp(min=1e-12) / 7.0
        q = (
            torch.round(w / scale[..., None]).clamp(-8, 7).to(torch.int16).reshape(linear.out_features, -1)
            + 8
        )
        out.qweight.copy_((q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8))
        out.scale.copy_(scale)
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or self.scale.dtype
        packed = self.qweight.to(torch.int16)
        q = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(self.out_features, -1) - 8  # (out, in)
        w = q.to(torch.float32).reshape(self.out_features, -1, self.group_size) * self.scale[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 "
            f"group_size={self.group_size}"
        )


QuantLinear = Int8Linear | Int4Linear


def _check_plain(linear: nn.Linear) -> None:
    if not isinstance(linear, nn.Linear):
        raise GemmaError(f"only nn.Linear layers can be quantized, got {type(linear).__name__}")
    if linear.bias is not None:
        raise GemmaError("weight-only quantization here covers bias-free linears (Gemma has no biases)")


def quantize_linear(linear: nn.Linear, mode: str, *, group_size: int = DEFAULT_GROUP_SIZE) -> QuantLinear:
    if mode == "int8":
        return Int8Linear.from_linear(linear)
    if mode == "int4":
        return Int4Linear.from_linear(linear, group_size=group_size)
    raise GemmaError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")


def quantize_model(
    module: nn.Module,
    mode: str,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Swap every nn.Linear in `module` (in place) for its weight-only quantized twin; returns `module`.

    Embeddings are left alone (the tied head reads the embedding table); names in `skip` (module-name suffixes)
    are kept in float, and so, in int4, are linears narrower than one group (Gemma 3n's 4-input AltUp coefficient
    maps: a few dozen weights, nothing to save). The mode is recorded as `module.quantization` so writers and
    adapters can say what the base was.
    """
    if mode not in MODES:
        raise GemmaError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")
    for name, child in list(module.named_modules()):
        if mode == "int4" and isinstance(child, nn.Linear) and child.in_features < group_size:
            continue
        if isinstance(child, nn.Linear) and not name.endswith(skip):
            _set_submodule(module, name, quantize_linear(child, mode, group_size=group_size))
    module.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    return module


def dequantize_model(module: nn.Module) -> nn.Module:
    """Undo quantize_model: every quantized layer becomes an nn.Linear holding its dequantized weight."""
    for name, child in list(module.named_modules()):
        if isinstance(child, Int8Linear | Int4Linear):
            _set_submodule(module, name, to_linear(child))
    module.quantization = None
    return module


def to_linear(layer: QuantLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    w = layer.dequantize(dtype)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
