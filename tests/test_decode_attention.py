"""The fused decode kernel (one query row per sequence over a context tree) against float64 dense attention.

A case is a tree: groups of sequences that read a shared prefix once, sequences in no group, each with KV of
its own after the prefix (which may itself hold a deeper shared level, reached through its block table), and
padding rows with no KV. On the CPU the kernel runs in Triton's interpreter (float32, fp16); bf16 and real
sizes are in test_gpu_decode_kernels.py.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from parrot_lc.engine.attention import DecodeLayout
from parrot_lc.engine.triton_decode import decode_attention
from test_attention_backend import DEVICE, dense_reference


@dataclass
class Tree:
    """groups[i] = (prefix tokens, own KV lengths of its sequences); loners: own lengths of sequences in no
    group; padding: rows with no KV at all."""

    groups: list[tuple[int, list[int]]]
    loners: list[int]
    padding: int = 0


def run_tree(tree: Tree, num_heads: int, num_kv_heads: int, head_dim: int, page: int, dtype: torch.dtype,
             seed: int = 0, nested: bool = False):
    """Builds a random paged cache for `tree`, runs the kernel, and yields (out row, float64 expected row).
    `nested`: the first two sequences of group 0 also share a second level (their first own blocks)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []  # (group or None, blocks, context length, shared length)
    next_block = [0]

    def take(n):
        ids = list(range(next_block[0], next_block[0] + n))
        next_block[0] += n
        return ids

    for g, (prefix, owns) in enumerate(tree.groups):
        assert prefix % page == 0
        prefix_blocks = take(prefix // page)
        second = take(2) if nested and g == 0 else []
        for i, own in enumerate(owns):
            inner = second if i < 2 and second else []
            blocks = prefix_blocks + inner + take(math.ceil(max(own - len(inner) * page, 0) / page))
            seqs.append((g, blocks, prefix + max(own, len(inner) * page), prefix))
    for own in tree.loners:
        seqs.append((None, take(math.ceil(own / page)), own, 0))
    seqs += [(None, [], 0, 0)] * tree.padding
    num_blocks = next_block[0] + 1
    order = torch.randperm(num_blocks, generator=gen)  # scattered blocks, as after some churn

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    k_cache = randn(num_blocks, page, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, page, num_kv_heads, head_dim)
    batch = len(seqs)
    q = randn(batch, num_heads, head_dim)
    width = max(max(len(s[1]) for s in seqs), 1)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    for b, (_, blocks, _, _) in enumerate(seqs):
        tables[b, : len(blocks)] = order[blocks]
    members = [[b for b, s in enumerate(seqs) if s[0] == g] for g in range(len(tree.groups))]
    group_tables = torch.zeros(len(members), max([p // page for p, _ in tree.groups] + [1]), dtype=torch.int32)
    for g, rows in enumerate(members):
        group_tables[g, : tree.groups[g][0] // page] = tables[rows[0], : tree.groups[g][0] // page]
    i32 = dict(dtype=torch.int32, device=DEVICE)
    layout = DecodeLayout(
        block_tables=tables.to(DEVICE),
        context_lens=torch.tensor([s[2] for s in seqs], **i32),
        shared_lens=torch.tensor([s[3] for s in seqs], **i32),
        group_ptr=torch.tensor([0] + [len(m) for m in members], **i32).cumsum(0).to(torch.int32),
        group_rows=torch.tensor(sum(members, []) or [0], **i32),
        group_tables=group_tables.to(DEVICE),
        group_lens=torch.tensor([p for p, _ in tree.groups], **i32),
        max_group=max(map(len, members), default=0),
        max_context=max(s[2] for s in seqs),
    )
    out = decode_attention(q, k_cache, v_cache, layout, head_dim**-0.5)
    for b, (_, _, context, _) in enumerate(seqs):
        if context == 0:
            yield out[b], torch.zeros_like(out[b], dtype=torch.float64)
            continue
        positions = torch.arange(context)
        flat = (tables[b, positions // page].long() * page + positions % page).to(DEVICE)
        keys = k_cache.view(-1, num_kv_heads, head_dim)[flat]
        values = v_cache.view(-1, num_kv_heads, head_dim)[flat]
        yield out[b], dense_reference(q[b : b + 1], keys, values, torch.tensor([context - 1], device=DEVICE))[0]


TREES = {
    "one group": Tree([(16, [1, 5, 9])], []),
    "three groups and loners": Tree([(8, [3, 1]), (24, [7, 2, 11, 4]), (4, [5])], [6, 1, 13]),
    "loners only": Tree([], [1, 9, 30]),
    "padding rows": Tree([(12, [2, 3])], [4], padding=2),
}


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (6, 2)])
def test_decode_over_a_context_tree_equals_dense_attention(tree, num_heads, num_kv_heads):
    for out, expected in run_tree(TREES[tree], num_heads, num_kv_heads, 16, 4, torch.float32):
        assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("page", [1, 8, 16])
def test_decode_block_sizes_and_partial_blocks(page):
    tree = Tree([(2 * page, [1, page + 3, 2 * page])], [page - 1 or 1, 3 * page + 1])
    for out, expected in run_tree(tree, 8, 2, 16, page, torch.float32):
        assert torch.allclose(out.double(), expected, atol=1e-5)


def test_decode_with_more_query_heads_per_kv_head_than_a_tile_has_rows():
    for out, expected in run_tree(Tree([(8, [3, 5])], [4]), 72, 1, 16, 4, torch.float32):
        assert torch.allclose(out.double(), expected, atol=1e-5)


def test_decode_of_a_fork_of_a_fork_equals_dense_attention():
    tree = Tree([(8, [12, 9, 3, 10])], [5])
    for out, expected in run_tree(tree, 4, 2, 16, 4, torch.float32, nested=True):
        assert torch.allclose(out.double(), expected, atol=1e-5)


def test_decode_in_fp16_is_within_half_precision_bounds():
    for out, expected in run_tree(TREES["three groups and loners"], 8, 2, 32, 4, torch.float16):
        assert not out.isnan().any()
        assert (out.double() - expected).abs().max() < 1e-2
