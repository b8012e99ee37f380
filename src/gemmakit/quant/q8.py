"""Q8_0 weight-only layers: the fast CPU inference path, swapped in after the model is built.

Weights live as ggml Q8_0 blocks (per 32 weights: fp16 scale + 32 int8). A GGUF's Q8_0 tensors (the 270M's tied
embedding/LM head, 64% of its bytes) are used straight from the memory-mapped file; other block types are
re-quantized to Q8_0 once and cached on disk. Decode steps and short inputs run the native GEMV (kernels.py); long
prefills dequantize one matrix at a time and use torch's GEMM (bf16 where the CPU has native bf16, else fp32).
Without the native library every path falls back to plain PyTorch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

QK, BLOCK_BYTES = 32, 34
GEMV_ROWS = 16  # up to this many input rows the native GEMV wins; above it dequantize + GEMM


def quantize_q8(w: Tensor | np.ndarray) -> np.ndarray:
    """fp32 [N, K] -> Q8_0 blocks [N, K/32*34] (uint8), as ggml's quantize_row_q8_0: d = amax/127, q = round(w/d)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % QK:
        raise ValueError(f"Q8_0 needs the input width to be a multiple of {QK}, got {k}")
    blocks = w.reshape(n, k // QK, QK)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(blocks * inv).astype(np.int8)
    out = np.empty((n, k // QK, BLOCK_BYTES), dtype=np.uint8)
    out[..., :2] = d.astype(np.float16).view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(n, -1)


def dequantize_q8(blocks: Tensor, k: int) -> Tensor:
    """Q8_0 blocks [N, K/32*34] -> fp32 [N, K] in plain PyTorch (the reference for the native kernels)."""
    b = blocks.reshape(blocks.shape[0], k // QK, BLOCK_BYTES)
    d = b[..., :2].contiguous().view(torch.float16).float()
    q = b[..., 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(blocks.shape[0], k)


class Q8Linear(nn.Module):
    """y = x @ W.T with W in Q8_0 blocks; a drop-in for a bias-free nn.Linear at inference."""

    def __init__(self, blocks: Tensor, in_features: int, out_features: int) -> None:
        super().__init__()
        if blocks.shape != (out_features, in_features // QK * BLOCK_BYTES):
            raise ValueError(f"Q8_0 blocks of shape {tuple(blocks.shape)} do not fit {out_features}x{in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("blocks", blocks, persistent=False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        lib = kernels.library()
        if lib is None:
            return dequantize_q8(self.blocks, self.in_features).to(dtype)
        n, k = self.out_features, self.in_features
        if dtype == torch.bfloat16:
            out = torch.empty(n, k, dtype=torch.bfloat16)
            lib.q8_to_bf16(self.blocks.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
            return out
        out = torch.empty(n, k)
        rows = torch.arange(n)
        lib.q8_rows(self.blocks.data_ptr(), rows.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
        return out.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        lib = kernels.library()
        if lib is not None and x2.shape[0] <= GEMV_ROWS and x.device.type == "cpu":
            x2 = x2.float().contiguous()
            y = torch.empty(x2.shape[0], self.out_features)
            lib.q8_matmul(self.blocks.data_ptr(), x2.data_ptr(), y.data_ptr(), x2.shape[0], self.out_features,
                          self.in_features, torch.get_num_threads())
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        dtype = torch.bfloat16 if x2.shape[0] > GEMV_ROWS and kernels.native_bf16() else torch.float32
        y = F.linear(x2.to(dtype), self.dequantized(dtype))
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0"


class Q8Embedding(nn.Module):
    """A tied embedding/LM head in Q8_0: rows looked up for the input, `attend` for the logits (as Flax's Embed)."""

    def __init__(self, blocks: Tensor, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.head = Q8Linear(blocks, embedding_dim, num_embeddings)

    @property
    def weight(self) -> Tensor:  # dtype/device probe used by generic code; never the full matrix
        return self.head.blocks

    def forward(self, ids: Tensor) -> Tensor:
        lib = kernels.library()
        flat = ids.reshape(-1).to(torch.long).contiguous()
        if lib is None:
            b = self.head.blocks[flat]
            return dequantize_q8(b, self.embedding_dim).reshape(*ids.shape, self.embedding_dim)
        out = torch.empty(flat.shape[0], self.embedding_dim)
        lib.q8_rows(self.head.blocks.data_ptr(), flat.data_ptr(), flat.shape[0], self.embedding_dim, out.data_ptr(),
                    torch.get_num_threads())
        return out.reshape(*ids.shape, self.embedding_dim)

    def attend(self, h: Tensor) -> Tensor:
        return self.head(h)


FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def swap_in_q8(module: nn.Module, blocks: dict[str, Tensor]) -> None:
    """Replace the modules named in `blocks` (HF tensor names ending in .weight) by their Q8_0 versions.

    nn.Linear -> Q8Linear, nn.Embedding -> Q8Embedding (tied: it also computes the LM head); a fused name
    (`qkv_proj`, `gate_up_proj`, see fuse_blocks) replaces the projections it concatenates.
    """
    for name, b in blocks.items():
        path = name.removesuffix(".weight")
        parent_name, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_name)
        fused = FUSED.get(f"{parent_name.rpartition('.')[2]}.{child}")
        if fused is not None:  # a fused group replaces its parts
            parts = [p.rpartition(".")[2] for p in fused]
            lins = [getattr(parent, p) for p in parts]
            setattr(parent, child, Q8Linear(b, lins[0].in_features, sum(x.out_features for x in lins)))
            for p in parts:
                delattr(parent, p)
            continue
        old = getattr(parent, child)
        if isinstance(old, nn.Embedding):
            new: nn.Module = Q8Embedding(b, old.num_embeddings, old.embedding_dim)
        elif isinstance(old, nn.Linear):
            new = Q8Linear(b, old.in_features, old.out_features)
        else:
            raise TypeError(f"{path} is a {type(old).__name__}, not a Linear or Embedding")
        setattr(parent, child, new)


def fuse_blocks(blocks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate the Q8_0 rows of q/k/v and of gate/up per layer (one GEMV call instead of three or two).

    Keys of fused groups become `...qkv_proj.weight` / `...gate_up_proj.weight`; everything else is unchanged.
    """
    out = dict(blocks)
    prefixes = {k.rsplit(".", 3)[0] for k in blocks if ".layers." in k}
    for prefix in prefixes:
        for fused, parts in FUSED.items():
            names = [f"{prefix}.{p}.weight" for p in parts]
            if all(n in out for n in names):
                out[f"{prefix}.{fused}.weight"] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


class FastRMSNorm(nn.Module):
    """Inference-only Gemma RMSNorm with (1 + w) precomputed; the native kernel for short inputs, torch otherwise."""

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", weight.detach(), persistent=False)  # w, as RMSNorm stores it
        self.register_buffer("scale", weight.detach().float() + 1.0, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        lib = kernels.library()
        if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() > 64 * x.shape[-1]:
            return F.rms_norm(x, self.scale.shape, self.scale, self.eps)
        x = x.contiguous()
        y = torch.empty_like(x)
        lib.rms_norm(x.data_ptr(), self.scale.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                     self.eps)
        return y


def swap_in_fast_norms(module: nn.Module, norm_type: type) -> None:
    """Replace every `norm_type` (model.RMSNorm) by a FastRMSNorm holding the same weights."""
    for name, m in list(module.named_modules()):
        if isinstance(m, norm_type):
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name), child, FastRMSNorm(m.weight, m.eps))
