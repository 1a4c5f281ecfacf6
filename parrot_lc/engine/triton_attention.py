"""Triton attention over the paged KV cache: one kernel for steps with prefill chunks (and for the decode steps
of sliding-window models); other decode steps go to the fused decode kernel of triton_decode.py.

The kernel attends a set of query rows to a range of one block table's KV. The own part of every sequence
is one such set (its new rows, KV from after its shared prefix to its end, causal). A shared prefix is
another: all the rows of the sequences that share it, against the prefix's KV, read by one program per tile
of rows instead of once per sequence. The two results are merged by log-sum-exp, as in the torch reference.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from parrot_lc.engine.attention import (
    AttentionBackend, AttentionMetadata, DecodeLayout, merge_by_lse, multiprocessors, write_kv,
)
from parrot_lc.engine.triton_decode import decode_attention


# Arguments that change from step to step are not specialized on (a value of 1, divisibility by 16): each
# specialization is a compile of about 0.6 s on the H100, paid by whichever request first takes it.
@triton.jit(do_not_specialize=["stride_os", "stride_ls", "stride_bt", "window", "splits"])
def _paged_attention_kernel(
    Q, K, V, Out, Lse,  # Q: (T, Hq, D); K/V: (num_blocks, PAGE, Hkv, D); Out: (SPLITS, T, Hq, D); Lse: (SPLITS, T, Hq)
    row_ptr, row_index, positions,  # rows of set s: row_index[row_ptr[s]:row_ptr[s+1]]; positions: (T,)
    block_tables, kv_start, kv_end,  # (S, max_blocks), (S,), (S,)
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
    stride_bt,
    scale, window, splits,  # window <= 0: none
    G: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    D: tl.constexpr, PRECISION: tl.constexpr,
):
    s = tl.program_id(0)
    h_kv = tl.program_id(1)
    tile = tl.program_id(2) // splits
    split = tl.program_id(2) % splits  # a part of the KV range, for parallelism when the grid is small
    first_row = tl.load(row_ptr + s)
    num_rows = tl.load(row_ptr + s + 1) - first_row
    if tile * BLOCK_M >= num_rows:
        return
    r = tl.arange(0, ROWS)  # BLOCK_M query rows x G query heads of one KV head, padded to a power of two
    m_idx = tile * BLOCK_M + r // G
    row_ok = (m_idx < num_rows) & (r < BLOCK_M * G)
    token = tl.load(row_index + first_row + m_idx, mask=row_ok, other=0)  # (ROWS,)
    head = h_kv * G + r % G
    q_pos = tl.load(positions + token, mask=row_ok, other=0).to(tl.int32)
    d = tl.arange(0, D)
    q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)  # (ROWS, D)

    lo = tl.load(kv_start + s)
    hi = tl.minimum(tl.load(kv_end + s), tl.max(tl.where(row_ok, q_pos, 0)) + 1)
    if window > 0:
        lo = tl.maximum(lo, tl.min(tl.where(row_ok, q_pos, 2147483647)) - window + 1)
    if splits > 1:
        per_split = tl.cdiv(tl.cdiv(hi - lo, splits), BLOCK_N) * BLOCK_N
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp via exp2
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        block = tl.load(block_tables + s * stride_bt + k_pos // PAGE, mask=k_ok, other=0)
        offset = block * stride_kb + (k_pos % PAGE) * stride_kt + h_kv * stride_kh  # (BLOCK_N,)
        k = tl.load(K + offset[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(V + offset[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (ROWS, BLOCK_N)
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if window > 0:
            visible &= q_pos[:, None] - k_pos[None, :] < window
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # every key masked (sliding window): out 0, lse -inf, ignored by the merge
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(Out + split * stride_os + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + split * stride_ls + token * stride_lt + head, lse, mask=row_ok)


def paged_attention(
    q: torch.Tensor,  # (T, Hq, D)
    k_cache: torch.Tensor,  # (num_blocks, PAGE, Hkv, D)
    v_cache: torch.Tensor,
    positions: torch.Tensor,  # (T,) absolute position of each query row
    row_ptr: torch.Tensor,  # (S + 1,) int32
    row_index: torch.Tensor,  # (R,) int32: the rows of each set, set after set
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    kv_start: torch.Tensor,  # (S,) int32
    kv_end: torch.Tensor,  # (S,) int32
    max_rows: int,  # most rows in one set
    scale: float,
    window: int | None,
    block_n: int | None = None,
    splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attends each set's rows to KV [kv_start, kv_end) of its block table, causally by position.
    Returns out (T, Hq, D) and lse (T, Hq) float32; rows in no set are left as zeros / -inf.

    `splits` > 1 divides each KV range over that many programs, merged here by LSE: more parallelism for
    long contexts in small grids. At 512-token contexts it did not pay on the H100 (the merge costs more),
    so the engine keeps the default of 1; tile sizes are the fastest of a sweep there."""
    num_tokens, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_m = rows_per_tile(max_rows, group)
    block_n = block_n or (32 if head_dim <= 64 else 64)
    num_sets = row_ptr.numel() - 1
    tiles = triton.cdiv(max_rows, block_m)
    shape = (splits,) if splits > 1 else ()
    out = torch.zeros(*shape, *q.shape, dtype=torch.float32 if splits > 1 else q.dtype, device=q.device)
    lse = torch.full((*shape, num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    out_s, lse_s = (out, lse) if splits > 1 else (out[None], lse[None])
    _paged_attention_kernel[(num_sets, num_kv_heads, tiles * splits)](
        q, k_cache, v_cache, out, lse,
        row_ptr, row_index, positions,
        block_tables, kv_start, kv_end,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out_s.stride(0), out_s.stride(1), out_s.stride(2), lse_s.stride(0), lse_s.stride(1), block_tables.stride(0),
        scale, window or 0, splits,
        G=group, BLOCK_M=block_m, ROWS=max(16, triton.next_power_of_2(block_m * group)), BLOCK_N=block_n,
        PAGE=page, D=head_dim, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # exact float32
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits == 1:
        return out, lse
    total = lse.logsumexp(0)  # (T, Hq)
    weights = (lse - total).exp().nan_to_num(0.0)  # (SPLITS, T, Hq); rows in no set: all -inf
    return (weights[..., None] * out).sum(0).to(q.dtype), total


def rows_per_tile(max_rows: int, group: int) -> int:
    """Query rows (tokens) in one program's tile of `paged_attention`: with G heads each, at least 16 rows for
    tensor-core dots."""
    return max(1, 16 // group) if max_rows == 1 else max(1, 64 // group)


class TritonBackend(AttentionBackend):
    """Paged attention in Triton. Steps with prefill chunks: own parts in one launch, all shared prefixes in
    another, merged by LSE. Decode steps: the fused decode kernel (`decode`)."""

    name = "triton"
    # The two-pass path's shared pass costs a second launch and a merge per layer. Measured in decode steps under
    # CUDA graphs before the fused decode kernel, when decode took this path too (benchmarks/
    # shared_prefix_decode.py, Llama-2-7B shapes, H200), it was already faster at 8 forks of a
    # 4,096-token prefix (1.2e8 saved elements: 8.4 against 9.0 ms a step) and far faster with more (230 forks:
    # 27 against 82 ms); below about half that saving the extra pass is not worth its launches.
    min_shared_elements = 60_000_000
    # Decode steps read a shared prefix in the same launch as the own parts (triton_decode.py). A small one is
    # still cheaper read per sequence: 16 sequences of 8 KV heads forked from 1,024 tokens (1.6e7 elements saved)
    # took 0.029 against 0.026 ms a layer shared (benchmarks/kernel_shared_prefix.py, H200), and in the engine 8
    # and 32 forks of a 48-token prefix (a map step's instruction: 1.4e6 and 6.1e6) took 7.78 and 11.50 ms a step
    # against 7.57 and 11.40 (shared_prefix_decode.py --prefix 48 --own 1024, H100). From 6.3e7 up, sharing was
    # the faster in every case of the kernel table.
    min_shared_elements_decode = 32_000_000
    decodes_in_graphs = True

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        plan = meta.plan.get("triton") or meta.plan.setdefault("triton", self._plan(meta, k_cache.shape[2],
                                                                                    q.shape[1] // k_cache.shape[2]))
        if "decode" in plan:
            return self.decode(q, k_cache, v_cache, plan["decode"], scale)
        out, lse = paged_attention(q, k_cache, v_cache, plan["positions"], *plan["own"], scale=scale,
                                   window=meta.sliding_window)
        if "shared" in plan:
            out_s, lse_s = paged_attention(q, k_cache, v_cache, plan["positions"], *plan["shared"], scale=scale,
                                           window=meta.sliding_window, splits=plan["splits"])
            rows = plan["shared_rows"]
            out[rows] = merge_by_lse(out[rows].float(), lse[rows], out_s[rows].float(), lse_s[rows]).to(out.dtype)
        return out

    def warm_up(self, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, sliding_window: int | None) -> None:
        """Compiles the prefill kernel's variants, about 0.6 s each on the H100, which the first steps with
        prefill chunks would otherwise wait for: two tile shapes (sets of one query row and of several), each
        writing the model's dtype (one split) or float32 partials (several). Decode steps' kernels compile when
        CUDA graphs are captured."""
        device = k_cache.device
        if device.type != "cuda":
            return  # the interpreter compiles nothing
        i32 = {"dtype": torch.int32, "device": device}
        q = torch.zeros(2, num_heads, k_cache.shape[-1], dtype=k_cache.dtype, device=device)  # (T, Hq, D)
        for rows, splits in itertools.product((1, 2), (1, 2)):
            paged_attention(q, k_cache, v_cache, torch.zeros(2, **i32), torch.tensor([0, rows], **i32),
                            torch.arange(rows, **i32), torch.zeros(1, 1, **i32), torch.zeros(1, **i32),
                            torch.ones(1, **i32), rows, scale=1.0, window=sliding_window, splits=splits)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: DecodeLayout,
               scale: float) -> torch.Tensor:
        """A decode step: one fused launch over shared prefixes and own parts, then the merge."""
        return decode_attention(q, k_cache, v_cache, layout, scale)

    @staticmethod
    def _plan(meta: AttentionMetadata, num_kv_heads: int, group: int) -> dict:
        device = meta.slot_mapping.device
        if meta.sliding_window is None and all(n == 1 for n in meta.query_lens):
            return {"decode": DecodeLayout.of_step(meta)}
        i32 = torch.int32
        q_lens = torch.tensor(meta.query_lens, device=device)
        seq_of_row = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), q_lens)  # (T,)
        row = torch.arange(seq_of_row.numel(), device=device)
        positions = (meta.context_lens[seq_of_row] - q_lens[seq_of_row] + row - meta.query_start[seq_of_row]).to(i32)
        own = (meta.query_start.to(i32), row.to(i32), meta.block_tables.to(i32), meta.shared_lens.to(i32),
               meta.context_lens.to(i32), max(meta.query_lens))
        plan = {"positions": positions, "own": own}
        if meta.shared:
            sizes = [p.query_rows.numel() for p in meta.shared]
            width = max(p.block_ids.numel() for p in meta.shared)
            tables = torch.zeros(len(meta.shared), width, dtype=i32, device=device)
            for i, prefix in enumerate(meta.shared):
                tables[i, : prefix.block_ids.numel()] = prefix.block_ids
            rows = torch.cat([p.query_rows for p in meta.shared])
            plan["shared"] = (
                torch.tensor([0] + sizes, device=device).cumsum(0).to(i32),
                rows.to(i32),
                tables,
                torch.zeros(len(sizes), dtype=i32, device=device),
                torch.tensor([p.num_tokens for p in meta.shared], dtype=i32, device=device),
                max(sizes),
            )
            plan["shared_rows"] = rows
            longest = max(p.num_tokens for p in meta.shared)
            tile = rows_per_tile(max(sizes), group)
            plan["splits"] = shared_splits(device, sum(-(-n // tile) for n in sizes) * num_kv_heads, longest)
        return plan


def shared_splits(device: torch.device, programs: int, longest: int) -> int:
    """A long shared prefix read by few programs (one per tile of a group's rows and KV head) leaves most SMs
    idle: split it into ranges of at least 256 tokens until there are about two programs per SM. Many forks'
    rows are enough programs unsplit: splitting them would only write float32 partials for the merge to read
    (at 230 forks of 64 rows, 9 splits wrote 0.6 GB a layer in a step of 4,096 rows)."""
    if device.type != "cuda":
        return 1
    sms = multiprocessors(device)
    return max(1, min(32, -(-2 * sms // programs), longest // 256))
