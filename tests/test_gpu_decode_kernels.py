"""The GPU decode kernels (CUDA in csrc/, Triton in triton_decode.py) against dense float64 attention, on random
trees of sequences, at real sizes and in bf16 as well as fp16.

Each case is a paged cache with scattered blocks and a DecodeLayout: groups of sequences reading a prefix
through the group's table, each sequence's own tokens through its block table, sequences in no group and
padding rows. Table entries the layout says are never read (a member's prefix entries, entries past a
sequence's end) point to a block of NaNs, so a kernel that reads one fails. Runs only on a GPU; the CUDA
kernel only where the extension is built.
"""

from __future__ import annotations

import math

import pytest
import torch

from parrot_lc.engine import cuda_attention
from parrot_lc.engine.attention import DecodeLayout
from parrot_lc.engine.triton_decode import decode_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="runs on a GPU")
KERNELS = {"cuda": cuda_attention.cuda_decode_attention, "triton": decode_attention}


@pytest.fixture(params=KERNELS)
def kernel(request):
    if request.param == "cuda" and not cuda_attention.available():
        pytest.skip("needs parrot_lc._cuda (built by setup.py where torch has CUDA and nvcc is found)")
    return KERNELS[request.param]

POISON = 0  # the cache block of NaNs


def ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def padded(rows) -> torch.Tensor:
    """(len(rows), width) block ids, each row padded with the NaN block."""
    width = max([1] + [len(row) for row in rows])
    return ints([row + [POISON] * (width - len(row)) for row in rows]).view(len(rows), width)


def make_batch(groups, loose, padding=0, *, page=16, num_heads=32, num_kv_heads=8, head_dim=128,
               dtype=torch.bfloat16, poison=True, spare=0, seed=0):
    """Returns q (B, Hq, D), k_cache, v_cache (num_blocks, page, Hkv, D) and the layout.

    groups: [(prefix tokens, [own tokens of each member])]; loose: own tokens of sequences in no group;
    padding: rows with no KV. Rows come shuffled. A member's block table starts with its group's prefix
    blocks (as the engine's do) unless `poison`, which points those entries at the NaN block instead; `spare`
    more blocks per sequence let a test grow its lengths."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [(g, prefix, own) for g, (prefix, owns) in enumerate(groups) for own in owns]
    seqs += [(None, 0, own) for own in loose] + [(None, 0, 0)] * padding
    seqs = [seqs[i] for i in torch.randperm(len(seqs), generator=gen).tolist()]
    assert all(prefix % page == 0 for prefix, _ in groups)

    num_blocks = 1 + sum(prefix // page for prefix, _ in groups) + sum(math.ceil(own / page) + spare for *_, own in seqs)
    free = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()

    def take(n):
        taken, free[:n] = free[:n], []
        return taken

    group_blocks = [take(prefix // page) for prefix, _ in groups]
    tables = []
    for g, _, own in seqs:
        prefix_entries = [] if g is None else [POISON] * len(group_blocks[g]) if poison else group_blocks[g]
        tables.append(prefix_entries + take(math.ceil(own / page) + spare))
    members = [[row for row, s in enumerate(seqs) if s[0] == g] for g in range(len(groups))]

    context_lens = [prefix + own for _, prefix, own in seqs]
    layout = DecodeLayout(
        block_tables=padded(tables),
        context_lens=ints(context_lens),
        shared_lens=ints([prefix for _, prefix, _ in seqs]),
        group_ptr=ints([0] + [sum(map(len, members[: g + 1])) for g in range(len(groups))]),
        group_rows=ints([row for m in members for row in m]),
        group_tables=padded(group_blocks),
        group_lens=ints([prefix for prefix, _ in groups]),
        max_group=max([0] + [len(m) for m in members]),
        max_context=max(context_lens),
    )

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype)

    k_cache = randn(num_blocks, page, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, page, num_kv_heads, head_dim)
    k_cache[POISON] = float("nan")
    v_cache[POISON] = float("nan")
    return randn(len(seqs), num_heads, head_dim), k_cache, v_cache, layout


def reference(q, k_cache, v_cache, layout, scale):
    """float64 attention of each row over its KV as DecodeLayout defines it; (B, Hq, D)."""
    page, num_kv_heads, head_dim = k_cache.shape[1:]
    keys, values = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    ptr, rows = layout.group_ptr.tolist(), layout.group_rows.tolist()
    group_of = {row: g for g in range(layout.num_groups) for row in rows[ptr[g]: ptr[g + 1]]}
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        ranges = [(layout.block_tables[b], int(layout.shared_lens[b]), int(layout.context_lens[b]))]
        if b in group_of:
            g = group_of[b]
            ranges.insert(0, (layout.group_tables[g], 0, int(layout.group_lens[g])))
        slots = torch.cat([table[pos // page].long() * page + pos % page
                           for table, lo, hi in ranges for pos in [torch.arange(lo, hi, device=q.device)]])
        if slots.numel() == 0:
            continue
        k, v = keys[slots].double(), values[slots].double()  # (L, Hkv, D)
        q_b = q[b].double().view(num_kv_heads, -1, head_dim)  # (Hkv, G, D)
        probs = (torch.einsum("hgd,lhd->hgl", q_b, k) * scale).softmax(-1)
        out[b] = torch.einsum("hgl,lhd->hgd", probs, v).reshape(-1, head_dim)
    return out


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
    check(kernel, *make_batch(groups, loose, padding, page=page))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
# GQA ratios 1, 4, 8 and 2, the last with KV heads not a multiple of an own item's 4
@pytest.mark.parametrize("num_heads, num_kv_heads", [(32, 32), (32, 8), (32, 4), (12, 6)])
def test_gqa_ratios_head_dims_and_dtypes(kernel, num_heads, num_kv_heads, head_dim, dtype):
    groups, loose, padding = TREES["three_groups"]
    check(kernel, *make_batch(groups, loose, padding, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      dtype=dtype))


@pytest.mark.parametrize("num_kv_heads", [32, 8])
def test_long_prefix_and_256_sequences(kernel, num_kv_heads):
    gen = torch.Generator().manual_seed(1)
    owns = torch.randint(1, 300, (256,), generator=gen).tolist()
    check(kernel, *make_batch([(4096, owns), (1024, [50] * 10)], [3000, 5], 1, num_kv_heads=num_kv_heads))


def test_long_prefix_few_members_splits_the_prefix(kernel):
    check(kernel, *make_batch([(4096, [3, 10])], [], 0))


def test_cuda_graph_replay_with_changed_lengths_matches_eager(kernel):
    q, k_cache, v_cache, layout = make_batch([(64, [20, 5, 33]), (32, [1, 9])], [40], 1, poison=False, spare=2)
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


@pytest.mark.parametrize("change, message", [
    (dict(dtype=torch.float32), "supports"),
    (dict(head_dim=96), "head dims"),
    (dict(num_heads=32, num_kv_heads=2), "1 to 8 times"),
])
def test_cuda_kernel_refuses_unsupported_shapes(change, message):
    if not cuda_attention.available():
        pytest.skip("needs parrot_lc._cuda")
    args = dict(dtype=torch.bfloat16, head_dim=128, num_heads=32, num_kv_heads=8) | change
    q, k_cache, v_cache, layout = make_batch([(16, [1, 2])], [3], **args)
    with pytest.raises(ValueError, match=message):
        cuda_attention.cuda_decode_attention(q, k_cache, v_cache, layout, 1.0)
