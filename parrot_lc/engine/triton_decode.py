"""Fused decode attention over a context tree in Triton: one launch for every shared prefix and own part, one
small launch to merge.

A decode step has one query row per sequence. The first kernel's programs are work items of two kinds:
- shared: (group, KV head, tile of the group's sequences, split of the prefix). Each KV tile of the prefix is
  loaded once and met by all the tile's query rows (sequences x query heads of the KV head) as one matrix, on
  tensor cores; the prefix is split across programs so that even one group fills the GPU.
- own: (sequence, KV head, split of its own KV), the sequence's query heads against its blocks after the
  prefix.
Each item writes a partial result (out, lse) per row; the second kernel merges a row's partials by log-sum-exp.
Split counts only size the grid: each item computes its range from the step's lengths, so one CUDA graph
serves every step of its shape.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from parrot_lc.engine.attention import DecodeLayout, multiprocessors

MIN_CHUNK = 256  # tokens: a split shorter than this costs more in partials and launch tail than it gains
# The fastest of a sweep on the H200 over benchmarks/kernel_shared_prefix.py's cases: tiles of 128 rows (8 warps)
# made own items slow, 4 items per SM or one stage made every case slower, and capping registers (2 blocks an
# SM at 254 registers a thread) cost more in spills than it gained in occupancy.
MAX_SHARED_ROWS = 64  # query rows of a shared item's tile (sequences x query heads of one KV head)
TARGET_ITEMS_PER_SM = 2
NUM_STAGES = 2
SHARED_N, OWN_N = 64, 128  # KV tokens a loop step reads, in shared and own items


@triton.jit
def _attend_range(
    q, lo, hi, table, K, V, head_offset, stride_kb, stride_kt, qk_scale,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax of q (ROWS, D) over KV positions [lo, hi) of one block table; returns (acc, m, l) with
    m in log2 units."""
    d = tl.arange(0, D)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        block = tl.load(table + k_pos // PAGE, mask=k_ok, other=0)
        offset = block.to(tl.int64) * stride_kb + (k_pos % PAGE) * stride_kt + head_offset  # (BLOCK_N,)
        k = tl.load(K + offset[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(V + offset[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (ROWS, BLOCK_N)
        scores = tl.where(k_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: the range is never empty here
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _split_range(length, split, splits, BLOCK_N: tl.constexpr, MIN_TOKENS: tl.constexpr):
    """This split's part [lo, hi) of a range [0, length): `splits` parts of at least MIN_TOKENS, whole tiles."""
    per_split = tl.maximum(tl.cdiv(length, splits), MIN_TOKENS)
    per_split = tl.cdiv(per_split, BLOCK_N) * BLOCK_N
    lo = split * per_split
    return lo, tl.minimum(length, lo + per_split)


@triton.jit
def _store_partial(OutP, LseP, seq, head, part, acc, m_i, l_i, row_ok, stride_ob, stride_oh, stride_op,
                   stride_lb, stride_lh, D: tl.constexpr):
    d = tl.arange(0, D)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) / 1.4426950408889634)
    row = seq.to(tl.int64) * stride_ob + head * stride_oh + part * stride_op  # (ROWS,)
    tl.store(OutP + row[:, None] + d[None, :], out, mask=row_ok[:, None])
    tl.store(LseP + seq.to(tl.int64) * stride_lb + head * stride_lh + part, lse, mask=row_ok)


# Counts, table widths and the partials' strides change from step to step: no specialization on them (a value of
# 1, divisibility by 16), which would compile a variant (about a second) in whichever step first meets it.
@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "stride_bt", "stride_gt", "num_shared_items", "tiles",
                               "shared_splits", "own_splits", "own_part0"])
def _decode_partials_kernel(
    Q, K, V, OutP, LseP,  # Q (B, Hq, D); K/V (num_blocks, PAGE, Hkv, D); OutP (B, Hq, PARTS, D) f32; LseP (B, Hq, PARTS)
    block_tables, context_lens, shared_lens, group_ptr, group_rows, group_tables, group_lens,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_ob, stride_oh, stride_op, stride_lb, stride_lh,
    stride_bt, stride_gt,
    scale, num_shared_items, tiles, shared_splits, own_splits, own_part0,
    G: tl.constexpr, HKV: tl.constexpr,
    SHARED_ROWS: tl.constexpr, OWN_ROWS: tl.constexpr, SHARED_N: tl.constexpr, OWN_N: tl.constexpr,
    PAGE: tl.constexpr, D: tl.constexpr,
    SHARED_P2: tl.constexpr, MIN_TOKENS: tl.constexpr, PRECISION: tl.constexpr,
):
    # Partials of a row: [0, own_part0) from its group's prefix splits (own_part0 is 0 in a step without
    # groups), then own_splits from its own KV. Counts are runtime values, so that steps of other lengths and
    # batch sizes reuse the compiled kernel; only tile shapes are compile-time.
    pid = tl.program_id(0)
    qk_scale = scale * 1.4426950408889634  # exp via exp2
    d = tl.arange(0, D)
    if pid < num_shared_items:
        # Tiles vary fastest: the items reading the same prefix tiles run side by side and share them in L2.
        tile = pid % tiles
        split = (pid // tiles) % shared_splits
        h_kv = (pid // (tiles * shared_splits)) % HKV
        g = pid // (tiles * shared_splits * HKV)
        first = tl.load(group_ptr + g)
        members = tl.load(group_ptr + g + 1) - first
        if tile * (SHARED_ROWS // G) < members:
            r = tl.arange(0, SHARED_ROWS)
            member = tile * (SHARED_ROWS // G) + r // G
            row_ok = (member < members) & (r < (SHARED_ROWS // G) * G)
            seq = tl.load(group_rows + first + member, mask=row_ok, other=0)  # (ROWS,)
            head = h_kv * G + r % G
            lo, hi = _split_range(tl.load(group_lens + g), split, shared_splits, SHARED_N, MIN_TOKENS)
            q = tl.load(Q + seq[:, None].to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)  # (ROWS, D)
            acc, m_i, l_i = _attend_range(q, lo, hi, group_tables + g * stride_gt, K, V, h_kv * stride_kh,
                                          stride_kb, stride_kt, qk_scale, SHARED_ROWS, SHARED_N, PAGE, D, PRECISION)
            _store_partial(OutP, LseP, seq, head, split, acc, m_i, l_i, row_ok, stride_ob, stride_oh, stride_op,
                           stride_lb, stride_lh, D)
    else:
        item = pid - num_shared_items
        split = item % own_splits
        h_kv = (item // own_splits) % HKV
        seq = item // (own_splits * HKV)
        r = tl.arange(0, OWN_ROWS)
        row_ok = r < G
        head = h_kv * G + r
        q = tl.load(Q + seq.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)  # (ROWS, D)
        start = tl.load(shared_lens + seq)
        lo, hi = _split_range(tl.load(context_lens + seq) - start, split, own_splits, OWN_N, MIN_TOKENS)
        acc, m_i, l_i = _attend_range(q, start + lo, start + hi, block_tables + seq * stride_bt, K, V,
                                      h_kv * stride_kh, stride_kb, stride_kt, qk_scale, OWN_ROWS, OWN_N, PAGE, D,
                                      PRECISION)
        seqs = tl.full((OWN_ROWS,), 0, tl.int32) + seq
        _store_partial(OutP, LseP, seqs, head, own_part0 + split, acc, m_i, l_i, row_ok, stride_ob, stride_oh,
                       stride_op, stride_lb, stride_lh, D)
        if (own_part0 > 0) & (split == 0) & (start == 0):
            # In no group: no shared item writes this sequence's shared partials, so mark them empty here.
            p = tl.arange(0, SHARED_P2)
            lse_row = LseP + seq.to(tl.int64) * stride_lb + head[:, None] * stride_lh + p[None, :]
            tl.store(lse_row, tl.full((OWN_ROWS, SHARED_P2), float("-inf"), tl.float32),
                     mask=row_ok[:, None] & (p[None, :] < own_part0))


@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "parts"])
def _merge_partials_kernel(
    OutP, LseP, Out,  # OutP (B, Hq, PARTS, D) f32; LseP (B, Hq, PARTS); Out (B, Hq, D)
    stride_ob, stride_oh, stride_op, stride_lb, stride_lh, stride_b, stride_h, parts,
    PARTS_P2: tl.constexpr, D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    p = tl.arange(0, PARTS_P2)
    d = tl.arange(0, D)
    lse = tl.load(LseP + seq * stride_lb + head * stride_lh + p, mask=p < parts, other=float("-inf"))  # (PARTS_P2,)
    seen = lse > float("-inf")
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.where(seen, tl.exp2((lse - top) * 1.4426950408889634), 0.0)
    total = tl.sum(weight, 0)
    # Only partials that saw a key are read: the others may hold anything.
    parts = tl.load(OutP + seq * stride_ob + head * stride_oh + p[:, None] * stride_op + d[None, :],
                    mask=seen[:, None], other=0.0)  # (PARTS_P2, D)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + seq * stride_b + head * stride_h + d, out.to(Out.dtype.element_ty))


def shared_rows(max_group: int, group_size: int) -> int:
    """Query rows in a shared item's tile: the largest group's sequences x query heads, at least 16 (the
    tensor-core minimum) and at most MAX_SHARED_ROWS (or one sequence's heads, if more). Every tile of a group
    reads the prefix, so the fewer tiles the better, up to what the accumulators' registers allow."""
    most = max(MAX_SHARED_ROWS, triton.next_power_of_2(group_size))
    return min(most, max(16, triton.next_power_of_2(max(max_group, 1) * group_size)))


def shared_tiles(max_group: int, group_size: int) -> int:
    """Tiles of `shared_rows` query rows that the largest group needs."""
    return -(-max(max_group, 1) // (shared_rows(max_group, group_size) // group_size))


def decode_splits(
    device: torch.device, batch: int, num_kv_heads: int, group_size: int, layout: DecodeLayout
) -> tuple[int, int]:
    """(shared splits, own splits) that give about TARGET_ITEMS_PER_SM work items for every SM, none shorter
    than MIN_CHUNK tokens. A shared split is also at least 8x its tile's rows long, so that writing and merging
    its partials costs at most a quarter of reading its KV. Sized for ranges of `layout.max_context` tokens;
    shorter ones leave some splits empty."""
    if device.type != "cuda":
        return (4 if layout.num_groups else 0), 2  # the CPU interpreter: several splits, to test the merge
    target = TARGET_ITEMS_PER_SM * multiprocessors(device) / num_kv_heads  # items per KV head
    longest = max(layout.max_context, 1)
    own_splits = max(1, min(-(-int(target) // max(batch, 1)), -(-longest // MIN_CHUNK)))
    if not layout.num_groups:
        return 0, own_splits
    rows = min(shared_rows(layout.max_group, group_size), layout.max_group * group_size)
    # A shared item's share of the prefixes' tokens when they are spread over the target number of items.
    spread = layout.num_groups * shared_tiles(layout.max_group, group_size) * longest / target
    shared_splits = max(1, min(64, round(longest / max(MIN_CHUNK, 8 * rows, spread))))
    return shared_splits, own_splits


def decode_attention(
    q: torch.Tensor,  # (B, Hq, D)
    k_cache: torch.Tensor,  # (num_blocks, PAGE, Hkv, D)
    v_cache: torch.Tensor,
    layout: DecodeLayout,
    scale: float,
) -> torch.Tensor:  # (B, Hq, D)
    """Attention of one decode row per sequence over its shared prefix (read once per group) and its own KV."""
    batch, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    shared_splits, own_splits = decode_splits(q.device, batch, num_kv_heads, group_size, layout)
    parts = shared_splits + own_splits
    out_p = torch.empty(batch, num_heads, parts, head_dim, dtype=torch.float32, device=q.device)
    lse_p = torch.empty(batch, num_heads, parts, dtype=torch.float32, device=q.device)
    tiles = shared_tiles(layout.max_group, group_size)
    rows = shared_rows(layout.max_group, group_size)
    num_shared_items = layout.num_groups * num_kv_heads * tiles * shared_splits
    own_items = batch * num_kv_heads * own_splits
    shared_n, own_n = (SHARED_N, OWN_N) if q.device.type == "cuda" else (16, 16)  # the interpreter: quick tests
    # Without groups the group tensors may be empty, which a launch cannot pass as pointers: any other int32
    # tensor stands in, never read.
    group_tables, group_lens = ((layout.group_tables, layout.group_lens) if layout.num_groups
                                else (layout.block_tables, layout.context_lens))
    _decode_partials_kernel[(num_shared_items + own_items,)](
        q, k_cache, v_cache, out_p, lse_p,
        layout.block_tables, layout.context_lens, layout.shared_lens, layout.group_ptr, layout.group_rows,
        group_tables, group_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out_p.stride(0), out_p.stride(1), out_p.stride(2), lse_p.stride(0), lse_p.stride(1),
        layout.block_tables.stride(0), group_tables.stride(0),
        scale, num_shared_items, tiles, max(shared_splits, 1), own_splits, shared_splits,
        G=group_size, HKV=num_kv_heads,
        SHARED_ROWS=rows, OWN_ROWS=max(16, triton.next_power_of_2(group_size)), SHARED_N=shared_n, OWN_N=own_n, PAGE=page,
        D=head_dim, SHARED_P2=triton.next_power_of_2(max(shared_splits, 1)),
        MIN_TOKENS=MIN_CHUNK if q.device.type == "cuda" else 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
        num_stages=NUM_STAGES,
    )
    out = torch.empty_like(q)
    _merge_partials_kernel[(batch, num_heads)](
        out_p, lse_p, out,
        out_p.stride(0), out_p.stride(1), out_p.stride(2), lse_p.stride(0), lse_p.stride(1), out.stride(0),
        out.stride(1), parts, PARTS_P2=triton.next_power_of_2(parts), D=head_dim, num_warps=4,
    )
    return out
