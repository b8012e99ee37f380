"""The reference path for GGUF files when the native kernels cannot be built: int8 weights, not a float copy.

Dequantizing a Q4_K_M file to fp32 multiplies its size by ~7 (a 2B: 1.6 GB on disk, ~10 GB in memory), more than
many 8-16 GB laptops can spare. Without the kernels, the file is dequantized to bf16 (2 bytes a weight, peak), then
each weight matrix is rounded to int8 per output row (absmax / 127, as weight_only.Int8Linear; bf16's rounding is
~1/64 of that step) and multiplied by torch's int8 weight GEMM (`torch._weight_int8pack_mm`, fp32 activations):
~1 byte per weight, ~1.8x a Q4_K_M file. Norms and Gemma 4's 3-D expert tensors stay float (fp32). CPUs that multiply
bf16 natively keep the bf16 model instead (loader.py asks `reference_plan`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..weights.gguf import GGUFFile
from .kernels import native_bf16


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 [N, K] -> (int8 [N, K], fp32 scales [N]): round(w / s) with s = absmax / 127 per row."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


def int8_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [..., K] @ (q * scale[:, None]).T in fp32, through torch's int8 weight kernel."""
    shape = x.shape
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).float().contiguous(), q, scale)
    return y.reshape(*shape[:-1], q.shape[0])


class Int8RowLinear(nn.Module):
    """A bias-free linear layer over int8 rows with one fp32 scale each; inference only."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return int8_matmul(x, self.qweight, self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows"


class Int8RowEmbedding(nn.Module):
    """An embedding table over int8 rows: lookups dequantize their rows; `attend` is the tied head (as QEmbedding)."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    @property
    def weight(self) -> Tensor:  # dtype/device probe used by generic code: the model computes in fp32
        return self.scale

    def forward(self, ids: Tensor) -> Tensor:
        return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)

    def attend(self, h: Tensor, score: bool = False) -> Tensor:  # score: QEmbedding.attend's; one product here
        return int8_matmul(h, self.qweight, self.scale)


def to_int8_rows(module: nn.Module) -> nn.Module:
    """Every bias-free nn.Linear and every nn.Embedding of a (bf16) model as int8 rows, one matrix at a time, then
    the rest (norms, Gemma 4's experts) in fp32, the dtype the int8 kernel computes in."""
    for name, old in list(module.named_modules()):
        if isinstance(old, nn.Embedding):
            new: nn.Module = Int8RowEmbedding(*quantize_rows(old.weight.detach()))
        elif isinstance(old, nn.Linear) and old.bias is None:
            new = Int8RowLinear(*quantize_rows(old.weight.detach()))
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, new)  # the float matrix is freed here
    return module.float()


def reference_plan(g: GGUFFile, dtype: torch.dtype | None = None) -> tuple[str, int]:
    """How the reference path holds this file's weights without the kernels, and the bytes that takes: in `dtype`
    when the caller chose one; else "bfloat16" where the CPU multiplies bf16 natively, "int8" elsewhere."""
    kind = str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16" if native_bf16() else "int8"
    total = 0
    for name, t in g.tensors.items():
        n = math.prod(t.shape)
        if kind != "int8":
            total += n * (dtype.itemsize if dtype is not None else 2)
        elif len(t.shape) == 2 and not name.endswith("norm.weight"):
            total += n + 4 * t.shape[0]  # int8 rows and their fp32 scales
        else:
            total += 4 * n
    return kind, total
