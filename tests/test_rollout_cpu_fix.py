"""Unit test of the CPU replacement for vLLM's rejection-sampler `expand_kernel` (pure torch)."""

import torch

from rollout.engine import _expand_kernel_torch


def test_expand_repeats_each_request_value_per_token_for_any_dtype():
    for dtype in (torch.float32, torch.int32, torch.int64):
        x = torch.tensor([1, 7, 3], dtype=dtype)
        cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # request 1 has no tokens
        out = torch.full((5,), -9, dtype=dtype)
        _expand_kernel_torch(out, x, cu, 0, 0)
        assert out.tolist() == [1, 1, 3, 3, 3]


def test_expand_replaces_the_sentinel_value():
    x = torch.tensor([-1.0, 0.5])
    out = torch.empty(3)
    _expand_kernel_torch(out, x, torch.tensor([1, 3]), -1, 1)  # e.g. "no top-k" → 1
    assert out.tolist() == [1.0, 0.5, 0.5]
