"""Decode cases for the fused decode kernels (Triton, and CUDA in csrc/) and their float64 reference, shared by
the CPU tests (Triton's interpreter) and the GPU tests.

A case is a paged cache with scattered blocks and a DecodeLayout: groups of sequences reading a prefix through
the group's table, each sequence's own tokens through its block table (which may start with blocks it shares
with a sibling: a fork of a fork), sequences in no group and padding rows. Table entries the layout says are
never read (a member's prefix entries, entries past a sequence's end) point to a block of NaNs, so a kernel
that reads one fails.
"""

from __future__ import annotations

import math

import torch

from parrot_lc.engine.attention import DecodeLayout

POISON = 0  # the cache block of NaNs


def make_batch(groups, loose, padding=0, *, device, page=16, num_heads=32, num_kv_heads=8, head_dim=128,
               dtype=torch.bfloat16, poison=True, spare=0, nested=False, seed=0):
    """Returns q (B, Hq, D), k_cache, v_cache (num_blocks, page, Hkv, D) and the layout.

    groups: [(prefix tokens, [own tokens of each member])]; loose: own tokens of sequences in no group;
    padding: rows with no KV. Rows come shuffled. A member's block table starts with its group's prefix
    blocks (as the engine's do) unless `poison`, which points those entries at the NaN block instead; `spare`
    more blocks per sequence let a test grow its lengths; `nested`: the first two members of group 0 also share
    their first two own blocks (a second level of sharing, read through their own tables)."""
    gen = torch.Generator().manual_seed(seed)
    inner = 2 * page if nested else 0  # tokens of the second level
    seqs = [(g, prefix, own, g == 0 and i < 2 and nested) for g, (prefix, owns) in enumerate(groups)
            for i, own in enumerate(owns)]
    seqs = [(g, prefix, max(own, inner) if second else own, second) for g, prefix, own, second in seqs]
    seqs += [(None, 0, own, False) for own in loose] + [(None, 0, 0, False)] * padding
    seqs = [seqs[i] for i in torch.randperm(len(seqs), generator=gen).tolist()]
    assert all(prefix % page == 0 for prefix, _ in groups)

    num_blocks = (1 + sum(prefix // page for prefix, _ in groups) + inner // page
                  + sum(math.ceil(own / page) + spare for _, _, own, _ in seqs))
    free = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()

    def take(n):
        taken, free[:n] = free[:n], []
        return taken

    group_blocks = [take(prefix // page) for prefix, _ in groups]
    second_level = take(inner // page)
    tables = []
    for g, _, own, second in seqs:
        prefix_entries = [] if g is None else [POISON] * len(group_blocks[g]) if poison else group_blocks[g]
        shared_own = second_level if second else []
        tables.append(prefix_entries + shared_own + take(math.ceil(own / page) - len(shared_own) + spare))
    members = [[row for row, s in enumerate(seqs) if s[0] == g] for g in range(len(groups))]

    def ints(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    def padded(rows) -> torch.Tensor:
        """(len(rows), width) block ids, each row padded with the NaN block."""
        width = max([1] + [len(row) for row in rows])
        return ints([row + [POISON] * (width - len(row)) for row in rows]).view(len(rows), width)

    context_lens = [prefix + own for _, prefix, own, _ in seqs]
    layout = DecodeLayout(
        block_tables=padded(tables),
        context_lens=ints(context_lens),
        shared_lens=ints([prefix for _, prefix, _, _ in seqs]),
        group_ptr=ints([0] + [sum(map(len, members[: g + 1])) for g in range(len(groups))]),
        group_rows=ints([row for m in members for row in m]),
        group_tables=padded(group_blocks),
        group_lens=ints([prefix for prefix, _ in groups]),
        max_group=max([0] + [len(m) for m in members]),
        max_context=max(context_lens),
    )

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    k_cache = randn(num_blocks, page, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, page, num_kv_heads, head_dim)
    k_cache[POISON] = float("nan")
    v_cache[POISON] = float("nan")
    return randn(len(seqs), num_heads, head_dim), k_cache, v_cache, layout


def reference(q, k_cache, v_cache, layout, scale):
    """float64 attention of each row over its KV as DecodeLayout defines it; (B, Hq, D), 0 for padding rows."""
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
