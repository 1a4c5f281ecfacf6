"""The fused decode kernel (one query row per sequence over a context tree) against float64 dense attention.

A case is a tree: groups of sequences that read a shared prefix once, sequences in no group, each with KV of
its own after the prefix (which may itself hold a deeper shared level, reached through its block table), and
padding rows with no KV (cases from decode_cases.py). On the CPU the kernel runs in Triton's interpreter
(float32, fp16: the interpreter misreads bf16); bf16 and real sizes are in test_gpu_decode_kernels.py.
"""

import pytest
import torch

from decode_cases import make_batch, reference
from parrot_lc.engine.triton_decode import CONFIGS, DecodeConfig, decode_attention, row_counters
from test_attention_backend import DEVICE


def run_tree(tree, num_heads: int, num_kv_heads: int, head_dim: int, page: int, dtype: torch.dtype,
             nested: bool = False, config: DecodeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's output (B, Hq, D) on a random paged cache of `tree` (groups, loners, padding rows), and the
    float64 expected one. `nested`: the first two sequences of group 0 also share a second level; `config`: the
    kernel's shape (default: the one it picks)."""
    groups, loners, padding = tree
    q, k_cache, v_cache, layout = make_batch(groups, loners, padding, device=DEVICE, page=page, num_heads=num_heads,
                                             num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, nested=nested)
    scale = head_dim**-0.5
    out = decode_attention(q, k_cache, v_cache, layout, scale, config)
    return out, reference(q, k_cache, v_cache, layout, scale)


# (groups: [(prefix tokens, own tokens of each member)], own tokens of sequences in no group, padding rows)
TREES = {
    "one group": ([(16, [1, 5, 9])], [], 0),
    "three groups and loners": ([(8, [3, 1]), (24, [7, 2, 11, 4]), (4, [5])], [6, 1, 13], 0),
    "loners only": ([], [1, 9, 30], 0),
    "padding rows": ([(12, [2, 3])], [4], 2),
}


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (6, 2)])
def test_decode_over_a_context_tree_equals_dense_attention(tree, num_heads, num_kv_heads):
    out, expected = run_tree(TREES[tree], num_heads, num_kv_heads, 16, 4, torch.float32)
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("page", [1, 8, 16])
def test_decode_block_sizes_and_partial_blocks(page):
    tree = ([(2 * page, [1, page + 3, 2 * page])], [page - 1 or 1, 3 * page + 1], 0)
    out, expected = run_tree(tree, 8, 2, 16, page, torch.float32)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_decode_with_more_query_heads_per_kv_head_than_a_tile_has_rows():
    out, expected = run_tree(([(8, [3, 5])], [4], 0), 72, 1, 16, 4, torch.float32)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_decode_of_a_fork_of_a_fork_equals_dense_attention():
    out, expected = run_tree(([(8, [12, 9, 3, 10])], [5], 0), 4, 2, 16, 4, torch.float32, nested=True)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_decode_in_fp16_is_within_half_precision_bounds():
    out, expected = run_tree(TREES["three groups and loners"], 8, 2, 32, 4, torch.float16)
    assert not out.isnan().any()
    assert (out.double() - expected).abs().max() < 1e-2


@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_decode_for_each_gqa_group_size(group_size):
    # Two KV heads; a group of 5 forks has 5 x G query rows per KV head, more than one 16-row tile from G = 4 up.
    out, expected = run_tree(([(8, [3, 1, 6, 2, 5])], [4], 1), 2 * group_size, 2, 16, 4, torch.float32)
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_decode_configs_compute_the_same_attention(config):
    out, expected = run_tree(TREES["three groups and loners"], 8, 2, 16, 4, torch.float32, nested=True,
                             config=CONFIGS[config])
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_decode_leaves_its_merge_counters_at_zero_for_the_next_launch():
    out, expected = run_tree(TREES["padding rows"], 8, 2, 16, 4, torch.float32, config=CONFIGS["rows64"])
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert not row_counters(out.device, 1).any()
