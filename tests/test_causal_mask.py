"""A fresh prompt's attention runs SDPA's causal kernel (model.plain_causal) instead of an explicit mask: only
where the mask is exactly causal, with the same values."""

import torch

from gemmakit.model import plain_causal, visible


def _pos(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def test_plain_causal_only_where_the_mask_is_the_lower_triangle():
    fresh = _pos(list(range(6)), list(range(6)))
    assert plain_causal(fresh, fresh, None, False)
    assert plain_causal(fresh, fresh, 6, False)
    assert not plain_causal(fresh, fresh, 5, False)  # the window cuts the first keys off the last queries
    assert not plain_causal(fresh, fresh, None, True)  # an encoder sees the future
    padded = _pos([-1, -1, 0, 1, 2, 3], list(range(6)))
    assert not plain_causal(padded, padded, None, False)
    later = _pos(list(range(4, 10)))
    assert not plain_causal(later, _pos(list(range(10))), None, False)  # keys already cached before the prompt
    gap = _pos([0, 1, 2, 5, 6, 7])
    assert not plain_causal(gap, gap, None, False)
    lower = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 6, 6)
    for window in (None, 6):
        assert torch.equal(visible(fresh, fresh, window)[:, 0], lower)


def test_causal_kernel_gives_the_masked_kernels_values():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 37, 32), torch.randn(2, 1, 37, 32), torch.randn(2, 1, 37, 32)
    pos = torch.arange(37).expand(2, -1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masked = sdpa(q, k, v, attn_mask=visible(pos, pos, None), scale=0.125, enable_gqa=True)
    causal = sdpa(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(causal, masked, rtol=1e-6, atol=1e-6)
