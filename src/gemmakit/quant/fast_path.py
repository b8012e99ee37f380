"""The fast CPU path for GGUF files: every weight matrix used in the file's own block format, by memory map.

Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16 and F32 matrices are read by the native kernels straight from the
mapped file (quant/blocks.c): a load parses the header and maps the file, nothing is converted, copied or cached,
and pages are read from disk as the first forward touches them. A matrix in any other type (Q2_K, Q3_K, IQ*...) is
dequantized once to F16 in memory, with a one-line note. Norms stay float: they are tiny and need the exact 1 + w of
the reference path.

Gemma 4's matrices run on these products too: every matrix, including the packed per-layer embedding table (a row
lookup) and each expert's slice of the 3-D expert tensors (quant/experts.py: a token reads only its routed experts'
blocks). Gemma 3n likewise: every matrix, including each of the AltUp stream projections (one stacked tensor in the
file, sliced per stream like the experts), the router and LAuReL factors where their rows are whole units. Decode
steps run as one native call on Gemma 1, 2 and 3 (quant/fused.py), Gemma 4 (quant/fused_gemma4.py) and Gemma 3n
(quant/fused_gemma3n.py).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

from ..config import GemmaConfig
from ..model import MLP, Gemma, RMSNorm
from ..moe import Experts
from ..weights.gguf import GGMLQuantizationType as QT
from ..weights.gguf import GGUFFile, hf_name, hf_tensor
from ..weights.names import ROPE_FREQS, STACKED, split_stacked, unused_shared_kv
from . import kernels
from .experts import expert_slices, swap_in_experts
from .fused import attach as attach_fused_decode
from .qlinear import NATIVE_TYPES, QWeight, quantize_q8, swap_in, swap_in_fast_norms, swap_in_fast_ops

UNIT = 32  # the kernels read activations in units of 32 values (blocks.c UNIT)


def _is_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """A weight matrix (2-D) or Gemma 4's experts (3-D: E matrices one after another) the kernels can multiply: not
    norms or scales, and rows a whole number of 32-value units (a narrower matrix, as in tiny test models, stays a
    float nn.Linear)."""
    return len(shape) in (2, 3) and not name.endswith("norm.weight") and shape[-1] % UNIT == 0


def _blocks(g: GGUFFile, name: str, converted: dict[str, int]) -> tuple[torch.Tensor, QT]:
    """The tensor's bytes (a view of the mapped file) and block type; a type without a kernel is dequantized to an
    F16 copy (fp16 keeps 11 significant bits), counted in `converted` for the note."""
    t = g.tensors[name]
    if t.qtype in NATIVE_TYPES:
        return torch.from_numpy(g.raw(name)), t.qtype
    converted[t.qtype.name] = converted.get(t.qtype.name, 0) + 1
    return torch.from_numpy(g.dequantize(name).astype(np.float16).reshape(-1).view(np.uint8)), QT.F16


def _ragged_experts(g: GGUFFile, name: str) -> bool:
    """Experts whose gate_up or down matrices are not whole units: both stay float (moe.Experts)."""
    stem = name.removesuffix("ffn_gate_up_exps.weight").removesuffix("ffn_down_exps.weight")
    if stem == name:
        return False
    return any(not _is_matrix(n, g.tensors[n].shape) for n in (f"{stem}ffn_gate_up_exps.weight",
                                                                f"{stem}ffn_down_exps.weight"))


def load_gguf_fast(g: GGUFFile, cfg: GemmaConfig, *, dtype: torch.dtype, progress: bool) -> Gemma:
    """A CPU Gemma whose projections and tied embedding are QLinear/QEmbedding over the GGUF's own blocks (Gemma 4:
    also the per-layer embedding table, its projection and gates, the router, and each expert of the MoE layers)."""
    weights: dict[str, QWeight] = {}
    experts: dict[str, dict[str, list[QWeight]]] = {}  # "model.layers.N.experts" -> gate_up_proj / down_proj
    floats: dict[str, str] = {}
    converted: dict[str, int] = {}
    for name, t in g.tensors.items():
        if cfg.family == "gemma4" and name == ROPE_FREQS:
            continue  # a RoPE mask, read into the config (partial_rotary_factor), not a weight
        hf = hf_name(g, name, cfg.family)
        if cfg.family == "gemma3n" and unused_shared_kv(hf, cfg.first_kv_shared_layer):
            continue
        if not _is_matrix(name, t.shape) or _ragged_experts(g, name):
            floats[name] = hf
            continue
        raw, qtype = _blocks(g, name, converted)
        if hf.removesuffix(".weight") in STACKED:  # Gemma 3n's AltUp projections [S-1, D, D]: one matrix per stream
            stem = hf.removesuffix(".weight")
            weights.update({f"{stem}.{i}.weight": w for i, w in enumerate(expert_slices(raw, qtype, *t.shape))})
        elif len(t.shape) == 3:  # experts [E, rows, cols]: expert e's matrix starts at byte e * rows * row_bytes
            parent, _, kind = hf.rpartition(".")
            experts.setdefault(parent, {})[kind] = expert_slices(raw, qtype, *t.shape)
        else:
            weights[hf] = QWeight(raw.reshape(t.shape[0], -1), qtype, *t.shape)
    if converted and progress:
        kinds = ", ".join(f"{n} x{c}" for n, c in sorted(converted.items()))
        print(f"note: no native kernel for {kinds}; those matrices were dequantized to F16 in memory",
              file=sys.stderr)
    with torch.device("meta"):
        module = Gemma(cfg)
    swap_in(module, weights)
    swap_in_experts(module, {k: (v["gate_up_proj"], v["down_proj"]) for k, v in experts.items()})
    state = dict(pair for name, hf in floats.items() for pair in split_stacked(hf, hf_tensor(g, name).to(dtype)))
    missing = set(module.state_dict()) - set(state)
    if missing:
        raise ValueError(f"{g.path}: no tensor for {sorted(missing)[0]}")
    module.load_state_dict(state, strict=True, assign=True)
    if dtype == torch.float32:
        swap_in_fast_norms(module, RMSNorm)
        swap_in_fast_ops(module, MLP)
        attach_fused_decode(module)
    return module.eval()


def available() -> bool:
    """The fast path needs the native kernels (a C compiler at first use)."""
    return kernels.available()


def to_q8(module: Gemma) -> Gemma:
    """Quantize a float Gemma's projections and embeddings to Q8_0 in place (quant="q8" on any source).

    Every nn.Linear and nn.Embedding becomes a QLinear/QEmbedding over Q8_0 blocks and Gemma 4's experts a
    QExperts, except the MoE router, kept exact in F32 blocks as llama.cpp keeps `ffn_gate_inp` (routing is
    sensitive to small changes); matrices whose width is not a multiple of 32 stay float."""
    weights, experts = {}, {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear | nn.Embedding) and m.weight.shape[1] % UNIT == 0:
            weights[f"{name}.weight"] = _float_blocks(m.weight, exact=name.endswith("router.proj"))
        elif isinstance(m, Experts) and m.gate_up_proj.shape[2] % UNIT == m.down_proj.shape[2] % UNIT == 0:
            experts[name] = tuple(_float_experts(w) for w in (m.gate_up_proj, m.down_proj))
    swap_in(module, weights)
    swap_in_experts(module, experts)
    swap_in_fast_ops(module, MLP)
    attach_fused_decode(module)
    return module


def _float_blocks(w: torch.Tensor, *, exact: bool = False) -> QWeight:
    """A float [N, K] matrix as Q8_0 blocks (F32 blocks where `exact`)."""
    w = w.detach().float()
    if exact:
        return QWeight(w.contiguous().view(torch.uint8), QT.F32, *w.shape)
    return QWeight.from_bytes(quantize_q8(w), QT.Q8_0, *w.shape)


def _float_experts(w: torch.Tensor) -> list[QWeight]:
    """Float experts [E, N, K] as E QWeights over one buffer, quantized an expert at a time."""
    blocks = [_float_blocks(w[e]) for e in range(w.shape[0])]
    raw = torch.stack([b.data for b in blocks])
    return expert_slices(raw, blocks[0].qtype, *w.shape)
