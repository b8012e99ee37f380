"""Gemma 4's mixture of experts (26B-A4B): a router picking top-k of E experts per token, and the experts.

Reference: transformers 5.24 `models/gemma4/modeling_gemma4.py` (Gemma4TextRouter, Gemma4TextExperts) and the
experts forward transformers runs by default, `integrations/moe.py` grouped_mm_experts_forward (cited as HF-G4 and
HF-MoE). Parameter names are transformers' (`router.proj`, `router.scale`, `router.per_expert_scale`,
`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I]), so safetensors load by identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GemmaConfig


class Router(nn.Module):
    """Scores (S, D) tokens against E experts; returns (weights (S, k) fp32, expert indices (S, k))."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.eps, self.top_k, self.root = cfg.rms_norm_eps, cfg.top_k_experts, d**-0.5
        self.proj = nn.Linear(d, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(d))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # The op sequence of HF-G4 Gemma4TextRouter, op for op, so that the probabilities are bit-identical and
        # torch.topk breaks ties the same way: scale-free RMSNorm in fp32 with pow(-0.5) (not rsqrt), cast back,
        # * scale * D^-0.5, linear, fp32 softmax, top-k, renormalise to sum 1, * per-expert scale.
        h = x.float()
        h = (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)).type_as(x)
        h = h * self.scale * self.root
        probs = F.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # (S, E)
        weights, index = torch.topk(probs, k=self.top_k, dim=-1)  # (S, k) each; ties: torch.topk's order
        weights /= weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """E GeGLU experts stored as 3-D tensors; each token runs only the k experts it was routed to."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        e, i, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        if self.down_proj.device.type != "meta":  # a fresh model (not loaded): HF-G4's init, normal(0, 0.02)
            nn.init.normal_(self.gate_up_proj, std=0.02)
            nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """x (S, D), index/weights (S, k) -> (S, D) in x's dtype (see `combine`)."""
        return combine(x, index, weights, self.num_experts, self.expert)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e's GeGLU on the rows routed to it: (n, D) -> (n, D) in x's dtype."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])


def combine(x: Tensor, index: Tensor, weights: Tensor, num_experts: int,
            expert: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Run each routed expert once on the rows routed to it and sum every token's k slots: (S, D) in x's dtype.

    Numerics of HF-MoE grouped_mm_experts_forward (transformers' default experts implementation): each (token, slot)
    pair's expert output in the model dtype is multiplied by its fp32 routing weight, and the k slots of a token are
    summed in fp32 in slot order, then cast to the model dtype once. Only experts some token was routed to are called
    (decode: at most B * k of E), so only their weights are read. Shared by Experts and the fast path's QExperts.
    """
    S, k = index.shape
    flat = index.reshape(-1)  # (S*k,) slot j of token t at t*k + j
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    out = torch.empty(S * k, x.shape[-1], dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device)
    slot_weights = weights.reshape(-1, 1)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        out[slots] = expert(e, x[slots // k]) * slot_weights[slots]  # (n, D) in the model dtype, times fp32
    return out.view(S, k, -1).sum(dim=1).to(x.dtype)
