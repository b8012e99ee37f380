"""Gemma 4's mixture-of-experts weights on the fast path: each expert a QWeight over its slice of the 3-D tensor.

A GGUF stores all E experts of a layer as one 3-D tensor (`ffn_gate_up_exps` [E, 2I, D], `ffn_down_exps` [E, D, I]
in PyTorch order), expert after expert, each a plain [rows, cols] matrix of ggml blocks. `QExperts` keeps the raw
bytes (a view of the mapped file) and gives each expert a QWeight that starts at its byte offset, so a token reads
only the blocks of the experts it was routed to. Routing and the sum over slots are moe.py's (transformers'
numerics, `moe.combine`); only the products differ from the reference path (int8 activations, quant/blocks.c).
"""

from __future__ import annotations

import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import Tensor, nn

from ..moe import Experts, combine
from .qlinear import QWeight


def expert_slices(raw: Tensor, qtype: GGMLQuantizationType, experts: int, rows: int, cols: int) -> list[QWeight]:
    """E QWeights over consecutive [rows, row_bytes] slices of one buffer of E expert matrices (no copies)."""
    blocks = raw.reshape(experts, rows, -1)
    return [QWeight(blocks[e], qtype, rows, cols) for e in range(experts)]


class QExperts(nn.Module):
    """A drop-in for moe.Experts at inference: E GeGLU experts whose products run on their own blocks."""

    def __init__(self, gate_up: list[QWeight], down: list[QWeight]) -> None:
        super().__init__()
        if len(gate_up) != len(down) or any(g.cols != d.rows or g.rows != 2 * d.cols for g, d in zip(gate_up, down, strict=True)):
            raise ValueError("gate_up and down experts do not fit together ([2I, D] and [D, I] each)")
        self.num_experts = len(gate_up)
        self.gate_up, self.down = gate_up, down

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """x (S, D), index/weights (S, k) -> (S, D) in x's dtype, as moe.Experts."""
        return combine(x, index, weights, self.num_experts, self.expert)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on the rows routed to it, reading only its slices; outputs rounded to the model dtype as
        nn.Linear's would be."""
        gate, up = self.gate_up[e].matmul(x).to(x.dtype).chunk(2, dim=-1)
        return self.down[e].matmul(F.gelu(gate, approximate="tanh") * up).to(x.dtype)

    def extra_repr(self) -> str:
        g, d = self.gate_up[0], self.down[0]
        return f"experts={self.num_experts}, gate_up={g.rows}x{g.cols} {g.qtype.name}, down={d.rows}x{d.cols} {d.qtype.name}"


def swap_in_experts(module: nn.Module, experts: dict[str, tuple[list[QWeight], list[QWeight]]]) -> None:
    """Replace the moe.Experts named in `experts` (e.g. "model.layers.3.experts") by QExperts."""
    for name, (gate_up, down) in experts.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, Experts):
            raise TypeError(f"{name} is a {type(old).__name__}, not moe.Experts")
        if (len(gate_up), gate_up[0].rows, gate_up[0].cols, down[0].cols) != tuple(old.gate_up_proj.shape) + (
                old.down_proj.shape[-1],):
            raise ValueError(f"{name}: {len(gate_up)} experts of {gate_up[0].rows}x{gate_up[0].cols} where the model "
                             f"expects {tuple(old.gate_up_proj.shape)}")
        setattr(parent, child, QExperts(gate_up, down))

