"""Fused decode attention over a context tree in Triton: one launch for every shared prefix and own part, and
each query row's partial results merged inside it or by a second launch (the config's choice).

A decode step has one query row per sequence. The kernel's programs are work items of two kinds:
- shared: (group, KV head, tile of the group's query rows, split of the prefix). With grouped-query attention a
  KV head serves G query heads, so a group of N sequences has G x N query rows per KV head: a tile holds up to
  64 or 128 of them (the config's rows), and each prefix tile is loaded once per row tile and met by all its
  rows as one matrix, on tensor cores. The tiles of one (KV head, split) are neighbours in the grid, so that
  they run side by side and read the prefix from DRAM once and from L2 for the others. The prefix is split
  across programs so that the grid fills the GPU (split-K).
- own: (sequence, KV head, split of its own KV), the sequence's G query heads against its blocks after the
  prefix.
Each item writes a partial result (out, lse) per row. With the in-launch merge, it then counts itself in a
per-row counter, and the item that brings a row's count to its total (its group's prefix splits and its own
splits) merges that row's partials by log-sum-exp and sets the counter back to 0 for the next launch (split-K
with a semaphore, as CUTLASS's); otherwise a second kernel merges. Split counts only size the grid: each item
computes its range from the step's lengths, so one CUDA graph serves every step of its shape.

Measured (issue 24, H100, benchmarks/kernel_shared_prefix.py, RESULTS.md): neither the single launch nor
128-row tiles paid as planned. With 8 KV heads and 16 forks every kernel (these configs, the CUDA one,
FlashInfer's) takes 28 us or more against floors of 7 to 28 us, with one launch or two, so the second launch is
not where the time goes; not profiled, the likely rest is each program's chain of dependent reads (block
table, then K and V through a two-stage pipeline) and the waves of programs. The in-launch merge was slower in
12 of 18 cases (N=256, P=16,384: 382 against 352 us with two launches), likely where a row's last arrival is a
shared item, which merges its 64 rows part after part. Where a group has more than 64 query rows a KV head (9 cases), tiles of 128 rows on
8 warps were slower than 64-row ones in 8 (N=256, P=16,384: 396 or 470 against 352 us). That case is 69 GFLOP
of attention arithmetic (4 x 256 rows x 16,384 keys x 128 x 4 x 8 heads): 352 us is about 195 TFLOP/s, a
quarter of the tensor cores' measured rate, while its bytes move at a third of copy bandwidth: this loop's
arithmetic rate bounds it, not the 0.11 ms memory floor;
a hand-written Hopper kernel (wgmma on 128-row tiles from shared memory, warp-specialised loads) is what would
close it. The configs stay measurable side by side (CONFIGS); pick_config takes the fastest by the table, and
on GPUs with the CUDA extension the engine runs steps with groups in the CUDA kernel (cuda_attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from parrot_lc.engine.attention import DecodeLayout, multiprocessors

# Tokens: a split shorter than this costs more in partials and in its pipeline's start than its parallelism gains.
MIN_SHARED_CHUNK, MIN_OWN_CHUNK = 256, 128
# A shared split is also at least this many tokens per query row of its tile: each row writes 512 bytes of
# partials and the merge reads them back, against 512 bytes of K and V a prefix token.
SPLIT_TOKENS_PER_ROW = 4


@dataclass(frozen=True)
class DecodeConfig:
    """How the kernel runs a step: query rows per shared item (at most), warps per program, KV tokens a loop step
    of a shared (own) item reads, pipeline stages, and whether rows are merged inside the launch (else by a
    second launch)."""

    max_shared_rows: int
    num_warps: int
    shared_n: int = 64
    own_n: int = 64
    merge_inside: bool = True
    num_stages: int = 2

    @property
    def items_per_sm(self) -> int:
        """Programs resident on one multiprocessor that the splits aim for (registers allow 2 of 4 warps)."""
        return 2 if self.num_warps == 4 else 1


# The configs benchmarks/kernel_shared_prefix.py measures; pick_config chooses among them by its table.
CONFIGS = {
    "rows64": DecodeConfig(64, 4),
    "rows64_two_launches": DecodeConfig(64, 4, merge_inside=False),
    "rows64_own128_two_launches": DecodeConfig(64, 4, own_n=128, merge_inside=False),  # the tiles before issue 24
    "rows128": DecodeConfig(128, 8),
    "rows128_n128_two_launches": DecodeConfig(128, 8, shared_n=128, merge_inside=False),
    "rows128_n128": DecodeConfig(128, 8, shared_n=128),
}


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
def _split_range(length, split, splits, BLOCK_N: tl.constexpr, min_tokens):
    """This split's part [lo, hi) of a range [0, length): `splits` parts of at least min_tokens, whole tiles."""
    per_split = tl.maximum(tl.cdiv(length, splits), min_tokens)
    per_split = tl.cdiv(per_split, BLOCK_N) * BLOCK_N
    lo = split * per_split
    return lo, tl.minimum(length, lo + per_split)


@triton.jit
def _merge_rows(OutP, LseP, Out, seq, head, rows, first, parts, stride_ob, stride_oh, stride_op, stride_lb,
                stride_lh, stride_b, stride_h, ROWS: tl.constexpr, D: tl.constexpr):
    """Out of each of `rows` (ROWS,) bool: its partials [first, parts) merged by log-sum-exp (base 2). Only
    partials that saw a key are read (the others may hold anything); a row that saw none comes out 0. Loads
    bypass L1 (.cg): other programs of this launch wrote the partials."""
    d = tl.arange(0, D)
    out_row = seq.to(tl.int64) * stride_ob + head * stride_oh  # (ROWS,)
    lse_row = seq.to(tl.int64) * stride_lb + head * stride_lh
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    total = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    for part in range(first, parts):
        lse = tl.load(LseP + lse_row + part, mask=rows, other=float("-inf"), cache_modifier=".cg")  # (ROWS,)
        seen = lse > float("-inf")
        x = tl.load(OutP + out_row[:, None] + part * stride_op + d[None, :], mask=seen[:, None], other=0.0,
                    cache_modifier=".cg")  # (ROWS, D)
        m_new = tl.maximum(m, lse)
        top = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - top)  # 0 while nothing was seen
        weight = tl.exp2(lse - top)  # 0 for a partial that saw no key
        acc = acc * alpha[:, None] + x * weight[:, None]
        total = total * alpha + weight
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    dst = seq.to(tl.int64)[:, None] * stride_b + head[:, None] * stride_h + d[None, :]
    tl.store(Out + dst, out.to(Out.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _finish_item(OutP, LseP, Out, Counters, seq, head, row_ok, acc, m_i, l_i, part, first, expected, parts,
                 stride_ob, stride_oh, stride_op, stride_lb, stride_lh, stride_b, stride_h, num_heads,
                 ROWS: tl.constexpr, D: tl.constexpr, MERGE_INSIDE: tl.constexpr):
    """Writes the item's partial of each row; with MERGE_INSIDE, counts it, and merges the rows it completes."""
    d = tl.arange(0, D)
    empty = l_i == 0.0  # an empty split: lse -inf, which the merge skips
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out_row = seq.to(tl.int64) * stride_ob + head * stride_oh  # (ROWS,)
    tl.store(OutP + out_row[:, None] + part * stride_op + d[None, :], out, mask=row_ok[:, None])
    tl.store(LseP + seq.to(tl.int64) * stride_lb + head * stride_lh + part, lse, mask=row_ok)
    if MERGE_INSIDE:
        # Every thread's partials are written before the release: the barrier orders the program's stores, the
        # atomic (acq_rel, GPU scope) publishes them and, for the last arrival, acquires the others'.
        tl.debug_barrier()
        counter = Counters + seq.to(tl.int64) * num_heads + head  # (ROWS,)
        arrived = tl.atomic_add(counter, 1, mask=row_ok, sem="acq_rel", scope="gpu")
        last = row_ok & (arrived == expected - 1)
        if tl.max(last.to(tl.int32), 0) > 0:
            tl.debug_barrier()
            _merge_rows(OutP, LseP, Out, seq, head, last, first, parts, stride_ob, stride_oh, stride_op,
                        stride_lb, stride_lh, stride_b, stride_h, ROWS, D)
            tl.store(counter, 0, mask=last)  # ready for the next launch (a CUDA graph's next replay)


# Counts, table widths and the partials' strides change from step to step: no specialization on them (a value of
# 1, divisibility by 16), which would compile a variant (about a second) in whichever step first meets it.
@triton.jit(do_not_specialize=["stride_ob", "stride_oh", "stride_lb", "stride_lh", "stride_bt", "stride_gt",
                               "num_shared_items", "tiles", "shared_splits", "own_splits", "min_shared",
                               "num_heads"])
def _decode_kernel(
    Q, K, V, OutP, LseP, Out, Counters,  # Q, Out (B, Hq, D); K/V (num_blocks, PAGE, Hkv, D); OutP (B, Hq, PARTS, D)
    block_tables, context_lens, shared_lens, group_ptr, group_rows, group_tables, group_lens,  # f32, LseP (B, Hq, PARTS)
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_ob, stride_oh, stride_op, stride_lb, stride_lh,
    stride_b, stride_h, stride_bt, stride_gt,
    scale, num_shared_items, tiles, shared_splits, own_splits, min_shared, num_heads,
    G: tl.constexpr, HKV: tl.constexpr,
    SHARED_ROWS: tl.constexpr, OWN_ROWS: tl.constexpr, SHARED_N: tl.constexpr, OWN_N: tl.constexpr,
    PAGE: tl.constexpr, D: tl.constexpr, MIN_OWN: tl.constexpr, PRECISION: tl.constexpr,
    MERGE_INSIDE: tl.constexpr,
):
    # Partials of a row: [0, shared_splits) from its group's prefix splits (none for a sequence in no group,
    # shared_lens 0), then own_splits from its own KV. Counts are runtime values, so that steps of other lengths
    # and batch sizes reuse the compiled kernel; only tile shapes are compile-time.
    pid = tl.program_id(0)
    qk_scale = scale * 1.4426950408889634  # exp via exp2
    d = tl.arange(0, D)
    parts = shared_splits + own_splits
    if pid < num_shared_items:  # then shared_splits >= 1
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
            lo, hi = _split_range(tl.load(group_lens + g), split, shared_splits, SHARED_N, min_shared)
            q = tl.load(Q + seq[:, None].to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)  # (ROWS, D)
            acc, m_i, l_i = _attend_range(q, lo, hi, group_tables + g * stride_gt, K, V, h_kv * stride_kh,
                                          stride_kb, stride_kt, qk_scale, SHARED_ROWS, SHARED_N, PAGE, D, PRECISION)
            _finish_item(OutP, LseP, Out, Counters, seq, head, row_ok, acc, m_i, l_i, split, 0, parts, parts,
                         stride_ob, stride_oh, stride_op, stride_lb, stride_lh, stride_b, stride_h, num_heads,
                         SHARED_ROWS, D, MERGE_INSIDE)
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
        lo, hi = _split_range(tl.load(context_lens + seq) - start, split, own_splits, OWN_N, MIN_OWN)
        acc, m_i, l_i = _attend_range(q, start + lo, start + hi, block_tables + seq * stride_bt, K, V,
                                      h_kv * stride_kh, stride_kb, stride_kt, qk_scale, OWN_ROWS, OWN_N, PAGE, D,
                                      PRECISION)
        seqs = tl.full((OWN_ROWS,), 0, tl.int32) + seq
        # A member of a group also waits for its prefix splits; a sequence in no group has only its own.
        first = tl.where(start > 0, 0, shared_splits)
        _finish_item(OutP, LseP, Out, Counters, seqs, head, row_ok, acc, m_i, l_i, shared_splits + split, first,
                     parts - first, parts, stride_ob, stride_oh, stride_op, stride_lb, stride_lh, stride_b,
                     stride_h, num_heads, OWN_ROWS, D, MERGE_INSIDE)


@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "shared_splits", "parts"])
def _merge_kernel(
    OutP, LseP, Out, shared_lens,  # OutP (B, Hq, PARTS, D) f32; LseP (B, Hq, PARTS); Out (B, Hq, D)
    stride_ob, stride_oh, stride_op, stride_lb, stride_lh, stride_b, stride_h, shared_splits, parts,
    PARTS_P2: tl.constexpr, D: tl.constexpr,
):
    """The two-launch configs' merge: one program per (sequence, head), all its partials loaded at once. A
    sequence in no group (shared_lens 0) has only its own partials, from shared_splits on."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    p = tl.arange(0, PARTS_P2)
    d = tl.arange(0, D)
    first = tl.where(tl.load(shared_lens + seq) > 0, 0, shared_splits)
    lse = tl.load(LseP + seq * stride_lb + head * stride_lh + p, mask=(p >= first) & (p < parts),
                  other=float("-inf"))  # (PARTS_P2,), base 2
    seen = lse > float("-inf")
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.where(seen, tl.exp2(lse - top), 0.0)
    total = tl.sum(weight, 0)
    # Only partials that saw a key are read: the others may hold anything.
    x = tl.load(OutP + seq * stride_ob + head * stride_oh + p[:, None] * stride_op + d[None, :],
                mask=seen[:, None], other=0.0)  # (PARTS_P2, D)
    out = tl.sum(x * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + seq * stride_b + head * stride_h + d, out.to(Out.dtype.element_ty))


def shared_rows(max_group: int, group_size: int, config: DecodeConfig) -> int:
    """Query rows in a shared item's tile: the largest group's sequences x query heads, at least 16 (the
    tensor-core minimum) and at most the config's rows (or one sequence's heads, if more). Every tile of a group
    reads the prefix, so the fewer tiles the better, up to what the accumulators' registers allow."""
    most = max(config.max_shared_rows, triton.next_power_of_2(group_size))
    return min(most, max(16, triton.next_power_of_2(max(max_group, 1) * group_size)))


def shared_tiles(max_group: int, group_size: int, config: DecodeConfig) -> int:
    """Tiles of `shared_rows` query rows that the largest group needs."""
    return -(-max(max_group, 1) // (shared_rows(max_group, group_size, config) // group_size))


def decode_splits(
    device: torch.device, batch: int, num_kv_heads: int, group_size: int, layout: DecodeLayout, config: DecodeConfig
) -> tuple[int, int, int]:
    """(shared splits, own splits, shortest shared split in tokens): about config.items_per_sm work items for
    every SM, none shorter than its kind's minimum. Sized for ranges of `layout.max_context` tokens; shorter
    ones leave some splits empty (each item computes its range from the step's lengths)."""
    if device.type != "cuda":
        return (3 if layout.num_groups else 0), 2, 1  # the CPU interpreter: several splits, to test the merge
    slots = config.items_per_sm * multiprocessors(device)
    longest = max(layout.max_context, 1)
    own_splits = max(1, min(-(-slots // max(batch * num_kv_heads, 1)), -(-longest // MIN_OWN_CHUNK)))
    if not layout.num_groups:
        return 0, own_splits, MIN_SHARED_CHUNK
    rows = min(shared_rows(layout.max_group, group_size, config), layout.max_group * group_size)
    min_split = max(MIN_SHARED_CHUNK, SPLIT_TOKENS_PER_ROW * rows)
    unsplit = layout.num_groups * num_kv_heads * shared_tiles(layout.max_group, group_size, config)
    shared_splits = max(1, min(64, -(-slots // unsplit), longest // min_split))
    return shared_splits, own_splits, min_split


def pick_config(device: torch.device, layout: DecodeLayout, group_size: int) -> DecodeConfig:
    """The config for a step, by benchmarks/kernel_shared_prefix.py's table (H100, RESULTS.md): the in-launch
    merge where a group's query rows fit one 16-row tile (16 forks of 32 KV heads: 52 / 72 / 142 us against 55 /
    77 / 145 with two launches), else 64-row tiles, own tiles of 128 tokens and two launches: the fastest Triton
    config (or within 0.1% of it) in 10 of the other 15 cases, within 2.4% in 2, 9% to 28% slower in 3 (8 KV
    heads: N=16 with P=1,024 and 16,384, N=64 with P=16,384, where the CUDA kernel runs in the engine)."""
    if device.type == "cuda" and layout.num_groups and layout.max_group * group_size <= 16:
        return CONFIGS["rows64"]
    return CONFIGS["rows64_own128_two_launches"]


_counters: dict[torch.device, torch.Tensor] = {}


def row_counters(device: torch.device, rows: int) -> torch.Tensor:
    """Zeroed int32 counters, at least `rows`, for the in-launch merge; each launch leaves them at 0 again. One
    buffer per device, shared by every launch (they run one after another on a stream); grown outside CUDA-graph
    capture (a step's shape runs eagerly before it is captured)."""
    buffer = _counters.get(device)
    if buffer is None or buffer.numel() < rows:
        buffer = _counters[device] = torch.zeros(max(rows, 2 * (0 if buffer is None else buffer.numel()), 4096),
                                                 dtype=torch.int32, device=device)
    return buffer


def decode_attention(
    q: torch.Tensor,  # (B, Hq, D)
    k_cache: torch.Tensor,  # (num_blocks, PAGE, Hkv, D)
    v_cache: torch.Tensor,
    layout: DecodeLayout,
    scale: float,
    config: DecodeConfig | None = None,
) -> torch.Tensor:  # (B, Hq, D)
    """Attention of one decode row per sequence over its shared prefix (read once per group and row tile) and
    its own KV. `config`: the kernel's shape (default: pick_config's)."""
    batch, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    config = config or pick_config(q.device, layout, group_size)
    shared_splits, own_splits, min_shared = decode_splits(q.device, batch, num_kv_heads, group_size, layout, config)
    parts = shared_splits + own_splits
    out_p = torch.empty(batch, num_heads, parts, head_dim, dtype=torch.float32, device=q.device)
    lse_p = torch.empty(batch, num_heads, parts, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    counters = row_counters(q.device, batch * num_heads) if config.merge_inside else lse_p
    tiles = shared_tiles(layout.max_group, group_size, config)
    rows = shared_rows(layout.max_group, group_size, config)
    num_shared_items = layout.num_groups * num_kv_heads * tiles * shared_splits
    own_items = batch * num_kv_heads * own_splits
    cuda = q.device.type == "cuda"
    # Without groups the group tensors may be empty, which a launch cannot pass as pointers: any other int32
    # tensor stands in, never read.
    group_tables, group_lens = ((layout.group_tables, layout.group_lens) if layout.num_groups
                                else (layout.block_tables, layout.context_lens))
    _decode_kernel[(num_shared_items + own_items,)](
        q, k_cache, v_cache, out_p, lse_p, out, counters,
        layout.block_tables, layout.context_lens, layout.shared_lens, layout.group_ptr, layout.group_rows,
        group_tables, group_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out_p.stride(0), out_p.stride(1), out_p.stride(2), lse_p.stride(0), lse_p.stride(1),
        out.stride(0), out.stride(1), layout.block_tables.stride(0), group_tables.stride(0),
        scale, num_shared_items, tiles, shared_splits, own_splits, min_shared, num_heads,
        G=group_size, HKV=num_kv_heads,
        SHARED_ROWS=rows, OWN_ROWS=max(16, triton.next_power_of_2(group_size)),
        SHARED_N=config.shared_n if cuda else 16, OWN_N=config.own_n if cuda else 16,  # the interpreter: quick tests
        PAGE=page, D=head_dim, MIN_OWN=MIN_OWN_CHUNK if cuda else 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", MERGE_INSIDE=config.merge_inside,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not config.merge_inside:
        _merge_kernel[(batch, num_heads)](
            out_p, lse_p, out, layout.shared_lens,
            out_p.stride(0), out_p.stride(1), out_p.stride(2), lse_p.stride(0), lse_p.stride(1), out.stride(0),
            out.stride(1), shared_splits, parts, PARTS_P2=triton.next_power_of_2(parts), D=head_dim, num_warps=4,
        )
    return out
