"""The GPU decode kernels (CUDA in csrc/, Triton in triton_decode.py) against dense float64 attention, on random
trees of sequences, at real sizes and in bf16 as well as fp16.

Cases and their reference come from decode_cases.py (shared with the CPU tests of test_decode_attention.py).
Runs only on a GPU; the CUDA kernel only where the extension is built.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from conftest import GPU
from decode_cases import make_batch, reference
from parrot_lc.engine import cuda_attention
from parrot_lc.engine.triton_decode import CONFIGS, decode_attention

pytestmark = GPU


def cuda_wgmma(q, k_cache, v_cache, layout, scale, blocks_per_sm=2):
    """The CUDA kernel with every shared item of 64 rows on wgmma (where built for sm_90a), whatever the sizes, in
    its kernel of `blocks_per_sm` resident blocks."""
    group = q.shape[1] // k_cache.shape[2]
    picked = cuda_attention.plan(q, k_cache, layout, blocks_per_sm=blocks_per_sm, warp_specialized=False)
    launch = dataclasses.replace(picked, row_warps=4, wgmma=True,
                                 shared_tiles=math.ceil(layout.max_group / (64 // group)))
    return cuda_attention.cuda_decode_attention(q, k_cache, v_cache, layout, scale, launch=launch)


def cuda_warp_specialized(q, k_cache, v_cache, layout, scale):
    """The CUDA kernel with every shared item of 128 rows on the warp-specialized kernel, whatever the sizes, where
    it can run (Hopper, head dim 128, pages of 16 tokens or more)."""
    reason = cuda_attention.warp_specialized_unsupported(q, k_cache)
    if reason:
        pytest.skip(reason)
    launch = cuda_attention.plan(q, k_cache, layout, warp_specialized=True)
    return cuda_attention.cuda_decode_attention(q, k_cache, v_cache, layout, scale, launch=launch)


# The CUDA kernel in the plan it picks, with wgmma shared items (in both of its kernels: 2 and 3 blocks a
# multiprocessor) and with 128-row warp-specialized ones; the Triton kernel in the config it picks, and
# in its 128-row config (the one for large GQA groups, picked only where a group has more than 64 query rows a
# KV head).
cuda_wgmma_3_blocks = functools.partial(cuda_wgmma, blocks_per_sm=3)
KERNELS = {"cuda": cuda_attention.cuda_decode_attention, "cuda_wgmma": cuda_wgmma,
           "cuda_wgmma_3_blocks": cuda_wgmma_3_blocks, "cuda_warp_specialized": cuda_warp_specialized,
           "triton": decode_attention, "triton_rows128": functools.partial(decode_attention, config=CONFIGS["rows128"])}
CUDA_KERNELS = (cuda_attention.cuda_decode_attention, cuda_wgmma, cuda_wgmma_3_blocks, cuda_warp_specialized)


@pytest.fixture(params=KERNELS)
def kernel(request):
    if request.param.startswith("cuda") and not cuda_attention.available():
        pytest.skip("needs parrot_lc._cuda (built by setup.py where torch has CUDA and nvcc is found)")
    return KERNELS[request.param]


def cuda_batch(*args, **kwargs):
    """A case of decode_cases.make_batch on the GPU."""
    return make_batch(*args, device="cuda", **kwargs)


def check(kernel, q, k_cache, v_cache, layout):
    scale = q.shape[-1] ** -0.5
    out = kernel(q, k_cache, v_cache, layout, scale)
    expected = reference(q, k_cache, v_cache, layout, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any()
    error = (out.double() - expected).abs().max() / expected.abs().max()
    assert error < 1e-2, f"relative error {error:.2e}"
    padding = (layout.context_lens == 0) & (layout.shared_lens == 0)
    assert (out[padding] == 0).all()


TREES = {
    "one_group": ([(64, [5, 17, 1, 40, 16])], [], 0),
    # a group of 1, groups of different prefix lengths and sizes, sequences in no group, a padding row
    "three_groups": ([(160, [3, 33, 1, 70, 16, 8, 2]), (48, [9]), (32, [1, 100, 15, 16])], [7, 300, 1], 1),
    "no_groups": ([], [1, 20, 257, 600], 2),
}


@pytest.mark.parametrize("page", [16, 1, 8])
@pytest.mark.parametrize("tree", TREES)
def test_tree_shapes_and_page_sizes(kernel, tree, page):
    groups, loose, padding = TREES[tree]
    check(kernel, *cuda_batch(groups, loose, padding, page=page))


@pytest.mark.parametrize("page", [64, 128])
def test_pages_of_whole_tiles(kernel, page):
    # A tile is a page (or half of one): the wgmma items copy it in one box a K or V half.
    check(kernel, *cuda_batch([(256, [5, 17, 130]), (128, [64])], [3, 200], 1, page=page))


def test_a_prefix_ending_inside_a_page_reads_no_slot_past_its_end(kernel):
    # The group's last page is read in one box up to its end; its slots past the prefix's 56 tokens are NaN.
    q, k_cache, v_cache, layout = cuda_batch([(64, [0] * 5)], [30], poison=False)
    last_block = int(layout.group_tables[0, 3])
    k_cache[last_block, 8:] = float("nan")
    v_cache[last_block, 8:] = float("nan")
    members = layout.group_rows.long()
    layout.group_lens.fill_(56)
    layout.shared_lens[members] = 56
    layout.context_lens[members] = 56
    check(kernel, q, k_cache, v_cache, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
# GQA ratios 1, 4, 8 and 2, the last with KV heads not a multiple of an own item's 4
@pytest.mark.parametrize("num_heads, num_kv_heads", [(32, 32), (32, 8), (32, 4), (12, 6)])
def test_gqa_ratios_head_dims_and_dtypes(kernel, num_heads, num_kv_heads, head_dim, dtype):
    groups, loose, padding = TREES["three_groups"]
    check(kernel, *cuda_batch(groups, loose, padding, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      dtype=dtype))


@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_gqa_group_sizes(kernel, group_size):
    if kernel in CUDA_KERNELS and group_size > cuda_attention.MAX_GQA_RATIO:
        pytest.skip(f"the CUDA kernel takes up to {cuda_attention.MAX_GQA_RATIO} query heads per KV head")
    groups, loose, padding = TREES["three_groups"]
    check(kernel, *cuda_batch(groups, loose, padding, num_heads=4 * group_size, num_kv_heads=4))


@pytest.mark.parametrize("config", CONFIGS)
def test_triton_configs_on_a_large_gqa_group(config):
    # 200 forks x 4 query heads: 800 rows a KV head, many tiles of either size, several prefix splits.
    gen = torch.Generator().manual_seed(2)
    owns = torch.randint(1, 300, (200,), generator=gen).tolist()
    check(functools.partial(decode_attention, config=CONFIGS[config]), *cuda_batch([(2048, owns)], [700], 1))


@pytest.mark.parametrize("num_kv_heads", [32, 8])
def test_long_prefix_and_256_sequences(kernel, num_kv_heads):
    gen = torch.Generator().manual_seed(1)
    owns = torch.randint(1, 300, (256,), generator=gen).tolist()
    check(kernel, *cuda_batch([(4096, owns), (1024, [50] * 10)], [3000, 5], 1, num_kv_heads=num_kv_heads))


def test_long_prefix_few_members_splits_the_prefix(kernel):
    check(kernel, *cuda_batch([(4096, [3, 10])], [], 0))


def test_cuda_graph_replay_with_changed_lengths_matches_eager(kernel):
    q, k_cache, v_cache, layout = cuda_batch([(64, [20, 5, 33]), (32, [1, 9])], [40], 1, poison=False, spare=2)
    layout.max_group += 1  # grid sizes with slack, as an engine's captured graphs have
    layout.max_context += 2 * 16
    scale = q.shape[-1] ** -0.5
    before = kernel(q, k_cache, v_cache, layout, scale)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernel(q, k_cache, v_cache, layout, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(q, k_cache, v_cache, layout, scale)

    # A later step in the same buffers: every sequence one token longer, group 1's prefix one block shorter
    # (its members read that block as their own), and group 0's first member leaves it (reading the prefix
    # through its own table, which starts with the prefix blocks).
    ptr, rows = layout.group_ptr.tolist(), layout.group_rows.tolist()
    leaver = rows[0]
    layout.context_lens += (layout.context_lens > 0).int()
    layout.group_lens[1] = 16
    layout.shared_lens[rows[ptr[1]: ptr[2]]] = 16
    layout.shared_lens[leaver] = 0
    layout.group_ptr.copy_(torch.tensor([0, ptr[1] - 1, ptr[2] - 1], dtype=torch.int32))
    layout.group_rows.copy_(torch.tensor(rows[1:] + rows[:1], dtype=torch.int32))
    graph.replay()
    eager = kernel(q, k_cache, v_cache, layout, scale)
    assert torch.equal(out, eager)
    assert not torch.equal(out, before)
    expected = reference(q, k_cache, v_cache, layout, scale)
    assert (out.double() - expected).abs().max() / expected.abs().max() < 1e-2


# Plans the engine's `plan` may not pick for this tree: parts of a tile or two, more parts than a range has tiles
# (empty parts), a single part, and the merge launched after the partials (not as a programmatic dependent).
PLANS = {
    "fine_splits": dict(shared_splits=16, own_splits=16, min_shared_chunk=1, min_own_chunk=1),
    "one_part_each": dict(shared_splits=1, own_splits=1),
    "merge_after_partials": dict(shared_splits=5, own_splits=7, min_shared_chunk=64, min_own_chunk=16,
                                 programmatic_merge=False),
    "programmatic_merge": dict(programmatic_merge=True),
}


@pytest.mark.parametrize("warp_specialized", [False, True])
@pytest.mark.parametrize("change", PLANS)
@pytest.mark.parametrize("num_kv_heads", [8, 32])
def test_cuda_kernel_plans_compute_the_same_attention(change, num_kv_heads, warp_specialized):
    if not cuda_attention.available():
        pytest.skip("needs parrot_lc._cuda")
    if PLANS[change].get("programmatic_merge") and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launches need sm_90 or newer")
    groups, loose, padding = TREES["three_groups"]
    q, k_cache, v_cache, layout = cuda_batch(groups, loose, padding, num_kv_heads=num_kv_heads)
    if warp_specialized and (reason := cuda_attention.warp_specialized_unsupported(q, k_cache)):
        pytest.skip(reason)
    picked = cuda_attention.plan(q, k_cache, layout, warp_specialized=warp_specialized)
    launch = dataclasses.replace(picked, **PLANS[change])
    check(functools.partial(cuda_attention.cuda_decode_attention, launch=launch), q, k_cache, v_cache, layout)


@pytest.mark.parametrize("change, message", [
    (dict(dtype=torch.float32), "supports"),
    (dict(head_dim=96), "head dims"),
    (dict(num_heads=32, num_kv_heads=2), "1 to 8 times"),
])
def test_cuda_kernel_refuses_unsupported_shapes(change, message):
    if not cuda_attention.available():
        pytest.skip("needs parrot_lc._cuda")
    args = dict(dtype=torch.bfloat16, head_dim=128, num_heads=32, num_kv_heads=8) | change
    q, k_cache, v_cache, layout = cuda_batch([(16, [1, 2])], [3], **args)
    with pytest.raises(ValueError, match=message):
        cuda_attention.cuda_decode_attention(q, k_cache, v_cache, layout, 1.0)
