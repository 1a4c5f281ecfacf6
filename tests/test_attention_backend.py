"""The torch reference backend (shared part + own part merged by log-sum-exp) equals dense attention."""

import math

import pytest
import torch

from parrot_lc.engine.attention import AttentionMetadata, SharedPrefix, TorchReferenceBackend


def dense_reference(q, keys, values, q_positions, window=None):
    """float64 causal attention of one sequence; keys/values (L, Hkv, D), q (n, Hq, D)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) / math.sqrt(q.shape[-1])
    pos = torch.arange(keys.shape[0])
    mask = pos[None, :] <= q_positions[:, None]
    if window is not None:
        mask &= q_positions[:, None] - pos[None, :] < window
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2)])
def test_shared_prefix_plus_own_part_equals_dense_attention(num_heads, num_kv_heads, window):
    torch.manual_seed(0)
    block, head_dim, num_blocks = 4, 16, 64
    k_cache = torch.randn(num_blocks, block, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block, num_kv_heads, head_dim)
    shared_blocks = [3, 7, 1]  # 12 tokens read once for sequences 0 and 1
    tables = [shared_blocks + [10, 11, 12], shared_blocks + [20, 21], [30, 31, 32]]
    context_lens = [23, 18, 10]
    query_lens = [5, 1, 10]  # a prefill chunk, a decode token, a fresh prefill
    rows = sum(query_lens)
    q = torch.randn(rows, num_heads, head_dim)
    k_new = torch.randn(rows, num_kv_heads, head_dim)
    v_new = torch.randn(rows, num_kv_heads, head_dim)
    slots = [tables[s][p // block] * block + p % block
             for s in range(3) for p in range(context_lens[s] - query_lens[s], context_lens[s])]
    width = max(map(len, tables))
    meta = AttentionMetadata(
        block_size=block,
        slot_mapping=torch.tensor(slots),
        query_start=torch.tensor([0, 5, 6, 16]),
        query_lens=query_lens,
        context_lens=torch.tensor(context_lens),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        shared_lens=torch.tensor([12, 12, 0]),
        shared=[SharedPrefix(torch.tensor([0, 1]), torch.arange(0, 6), torch.tensor(shared_blocks), 12)],
        sliding_window=window,
    )
    out = TorchReferenceBackend().forward(q, k_new, v_new, k_cache, v_cache, meta, head_dim**-0.5)

    start = 0
    for s in range(3):
        flat_slots = torch.tensor([tables[s][p // block] * block + p % block for p in range(context_lens[s])])
        keys = k_cache.view(-1, num_kv_heads, head_dim)[flat_slots]
        values = v_cache.view(-1, num_kv_heads, head_dim)[flat_slots]
        positions = torch.arange(context_lens[s] - query_lens[s], context_lens[s])
        expected = dense_reference(q[start:start + query_lens[s]], keys, values, positions, window)
        assert torch.allclose(out[start:start + query_lens[s]].double(), expected, atol=1e-5)
        start += query_lens[s]
