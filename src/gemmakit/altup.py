"""Gemma 3n's additions to the decoder: AltUp streams, the LAuReL residual and Gaussian top-k activation sparsity.

AltUp ("alternating updates") keeps `altup_num_inputs` copies of the residual stream. Each layer computes on one of
them (the active stream) and updates the others cheaply: before the layer a router-weighted linear mix *predicts*
every stream, after it the layer's output *corrects* all of them in proportion to its innovation over the
prediction. The streams are made from the embedding by projections at the bottom and merged back (un-projected,
averaged) at the top. LAuReL adds a low-rank residual branch beside attention. Numerics follow transformers
`models/gemma3n/modeling_gemma3n.py` (HF-3N); llama.cpp `src/models/gemma3n-iswa.cpp` builds the same graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GemmaConfig
from .norm import RMSNorm


def std_multiplier(sparsity: float) -> float:
    """The Gaussian quantile at `sparsity` in fp32, as HF-3N's Normal(0, 1).icdf computes it (0.95 -> 1.6449);
    on the CPU even while the model is built on the meta device."""
    p = torch.tensor(sparsity, dtype=torch.float32, device="cpu")
    return (torch.erfinv(2 * p - 1) * math.sqrt(2)).item()


def gaussian_topk(x: Tensor, multiplier: float) -> Tensor:
    """Keep the activations above mean + multiplier * std of their row (population std), shifted down by that
    cutoff: if the row were Gaussian, the top (1 - sparsity) share survives (HF-3N Gemma3nTextMLP._gaussian_topk)."""
    cutoff = x.mean(dim=-1, keepdim=True) + x.std(dim=-1, keepdim=True, unbiased=False) * torch.tensor(
        multiplier, dtype=x.dtype, device=x.device)
    return F.relu(x - cutoff)


class Laurel(nn.Module):
    """Learned augmented residual layer: x + norm(right(left(x))), rank `laurel_rank` (HF-3N Gemma3nTextLaurelBlock)."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.linear_left = nn.Linear(cfg.hidden_size, cfg.laurel_rank, bias=False)
        self.linear_right = nn.Linear(cfg.laurel_rank, cfg.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nn.Module):
    """One layer's AltUp: the router, its norm, the prediction and correction coefficients (HF-3N Gemma3nTextAltUp).

    Streams are stacked as (S, B, T, D)."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        s, d = cfg.altup_num_inputs, cfg.hidden_size
        self.n, self.active, self.clip = s, cfg.altup_active_idx, cfg.altup_coef_clip
        self.correct_output_scale = nn.Parameter(torch.zeros(d))
        self.correction_coefs = nn.Linear(s, s, bias=False)
        self.prediction_coefs = nn.Linear(s, s * s, bias=False)
        self.modality_router = nn.Linear(d, s, bias=False)
        self.router_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
        self.router_scale = 1.0 / d  # router_input_scale: a D^-1 buffer, cast to the activations' dtype

    def modalities(self, x: Tensor) -> Tensor:
        """(B, T, S) router weights in [-1, 1]: tanh in fp32 of a projection of the normed, 1/D-scaled stream."""
        scaled = self.router_norm(x) * torch.tensor(self.router_scale, dtype=x.dtype, device=x.device)
        return torch.tanh(self.modality_router(scaled).float()).type_as(x)

    def predict(self, streams: Tensor) -> Tensor:
        """Each stream plus a router-weighted mix of all streams: (S, B, T, D) -> (S, B, T, D)."""
        modalities = self.modalities(streams[self.active])
        if self.training and self.clip is not None:  # HF-3N clamps the weights themselves while training
            with torch.no_grad():
                self.prediction_coefs.weight.clamp_(-self.clip, self.clip)
        coefs = self.prediction_coefs(modalities).reshape(*modalities.shape[:-1], self.n, self.n).permute(0, 1, 3, 2)
        mixed = torch.matmul(streams.permute(1, 2, 3, 0), coefs).permute(3, 0, 1, 2)  # (B,T,D,S) @ (B,T,S,S)
        return (mixed + streams).contiguous().type_as(streams)

    def correct(self, predictions: Tensor, activated: Tensor) -> Tensor:
        """Every prediction plus (1 + router coefficient) times the active stream's innovation."""
        modalities = self.modalities(activated)
        innovation = activated - predictions[self.active]  # (B, T, D)
        weight = self.correction_coefs.weight
        if self.training and self.clip is not None:
            weight = weight.clamp(-self.clip, self.clip)
        coefs = F.linear(modalities, weight) + 1.0  # (B, T, S)
        corrected = innovation.unsqueeze(0) * coefs.permute(2, 0, 1).unsqueeze(-1) + predictions
        return corrected.contiguous().type_as(activated)

    def scale_corrected(self, x: Tensor) -> Tensor:
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)


def altup_layer(block: nn.Module, streams: Tensor, attend, per_layer_input: Tensor) -> Tensor:
    """One Gemma 3n decoder layer over the stacked streams (HF-3N Gemma3nTextDecoderLayer.forward).

    `attend(x)` runs the block's attention on the normed active stream (the caller binds RoPE, cache and masks).
    """
    altup = block.altup
    predictions = altup.predict(streams)
    active = predictions[altup.active]
    normed = block.input_layernorm(active)
    laurel = block.laurel(normed)
    attn = block.post_attention_layernorm(attend(normed))
    x = (active + attn + laurel) / math.sqrt(2)  # HF-3N: (attn_gated + laurel_output) / sqrt(2)
    x = x + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(x)))
    corrected = altup.correct(predictions, x)
    first = corrected[altup.active]
    if block.correct_scale:
        first = altup.scale_corrected(first)
    # The per-layer input, gated by the corrected active stream, is added to every stream but the first (HF-3N:
    # corrected_predictions[1:] += ..., whatever altup_active_idx is).
    g = F.gelu(block.per_layer_input_gate(first), approximate="tanh") * per_layer_input
    g = block.post_per_layer_input_norm(block.per_layer_projection(g))
    return torch.cat((corrected[:1], corrected[1:] + g), dim=0)


def _rescaled(x: Tensor, target: Tensor) -> Tensor:
    """x scaled to the root-mean-square `target` (its own RMS floored at sqrt(1e-5)), per position."""
    norm = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target / norm


def expand_streams(x: Tensor, projections: nn.ModuleList) -> Tensor:
    """(B, T, D) embeddings -> (S, B, T, D) streams: the embedding, then its projections at its RMS (HF-3N
    Gemma3nTextModel.forward)."""
    target = torch.mean(x**2, dim=-1, keepdim=True) ** 0.5
    return torch.stack([x, *(_rescaled(p(x).to(x.dtype), target) for p in projections)], dim=0)


def merge_streams(streams: Tensor, unembed: nn.ModuleList) -> Tensor:
    """(S, B, T, D) -> (B, T, D): streams 1.. un-projected to stream 0's RMS, then the mean of all."""
    target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
    parts = [streams[0], *(_rescaled(p(streams[i + 1]).to(streams.dtype), target) for i, p in enumerate(unembed))]
    return torch.mean(torch.stack(parts), dim=0)
