"""Linear layers and the tied embedding over a GGUF's own weight blocks: the fast CPU inference path.

A `QWeight` is a matrix in one of ggml's block formats (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16, F32) held as
its raw bytes, usually a view of the memory-mapped GGUF file: nothing is converted or copied at load, and a decode
step reads each weight byte once. `QLinear` multiplies through the native kernels (blocks.c): the activations are
quantized to int8 per 32 values for the integer formats, float weights multiply fp32 activations. Swapped in after
the model is built (STYLE habit 6); the reference path (`quant=None`) keeps plain nn.Linear with dequantized weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor, nn

from ..model import apply_rope  # model.py imports nothing from quant/
from . import kernels

QT = GGMLQuantizationType
BF16_ROWS = 64  # from this many input rows, CPUs with native bf16 multiply dequantized bf16 tiles instead
TILE_BYTES = 8 << 20  # bf16 weight tile per GEMM call: a few MB, so no whole-matrix copy is ever made
# Scored logits (QEmbedding.attend(score=True): perplexity, full-sequence logits; never a decode batch, drafts to
# verify or a prefill's last position) of at least this many positions get the tied head's int8 activations
# corrected by a second pass over their rounding residual.
SCORE_ROWS = 17
# Float blocks keep fp32 activations on every path: rounding them (and F32/F16 weights) to bf16 would cost more than
# the int8 activations of the integer blocks, which the bf16 tiles stand in for.
FLOAT_TYPES = (QT.F16, QT.BF16, QT.F32)
NATIVE_TYPES = (QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.F16, QT.BF16, QT.F32)


@dataclass
class QWeight:
    """An [N, K] matrix as ggml blocks: `data` is uint8 [N, row_bytes] (a view of the file where possible)."""

    data: Tensor
    qtype: GGMLQuantizationType
    rows: int
    cols: int

    def __post_init__(self) -> None:
        block, size = GGML_QUANT_SIZES[self.qtype]
        if self.cols % block or tuple(self.data.shape) != (self.rows, self.cols // block * size):
            raise ValueError(f"{self.qtype.name} bytes of shape {tuple(self.data.shape)} do not hold a "
                             f"{self.rows}x{self.cols} matrix")

    @classmethod
    def from_bytes(cls, raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int) -> QWeight:
        return cls(torch.from_numpy(raw).reshape(rows, -1), qtype, rows, cols)

    def dequantize_rows(self, rows: Tensor) -> Tensor:
        """fp32 [len(rows), K]: embedding lookups, exactly the reference path's values."""
        flat = rows.reshape(-1).to(torch.long).contiguous()
        out = torch.empty(flat.shape[0], self.cols)
        kernels.library().dequant_rows(self.data.data_ptr(), int(self.qtype), self.cols, self.data.shape[1],
                                       flat.data_ptr(), flat.shape[0], out.data_ptr(), torch.get_num_threads())
        return out

    def matmul(self, x: Tensor) -> Tensor:
        """x [M, K] fp32 -> x @ W.T [M, N] fp32 through the native kernels (int8 activations for integer blocks);
        long inputs on CPUs with native bf16 go through bf16 tiles and torch's GEMM instead (matmul_bf16), except for
        float blocks, whose products stay fp32 at any length."""
        lib = kernels.library()
        x = x.float().contiguous()
        m = x.shape[0]
        if not self.int8_products(m) and self.qtype not in FLOAT_TYPES:
            return self.matmul_bf16(x)
        y = torch.empty(m, self.rows)
        scratch = torch.empty(lib.act_bytes(m, self.cols), dtype=torch.uint8)
        lib.qmatmul(self.data.data_ptr(), int(self.qtype), self.rows, self.cols, self.data.shape[1], x.data_ptr(),
                    m, y.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
        return y


    def int8_products(self, m: int) -> bool:
        """Whether matmul multiplies m rows with int8 activations: integer blocks, unless the rows are many and the
        CPU multiplies bf16 natively (then bf16 tiles)."""
        return self.qtype not in FLOAT_TYPES and not (m >= BF16_ROWS and kernels.native_bf16())

    def matmul_bf16(self, x: Tensor) -> Tensor:
        """x @ W.T with W dequantized to bf16 a tile of rows at a time (TILE_BYTES), for long prefills where the
        CPU multiplies bf16 natively (AVX512-BF16, AMX: ~2x the int8 kernels there)."""
        lib = kernels.library()
        n, k = self.rows, self.cols
        xb = x.to(torch.bfloat16)
        step = max(64, TILE_BYTES // (2 * k) // 64 * 64)
        tile = torch.empty(min(step, n), k, dtype=torch.bfloat16)

        def product(r0: int, rows: int) -> Tensor:  # bf16 [M, rows]
            lib.dequant_rows_bf16(self.data.data_ptr(), int(self.qtype), k, self.data.shape[1], r0, rows,
                                  tile.data_ptr(), torch.get_num_threads())
            return xb @ tile[:rows].T

        if n <= step:  # one tile (every matrix of the 270M and 2B but the head): no copy into a strided slice,
            return product(0, n).float()  # which cost 8% of a 256-token prefill (270M, AVX512-BF16, 2 cores)
        y = torch.empty(x.shape[0], n)
        for r0 in range(0, n, step):
            rows = min(step, n - r0)
            y[:, r0:r0 + rows] = product(r0, rows)  # the copy converts to fp32, as .float() would
        return y


class QLinear(nn.Module):
    """y = x @ W.T with W a QWeight; a drop-in for a bias-free nn.Linear at inference."""

    def __init__(self, weight: QWeight) -> None:
        super().__init__()
        self.qweight = weight
        self.in_features, self.out_features = weight.cols, weight.rows
        self.register_buffer("blocks", weight.data, persistent=False)  # so .to()/state stay aware of it

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self.qweight.matmul(x.reshape(-1, self.in_features))
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qweight.qtype.name}"


class QEmbedding(nn.Module):
    """A tied embedding/LM head as a QWeight: rows looked up for the input, `attend` for the logits (as Flax's
    Embed)."""

    def __init__(self, weight: QWeight) -> None:
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.rows, weight.cols
        self.head = QLinear(weight)

    @property
    def weight(self) -> Tensor:  # dtype/device probe used by generic code; never the full matrix
        return self.head.blocks

    def forward(self, ids: Tensor) -> Tensor:
        return self.qweight.dequantize_rows(ids).reshape(*ids.shape, self.embedding_dim)

    def attend(self, h: Tensor, score: bool = False) -> Tensor:
        """Logits. Scoring many positions (`score`: evaluation, full-sequence logits) through the int8 kernels, the
        head also multiplies what the int8 rounding of the activations left out (rounded to int8 in turn, ~1/127
        of the first error): that rounding, on the head alone, was +0.43% of the fast path's +1.09% perplexity on
        the code text (AVX2, the embedded 270M), over the +1% budget. It costs a second product for those positions
        only: decode steps, drafts to verify and a prefill's last position, whose logits must not depend on the
        batch, keep the one product."""
        logits = self.head(h)
        rows = h.numel() // self.embedding_dim
        if (not score or rows < SCORE_ROWS or torch.is_grad_enabled() or h.device.type != "cpu"
                or not self.qweight.int8_products(rows)):
            return logits
        units = h.float().reshape(rows, -1, 32)  # blocks.c's units of 32 (integer blocks: K a multiple of 32)
        d = units.abs().amax(-1, keepdim=True) / 127
        rounded = torch.round(units * torch.where(d > 0, 1 / d, 0)) * d  # quantize_row's steps, ties to even
        residual = (units - rounded).reshape(h.shape).to(h.dtype)
        return logits.add_(self.head(residual))  # in place: logits can be 100s of MB


def swap_in(module: nn.Module, weights: dict[str, QWeight]) -> None:
    """Replace the modules named in `weights` (HF tensor names ending in .weight) by QLinear / QEmbedding."""
    for name, w in weights.items():
        parent_name, _, child = name.removesuffix(".weight").rpartition(".")
        parent = module.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, nn.Embedding):
            new: nn.Module = QEmbedding(w)
        elif isinstance(old, nn.Linear):
            new = QLinear(w)
        else:
            raise TypeError(f"{name} is a {type(old).__name__}, not a Linear or Embedding")
        if (w.rows, w.cols) != (old.weight.shape[0], old.weight.shape[1]):
            raise ValueError(f"{name}: a {w.rows}x{w.cols} matrix where the model expects "
                             f"{tuple(old.weight.shape)}")
        setattr(parent, child, new)


def quantize_q8(w: Tensor | np.ndarray) -> np.ndarray:
    """fp32 [N, K] -> Q8_0 blocks [N, K/32*34] (uint8), as ggml's quantize_row_q8_0: d = amax/127, q = round(w/d).

    Used by quant="q8", which puts a float source (a bf16 HF folder) on the fast path."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % 32:
        raise ValueError(f"Q8_0 needs the input width to be a multiple of 32, got {k}")
    blocks = w.reshape(n, k // 32, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(blocks * inv).astype(np.int8)
    out = np.empty((n, k // 32, 34), dtype=np.uint8)
    out[..., :2] = d.astype(np.float16).view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(n, -1)


class FastRMSNorm(nn.Module):
    """Inference-only Gemma RMSNorm with (offset + w) precomputed (1 + w for Gemma 1-3, w for Gemma 4): decode.c's
    for fp32 CPU inputs of any length (the decode step's own values; torch's took 0.8 ms for 520 x 640 on 2 cores,
    ~15% of a 270M prefill), torch otherwise."""

    def __init__(self, weight: Tensor, eps: float, offset: float = 1.0) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", weight.detach(), persistent=False)  # w, as RMSNorm stores it
        self.register_buffer("scale", weight.detach().float() + offset, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        lib = kernels.library()
        if (lib is None or x.dtype != torch.float32 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and x.requires_grad)):  # the native call records no gradient
            return F.rms_norm(x, self.scale.shape, self.scale, self.eps)
        x = x.contiguous()
        y = torch.empty_like(x)
        lib.rms_norm_many(x.data_ptr(), self.scale.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                          self.eps, torch.get_num_threads())
        return y


def swap_in_fast_norms(module: nn.Module, norm_type: type) -> None:
    """Replace every `norm_type` (model.RMSNorm) with a weight by a FastRMSNorm holding the same weights (Gemma 4's
    weightless v_norm stays as it is)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, norm_type) and m.weight is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name), child, FastRMSNorm(m.weight, m.eps, m.offset))


def fast_geglu(gate: Tensor, up: Tensor) -> Tensor:
    """gelu_tanh(gate) * up by decode.c's GeGLU, the decode step's own values, for fp32 CPU inputs without autograd
    (a 512-token prefill of the 270M spent 9% of its time in torch's gelu and multiply); torch otherwise."""
    lib = kernels.library()
    if (lib is None or gate.dtype != torch.float32 or up.dtype != torch.float32 or gate.device.type != "cpu"
            or gate.shape != up.shape or (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))):
        return F.gelu(gate, approximate="tanh") * up
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    lib.geglu_many(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), torch.get_num_threads())
    return out


def fast_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """model.apply_rope by decode.c, torch's values in one pass instead of five (the 270M's 4-head q at 520 tokens:
    604 -> 214 us on 2 cores), for fp32 CPU inputs without autograd and cos/sin of x's rows and positions; torch
    otherwise."""
    lib = kernels.library()
    B, N, T, H = x.shape
    if (lib is None or x.dtype != torch.float32 or cos.dtype != torch.float32 or x.device.type != "cpu"
            or cos.shape != (B, 1, T, H) or sin.shape != cos.shape or H % 2
            or (torch.is_grad_enabled() and x.requires_grad)):
        return apply_rope(x, cos, sin)
    x, c, s = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    lib.rope_many(x.data_ptr(), c.data_ptr(), s.data_ptr(), out.data_ptr(), B, N, T, H, torch.get_num_threads())
    return out


def swap_in_fast_ops(module: nn.Module, mlp_type: type) -> None:
    """Give every `mlp_type` (model.MLP) the native GeGLU, and every attention layer the native RoPE."""
    for m in module.modules():
        if isinstance(m, mlp_type):
            m.geglu = fast_geglu
        if getattr(m, "rope", None) is apply_rope:  # model.Attention's
            m.rope = fast_rope
