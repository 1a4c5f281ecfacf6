"""Shared-prefix ("cascade") decode attention in CUDA (csrc/shared_prefix_decode.cu, built as parrot_lc._cuda).

One decode query row per sequence, KV in the paged cache, laid out by a DecodeLayout. A partials kernel reads
each group's prefix once per tile of its members (all their query heads of a KV head against each prefix
tile, on tensor cores: wgmma on Hopper, mma.sync elsewhere) and each sequence's own KV alone, every KV range
cut into splits so that the grid fills the GPU; a merge kernel (on Hopper launched as a programmatic
dependent, overlapping the partials' end) combines each (sequence, head)'s partials by log-sum-exp.

Every launch decision here depends on shapes and on the layout's max_group, max_context and num_groups only,
never on tensor values, so a call can be captured in a CUDA graph and replayed with other lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from parrot_lc.engine.attention import DecodeLayout, device_properties
from parrot_lc.engine.triton_attention import TritonBackend

try:
    from parrot_lc import _cuda
except ImportError:  # built only where torch has CUDA and nvcc was found (setup.py)
    _cuda = None

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_GQA_RATIO = 8
# The kernel cuts a range into whole tiles, at least this many tokens a part: a shorter split would cost more in
# partials written and merged (64 rows for a shared split, 4 x G for an own one) than its parallelism gains.
MIN_SHARED_CHUNK = 256
MIN_OWN_CHUNK = 64
# With few sequences the grid is planned as one wave, the shared splits taking what the own items leave, in
# parts as short as this, unless that leaves a shared part longer than ONE_WAVE_MAX_CHUNK tokens. Measured on the
# H100 (RESULTS.md, 2026-12-06 fourth session), 64 forks, 8 KV heads: one wave won with parts of at most 320, 1,088
# tokens (1k and 4k prefixes: 44.4 against 51.6 us, 55.7 against 62.0), two waves with parts of 4,160 (16k
# prefix: 106.8 against 139.6 us).
MIN_SHARED_CHUNK_ONE_WAVE = 128
ONE_WAVE_MAX_CHUNK = 2048
# Partials-kernel blocks resident on one multiprocessor at a time, by head dim (its shared memory and registers
# allow 2 at D=128, 3 at D=64). A range is split so that the unsplit items become at most one such wave:
# equal items past a whole wave would leave most SMs idle while the last ones run.
RESIDENT_PER_SM = {64: 3, 128: 2}
# With wgmma at D=128 the kernel has a variant of three resident blocks (2 pipeline stages, 168 registers a
# thread), taken where the largest group has at least MANY_SHARED_ROWS query rows a KV head and those rows times the
# longest range reach MANY_SHARED_ROW_TOKENS. Measured on the H100 (RESULTS.md, 2026-12-07), of the 18 cases it was
# faster in those 6 (8 KV heads, 256 forks of a 16k prefix: 305 against 361 us; 32 KV heads, 256 forks of 16k:
# 567 against 623) but one within 2%, and slower in most of the others (64 forks of a 1k prefix, 8 KV heads: 53.0
# against 45.9 us), whose shared items fill fewer blocks than a wave.
MANY_SHARED_ROWS = 256
MANY_SHARED_ROW_TOKENS = 2**20
OWN_KV_HEADS = 4  # KV heads of one sequence per own work item (one per warp)
# Steps of small groups with GQA go to the Triton kernel (small_gqa_groups): measured on the H100 (RESULTS.md, eighth
# session), 8 KV heads, 16 forks (64 query rows a KV head): Triton's pick 25.3 / 30.2 / 54.6 us against 25.4 / 32.6 /
# 59.0 for the CUDA kernel's at 1k / 4k / 16k prefixes; with 32 KV heads (no GQA) the CUDA kernel was ahead.
SMALL_GROUPS_MIN_GQA_RATIO = 4
SMALL_GROUPS_MAX_ROWS = 64
# Shared items of 128 query rows on the warp-specialized kernel (sm_90a, head dim 128: FlashAttention-3's
# structure, two producer warps' tensor-memory copies of 128-token K and V tiles read by two consumer warpgroups
# that take turns at the tensor cores, one block a multiprocessor), after the own items' partials kernel: taken
# where the largest group has at least 128 query rows a KV head and KV heads x rows x the longest range reach
# WARP_SPECIALIZED_ROW_TOKENS (the shared items' products dominate). Measured on the H100 (RESULTS.md, 2026-12-07
# eighth session), of the 18 cases it was faster in the 5 it takes (8 KV heads, 256 forks of a 16k prefix: 246
# against 311 us for the three-block kernel; 230 with the consumers' turns, tenth session), within 2% of the faster
# kernel in those it leaves but one (32 KV heads, 64 forks of 4k: 136.5 against 139.0; 134.7 against 136.3 in the
# tenth session), and slower where the shared items are few and short (8 KV heads, 64 forks of 1k: 50.6 against
# 44.8).
WARP_SPECIALIZED_ROWS = 128
WARP_SPECIALIZED_ROW_TOKENS = 2**25
WARP_SPECIALIZED_TILE = 128  # tokens of a tile; a page holds whole tiles or a tile whole pages
# Copies of a tile, K's and V's together (64 head dims, a page each), at most: each kind's are one a lane of its
# producer warp, so 64 would fit, but pages under 16 tokens were never tested on the GPU and stay refused.
WARP_SPECIALIZED_MAX_BOXES = 32


def available() -> bool:
    """Whether the extension is built and the current CUDA device can run it (sm_80 or newer: bf16 mma.sync,
    cp.async). A device it was not compiled for fails at its first launch: setup.py builds for the GPUs it sees."""
    return _cuda is not None and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def unsupported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (q (B, Hq, D), caches (num_blocks, PAGE, Hkv, D)), or None."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if q.dtype not in SUPPORTED_DTYPES:
        return f"cuda_decode_attention supports {SUPPORTED_DTYPES}, got {q.dtype}"
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"cuda_decode_attention supports head dims {SUPPORTED_HEAD_DIMS}, got {head_dim}"
    if num_heads % num_kv_heads or not 1 <= num_heads // num_kv_heads <= MAX_GQA_RATIO:
        return f"query heads must be 1 to {MAX_GQA_RATIO} times the KV heads, got {num_heads} and {num_kv_heads}"
    return None


def warp_specialized_unsupported(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """Why the warp-specialized kernel cannot take shared items of q (B, Hq, D) over this cache, or None."""
    head_dim, page = q.shape[2], k_cache.shape[1]
    properties = device_properties(q.device)
    if (properties.major, properties.minor) != (9, 0):
        return "the warp-specialized kernel needs a Hopper GPU (sm_90)"
    if head_dim != 128:
        return f"the warp-specialized kernel takes head dim 128, got {head_dim}"
    tile = WARP_SPECIALIZED_TILE
    boxes = 2 * head_dim // 64 * (tile // min(page, tile))
    if (page % tile and tile % page) or boxes > WARP_SPECIALIZED_MAX_BOXES:
        return (f"the warp-specialized kernel copies {tile}-token tiles in whole pages of 16 to {tile} tokens (or "
                f"multiples of {tile}), got {page}")
    if k_cache.stride(0) != page * k_cache.stride(1):
        return "the warp-specialized kernel reads a cache whose pages are contiguous slots"
    return None


def small_gqa_groups(q: torch.Tensor, k_cache: torch.Tensor, layout: DecodeLayout) -> bool:
    """Whether a step's groups are small and its GQA ratio large (at least SMALL_GROUPS_MIN_GQA_RATIO query heads a
    KV head, at most SMALL_GROUPS_MAX_ROWS query rows a KV head in its largest group): the steps that the Triton
    kernel's pick takes faster than this one's."""
    group = q.shape[1] // k_cache.shape[2]
    return group >= SMALL_GROUPS_MIN_GQA_RATIO and layout.max_group * group <= SMALL_GROUPS_MAX_ROWS


class CudaBackend(TritonBackend):
    """The Triton backend with decode steps that share prefixes in the CUDA kernel (csrc/), where the model's
    shapes allow it, except steps of small groups with GQA (small_gqa_groups). Over
    benchmarks/kernel_shared_prefix.py's 18 cases (H100, 2026-12-07 eighth session, RESULTS.md) the CUDA kernel was
    faster than the Triton kernel's pick in 14; the Triton one was ahead by 2.4 and 4.4 us with 16 forks of a 4k and
    a 16k prefix (8 KV heads: 64 query rows a KV head; 0.1 us behind at 1k), which small_gqa_groups now routes to
    it, and by 0.1 us in one other. In decode steps without groups (benchmarks/engine_decode.py, H100) the Triton
    kernel was faster at batch 1 and 64. `auto` takes this backend where the extension is built
    (attention.select_backend)."""

    name = "cuda"

    def decode(self, q, k_cache, v_cache, layout, scale):
        if layout.num_groups == 0 or unsupported(q, k_cache, v_cache) or small_gqa_groups(q, k_cache, layout):
            return super().decode(q, k_cache, v_cache, layout, scale)
        return cuda_decode_attention(q, k_cache, v_cache, layout, scale)


@dataclass(frozen=True)
class Plan:
    """How one launch cuts a decode step's work, from shapes alone (so that a CUDA graph replays it with other
    lengths): a shared item holds 16 x row_warps query rows (members x query heads of one KV head), each group
    has shared_tiles of them per KV head, and each KV range is cut into shared_splits (own_splits) parts of whole
    tiles, at least min_shared_chunk (min_own_chunk) tokens each, from the step's lengths. wgmma: shared items
    (of 64 rows: row_warps 4) on Hopper's wgmma where the extension is built for sm_90a (elsewhere mma.sync), with
    blocks_per_sm resident partials blocks (3: the wgmma kernel of 2 pipeline stages at D=128; the splits are
    planned for that many). row_warps 8: shared items of 128 rows on the warp-specialized kernel (with wgmma; Hopper,
    warp_specialized_unsupported), one a multiprocessor, after the own items. programmatic_merge launches the merge
    as a programmatic dependent of the partials (Hopper), so that its launch overlaps them."""

    row_warps: int
    shared_tiles: int
    shared_splits: int
    own_splits: int
    min_shared_chunk: int = MIN_SHARED_CHUNK
    min_own_chunk: int = MIN_OWN_CHUNK
    wgmma: bool = False
    blocks_per_sm: int = 2
    programmatic_merge: bool = False


def _splits(items: int, max_context: int, min_chunk: int, slots: int) -> int:
    """Parts per KV range so that `items` unsplit work items fill `slots` resident blocks (at most), no more
    than the longest possible range has chunks of min_chunk tokens."""
    return max(1, min(slots // items, math.ceil(max_context / min_chunk)))


def plan(q: torch.Tensor, k_cache: torch.Tensor, layout: DecodeLayout, blocks_per_sm: int | None = None,
         warp_specialized: bool | None = None) -> Plan:
    """The launch's plan for q (B, Hq, D) over a cache of k_cache's shape and the layout's grid sizes;
    `blocks_per_sm` overrides the choice of the three-block wgmma kernel (2 or 3), `warp_specialized` that of
    128-row shared items (ValueError where they cannot run), for measurements."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    rows = layout.max_group * group  # of the largest group, a KV head
    if warp_specialized is None:
        warp_specialized = (rows >= WARP_SPECIALIZED_ROWS
                            and num_kv_heads * rows * layout.max_context >= WARP_SPECIALIZED_ROW_TOKENS
                            and not warp_specialized_unsupported(q, k_cache))
    elif warp_specialized and (reason := warp_specialized_unsupported(q, k_cache)):
        raise ValueError(reason)
    if warp_specialized:
        return _warp_specialized_plan(q, k_cache, layout)
    # A shared item holds 16, 32 or 64 query rows (members x G heads): just enough for the largest group.
    row_warps = 1 if rows <= 16 else 2 if rows <= 32 else 4
    properties = device_properties(q.device)
    capability = properties.major, properties.minor
    wgmma = capability == (9, 0) and row_warps == 4
    if blocks_per_sm is None:
        many_rows = rows >= MANY_SHARED_ROWS and rows * layout.max_context >= MANY_SHARED_ROW_TOKENS
        blocks_per_sm = 3 if wgmma and head_dim == 128 and many_rows else RESIDENT_PER_SM[head_dim]
    slots = blocks_per_sm * properties.multi_processor_count
    members_per_tile = 16 * row_warps // group
    shared_tiles = math.ceil(layout.max_group / members_per_tile)
    shared_items = layout.num_groups * num_kv_heads * shared_tiles
    own_items = max(batch * math.ceil(num_kv_heads / OWN_KV_HEADS), 1)
    # Few sequences: their own items take at most half of one wave of blocks, the shared items the rest.
    own_splits = _splits(own_items, layout.max_context, MIN_OWN_CHUNK, slots // 2)
    shared_splits = _splits(shared_items, layout.max_context, MIN_SHARED_CHUNK_ONE_WAVE,
                            slots - own_items * own_splits) if shared_items else 0
    min_shared_chunk = MIN_SHARED_CHUNK_ONE_WAVE
    if not shared_items or own_items >= slots // 2 or layout.max_context > shared_splits * ONE_WAVE_MAX_CHUNK:
        # Each kind of item split to fill a wave by itself: two waves of shorter items in all.
        own_splits = _splits(own_items, layout.max_context, MIN_OWN_CHUNK, slots)
        min_shared_chunk = MIN_SHARED_CHUNK
        shared_splits = _splits(shared_items, layout.max_context, min_shared_chunk, slots) if shared_items else 0
    return Plan(row_warps, shared_tiles, shared_splits, own_splits, min_shared_chunk=min_shared_chunk, wgmma=wgmma,
                blocks_per_sm=blocks_per_sm, programmatic_merge=capability >= (9, 0))


def _warp_specialized_plan(q: torch.Tensor, k_cache: torch.Tensor, layout: DecodeLayout) -> Plan:
    """128-row shared items, split to fill one wave of one block a multiprocessor; the own items before them split
    to fill a wave of their kernel."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    multiprocessors = device_properties(q.device).multi_processor_count
    shared_tiles = math.ceil(layout.max_group / (WARP_SPECIALIZED_ROWS // (num_heads // num_kv_heads)))
    shared_items = layout.num_groups * num_kv_heads * shared_tiles
    own_items = max(batch * math.ceil(num_kv_heads / OWN_KV_HEADS), 1)
    own_splits = _splits(own_items, layout.max_context, MIN_OWN_CHUNK, RESIDENT_PER_SM[head_dim] * multiprocessors)
    shared_splits = _splits(shared_items, layout.max_context, MIN_SHARED_CHUNK, multiprocessors) if shared_items else 0
    return Plan(WARP_SPECIALIZED_ROWS // 16, shared_tiles, shared_splits, own_splits, wgmma=True,
                blocks_per_sm=RESIDENT_PER_SM[head_dim], programmatic_merge=True)


def cuda_decode_attention(
    q: torch.Tensor,  # (B, Hq, D), row b is sequence b's decode query
    k_cache: torch.Tensor,  # (num_blocks, PAGE, Hkv, D), this step's KV already written
    v_cache: torch.Tensor,  # (num_blocks, PAGE, Hkv, D)
    layout: DecodeLayout,
    scale: float,
    launch: Plan | None = None,
) -> torch.Tensor:  # (B, Hq, D) in q's dtype
    """softmax(scale q K^T) V over each sequence's KV: its group's prefix [0, group_lens[g]) through
    group_tables[g], then its own tokens [shared_lens[b], context_lens[b]) through block_tables[b]. A row with
    no KV (context_lens 0, no group) comes out 0. The layout must be consistent: a member of group g has
    shared_lens[b] == group_lens[g] (that is how the merge knows to read its shared partials), no group holds
    more than layout.max_group sequences, and no range is longer than layout.max_context. `launch` overrides
    the plan (`plan`), for measurements."""
    if not available():
        raise RuntimeError("parrot_lc._cuda is not built or no CUDA device is present (cuda_attention.available())")
    reason = unsupported(q, k_cache, v_cache)
    if reason:
        raise ValueError(reason)
    batch, num_heads, head_dim = q.shape
    launch = launch or plan(q, k_cache, layout)
    parts = launch.shared_splits + launch.own_splits
    part_out = torch.empty(batch, num_heads, parts, head_dim, dtype=torch.float32, device=q.device)  # (B, Hq, S, D)
    part_lse = torch.empty(batch, num_heads, parts, dtype=torch.float32, device=q.device)  # (B, Hq, S)
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)  # (B, Hq, D)
    _cuda.shared_prefix_decode(
        q, k_cache, v_cache,
        layout.block_tables, layout.context_lens, layout.shared_lens,
        layout.group_ptr, layout.group_rows, layout.group_tables, layout.group_lens,
        part_out, part_lse, out, scale,
        launch.row_warps, launch.shared_tiles, launch.shared_splits, launch.own_splits,
        launch.min_shared_chunk, launch.min_own_chunk, launch.wgmma, launch.blocks_per_sm, launch.programmatic_merge,
    )
    return out
