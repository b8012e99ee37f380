"""The fast CPU path for GGUF files: every weight matrix used in the file's own block format, by memory map.

Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16 and F32 matrices are read by the native kernels straight from the
mapped file (quant/blocks.c): a load parses the header and maps the file, nothing is converted, copied or cached,
and pages are read from disk as the first forward touches them. A matrix in any other type (Q2_K, Q3_K, IQ*...) is
dequantized once to F16 in memory, with a one-line note. Norms stay float: they are tiny and need the exact 1 + w of
the reference path.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from .config import GemmaConfig
from .model import Gemma, RMSNorm
from .quant import kernels
from .quant.fused import attach as attach_fused_decode
from .quant.qlinear import NATIVE_TYPES, QWeight, quantize_q8, swap_in, swap_in_fast_norms
from .weights.gguf import GGMLQuantizationType, GGUFFile, hf_name, hf_tensor


def _is_matrix(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and not name.endswith("norm.weight")


def load_gguf_fast(g: GGUFFile, cfg: GemmaConfig, *, dtype: torch.dtype, progress: bool) -> Gemma:
    """A CPU Gemma whose projections and tied embedding are QLinear/QEmbedding over the GGUF's own blocks."""
    weights: dict[str, QWeight] = {}
    floats: dict[str, str] = {}
    converted: dict[str, int] = {}
    for name, t in g.tensors.items():
        hf = hf_name(g, name, cfg.family)
        if not _is_matrix(name, t.shape):
            floats[name] = hf
            continue
        rows, cols = t.shape
        if t.qtype in NATIVE_TYPES:
            weights[hf] = QWeight.from_bytes(g.raw(name), t.qtype, rows, cols)
        else:  # no kernel for this block type: an exact-enough F16 copy (fp16 keeps 11 significant bits)
            half = g.dequantize(name).astype(np.float16)
            weights[hf] = QWeight.from_bytes(half.view(np.uint8), GGMLQuantizationType.F16, rows, cols)
            converted[t.qtype.name] = converted.get(t.qtype.name, 0) + 1
    if converted and progress:
        kinds = ", ".join(f"{n} x{c}" for n, c in sorted(converted.items()))
        print(f"note: no native kernel for {kinds}; those matrices were dequantized to F16 in memory",
              file=sys.stderr)
    with torch.device("meta"):
        module = Gemma(cfg)
    swap_in(module, weights)
    state = {hf: hf_tensor(g, name).to(dtype) for name, hf in floats.items()}
    missing = set(module.state_dict()) - set(state)
    if missing:
        raise ValueError(f"{g.path}: no tensor for {sorted(missing)[0]}")
    module.load_state_dict(state, strict=True, assign=True)
    if dtype == torch.float32:
        swap_in_fast_norms(module, RMSNorm)
        attach_fused_decode(module)
    return module.eval()


def available() -> bool:
    """The fast path needs the native kernels (a C compiler at first use)."""
    return kernels.available()


def to_q8(module: Gemma) -> Gemma:
    """Quantize a float Gemma's projections and embedding to Q8_0 in place (quant="q8" on any source)."""
    weights = {}
    for k, v in module.state_dict().items():
        if k.endswith("proj.weight") or k == "model.embed_tokens.weight":
            weights[k] = QWeight.from_bytes(quantize_q8(v.float()), GGMLQuantizationType.Q8_0, *v.shape)
    swap_in(module, weights)
    attach_fused_decode(module)
    return module
