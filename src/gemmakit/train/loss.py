"""Chunked (fused linear + cross-entropy) loss: never materializes the [T, V] logits of a whole sequence.

Gemma's vocabulary is 256k-262k rows, so the logits of 512 tokens are 0.5 GB in fp32, and autograd would keep them
plus their softmax and gradient. Here the head matmul, log-sum-exp and gradient are computed `chunk` rows at a
time: the gradient of the summed loss with respect to the hidden states, dL/dh = (softmax(z) - onehot) @ W, is
formed during the forward pass (the loss is the graph's output, so its own gradient is a scalar), and backward
only scales it. Peak extra memory is one [chunk, V] block; the head is computed once instead of twice. Same idea
as Liger-Kernel's FusedLinearCrossEntropy and Apple's Cut Cross-Entropy. Gemma 2's final soft-cap
z = c * tanh(x / c) is applied in the chunk, with its derivative 1 - tanh^2.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 25  # 32M logits per chunk (128 MB in fp32): 128 rows of a 262k vocabulary


def chunk_rows(vocab: int, elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, elements // vocab)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk: int,
        cap: float | None,
        need_h: bool,
        need_w: bool,
    ) -> Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        # One [chunk, V] logits buffer in the model dtype and one in fp32, reused by every chunk and every step of
        # the softmax: fresh 100+ MB blocks go back to the OS when freed and are page-faulted in again each time
        # (25-30 ms per 128 MB on a 2-core Xeon, about as long as the exp over them).
        rows = min(chunk, n)
        z_model = torch.empty((rows, vocab), dtype=h.dtype, device=h.device)
        z_f32 = z_model if h.dtype == torch.float32 else torch.empty_like(z_model, dtype=torch.float32)
        for s in range(0, n, chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            zm, z = z_model[: hc.shape[0]], z_f32[: hc.shape[0]]
            torch.mm(hc, weight.T, out=zm)  # (c, V): the head in the model dtype, like Gemma.head
            if z is not zm:
                z.copy_(zm)  # log-sum-exp and softmax in fp32
            t = None
            if cap is not None:
                t = torch.tanh(z / cap)
                torch.mul(t, cap, out=z)
            picked = z.gather(1, tc[:, None])[:, 0]
            top = z.amax(dim=-1, keepdim=True)
            e = z.sub_(top).exp_()  # exp(z - max), in place
            sum_e = e.sum(dim=-1, keepdim=True)
            total += (top[:, 0] + sum_e[:, 0].log() - picked).sum()
            if need_h or need_w:
                g = e.div_(sum_e)  # softmax, in place
                g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
                if t is not None:
                    g.mul_(1.0 - t * t)
                if need_w:
                    grad_w.addmm_(g.T, hc.float())
                if need_h:
                    torch.mm(zm.copy_(g), weight, out=grad_h[s : s + chunk])
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.flags = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.flags
        gh = saved.pop(0) * grad_out if need_h else None
        gw = saved.pop(0) * grad_out if need_w else None
        return gh, gw, None, None, None, None, None


def chunked_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    softcap: float | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Sum over masked positions of -log softmax(h @ W.T)[target]: (sum loss, fp32 scalar).

    h: (..., D) hidden states, weight: (V, D) head, targets/mask: (...) next-token ids and which count. Only
    rows with mask=True go through the head at all, so prompt tokens cost nothing there.
    """
    rows = h[mask]  # (N, D)
    tgt = targets[mask]
    if rows.shape[0] == 0:
        return h.sum() * 0.0
    grad = torch.is_grad_enabled()
    return _FusedLinearCE.apply(
        rows,
        weight,
        tgt,
        chunk or chunk_rows(weight.shape[0]),
        softcap,
        grad and rows.requires_grad,
        grad and weight.requires_grad,
    )
