"""Attention backends (torch reference, Triton, the compiled CPU decode step) against dense float64 attention over the
same KV.

Each case is a batch over a paged cache: some sequences share a prefix (read once by the shared part),
each has KV of its own before this step's rows, and rows are decode tokens or prefill chunks. Without a GPU
the Triton kernel runs in Triton's interpreter (float32); on a GPU the same tests run, plus bf16 at real sizes.
"""

import math
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from parrot_lc.engine import cpu_kernels, triton_attention
from parrot_lc.engine.attention import AttentionMetadata, SharedPrefix, TorchReferenceBackend
from parrot_lc.engine.cpu_attention import CpuDecodeBackend
from parrot_lc.engine.triton_attention import TritonBackend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = {"torch": TorchReferenceBackend, "triton": TritonBackend}
if DEVICE == "cpu" and cpu_kernels.available():
    BACKENDS["cpu"] = CpuDecodeBackend  # decode steps compiled (their shared groups read through each table)


@dataclass
class Seq:
    shares_prefix: bool
    own_before: int  # own KV tokens already in the cache
    new: int  # query rows this step


def dense_reference(q, keys, values, q_positions, window=None):
    """float64 causal attention of one sequence; keys/values (L, Hkv, D), q (n, Hq, D)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) / math.sqrt(q.shape[-1])
    pos = torch.arange(keys.shape[0], device=q.device)
    mask = pos[None, :] <= q_positions[:, None]
    if window is not None:
        mask &= q_positions[:, None] - pos[None, :] < window
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def run_case(backend, seqs, prefix_len, num_heads, num_kv_heads, head_dim, block, dtype, window=None):
    """Runs one backend over a random paged batch; returns (out, expected) row blocks per sequence."""
    assert prefix_len % block == 0
    gen = torch.Generator().manual_seed(0)
    own_blocks = [math.ceil((s.own_before + s.new) / block) for s in seqs]
    num_blocks = prefix_len // block + sum(own_blocks) + 3
    ids = torch.randperm(num_blocks, generator=gen).tolist()  # scattered blocks, as after some churn
    prefix_blocks, ids = ids[: prefix_len // block], ids[prefix_len // block :]
    tables, context_lens, shared_lens = [], [], []
    for seq, n in zip(seqs, own_blocks):
        own, ids = ids[:n], ids[n:]
        tables.append((prefix_blocks if seq.shares_prefix else []) + own)
        shared_lens.append(prefix_len if seq.shares_prefix else 0)
        context_lens.append(shared_lens[-1] + seq.own_before + seq.new)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    k_cache = randn(num_blocks, block, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block, num_kv_heads, head_dim)
    query_lens = [s.new for s in seqs]
    rows = sum(query_lens)
    q, k_new, v_new = randn(rows, num_heads, head_dim), randn(rows, num_kv_heads, head_dim), randn(rows, num_kv_heads, head_dim)
    slots = [tables[i][p // block] * block + p % block
             for i in range(len(seqs)) for p in range(context_lens[i] - query_lens[i], context_lens[i])]
    query_start = torch.tensor([0] + query_lens).cumsum(0)
    members = [i for i, s in enumerate(seqs) if s.shares_prefix]
    shared = []
    if len(members) >= 2:
        group_rows = torch.cat([torch.arange(query_start[i], query_start[i + 1]) for i in members])
        shared = [SharedPrefix(torch.tensor(members, device=DEVICE), group_rows.to(DEVICE),
                               torch.tensor(prefix_blocks, device=DEVICE), prefix_len)]
    else:
        shared_lens = [0] * len(seqs)
    width = max(map(len, tables))
    meta = AttentionMetadata(
        block_size=block,
        slot_mapping=torch.tensor(slots, device=DEVICE),
        query_start=query_start.to(DEVICE),
        query_lens=query_lens,
        context_lens=torch.tensor(context_lens, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE),
        shared_lens=torch.tensor(shared_lens, device=DEVICE),
        shared=shared,
        sliding_window=window,
    )
    out = BACKENDS[backend]().forward(q, k_new, v_new, k_cache, v_cache, meta, head_dim**-0.5)
    for i in range(len(seqs)):
        flat = torch.tensor([tables[i][p // block] * block + p % block for p in range(context_lens[i])], device=DEVICE)
        keys = k_cache.view(-1, num_kv_heads, head_dim)[flat]
        values = v_cache.view(-1, num_kv_heads, head_dim)[flat]
        positions = torch.arange(context_lens[i] - query_lens[i], context_lens[i], device=DEVICE)
        lo, hi = int(query_start[i]), int(query_start[i + 1])
        yield out[lo:hi], dense_reference(q[lo:hi], keys, values, positions, window)


SMALL_CASE = [Seq(True, 9, 5), Seq(True, 5, 1), Seq(False, 0, 10), Seq(True, 0, 1), Seq(False, 13, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 20, 3])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (6, 2)])
def test_shared_prefix_plus_own_part_equals_dense_attention(backend, num_heads, num_kv_heads, window):
    for out, expected in run_case(backend, SMALL_CASE, 12, num_heads, num_kv_heads, 16, 4, torch.float32, window):
        assert torch.allclose(out.double(), expected, atol=1e-5)


DECODE_CASE = [Seq(True, 9, 1), Seq(True, 0, 1), Seq(False, 13, 1), Seq(True, 4, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (9, 3)])
def test_a_decode_step_with_a_shared_prefix_equals_dense_attention(backend, num_heads, num_kv_heads, window):
    for out, expected in run_case(backend, DECODE_CASE, 12, num_heads, num_kv_heads, 16, 4, torch.float32, window):
        assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_kv_splits_change_nothing(monkeypatch, splits):
    monkeypatch.setattr(triton_attention, "paged_attention", partial(triton_attention.paged_attention, splits=splits))
    for out, expected in run_case("triton", SMALL_CASE, 12, 8, 2, 16, 4, torch.float32, window=20):
        assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [1, 8, 16])
def test_block_sizes_and_partial_blocks(backend, block):
    seqs = [Seq(True, 3, 2), Seq(True, 17, 1), Seq(False, 6, 7)]
    for out, expected in run_case(backend, seqs, 2 * block, 4, 2, 16, block, torch.float32):
        assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 at real sizes runs on the GPU (Triton's CPU interpreter misreads bf16)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(32, 32, 128), (32, 8, 128), (9, 3, 64)])
def test_triton_at_real_sizes_is_within_half_precision_bounds(dtype, num_heads, num_kv_heads, head_dim):
    seqs = [Seq(True, 100 + i, 1) for i in range(15)] + [Seq(True, 0, 300), Seq(False, 64, 1), Seq(False, 0, 500)]
    for out, expected in run_case("triton", seqs, 1024, num_heads, num_kv_heads, head_dim, 16, dtype):
        assert not out.isnan().any()
        error = (out.double() - expected).abs().max() / expected.abs().max()
        assert error < 1e-2, f"relative error {error:.2e}"
