"""The CUDA backend's choice of kernel for a decode step, from its shapes alone (runs on the CPU: the choice needs
no GPU)."""

from __future__ import annotations

import pytest
import torch

from decode_cases import make_batch
from parrot_lc.engine import cuda_attention


@pytest.mark.parametrize("num_heads, num_kv_heads, forks, small", [
    (32, 8, 16, True),    # 64 query rows a KV head, 4 query heads each: measured faster in the Triton kernel
    (32, 4, 8, True),     # GQA ratio 8, 64 rows
    (32, 8, 17, False),   # 68 rows
    (32, 16, 16, False),  # GQA ratio 2
    (32, 32, 16, False),  # no GQA
])
def test_small_gqa_groups_are_left_to_the_triton_kernel(num_heads, num_kv_heads, forks, small):
    q, k_cache, _, layout = make_batch([(32, [3] * forks)], [5], device="cpu", num_heads=num_heads,
                                       num_kv_heads=num_kv_heads, head_dim=64, dtype=torch.float16)
    assert cuda_attention.small_gqa_groups(q, k_cache, layout) is small
