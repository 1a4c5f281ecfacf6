"""Attention over the paged KV cache, behind a backend interface.

Every backend sees the same step metadata: the new tokens of each sequence, where their KV goes, each
sequence's block table, and the groups of sequences whose block tables begin with the same blocks (a shared
ancestor context). A backend computes the shared part once per group and each sequence's own part alone, and
merges the two by log-sum-exp; the torch reference here does that with plain tensor ops on any device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SharedPrefix:
    """Sequences of one step whose first `num_tokens` KV tokens are the same cache blocks."""

    seq_indices: torch.Tensor  # (n,) int64, sequences in the batch
    query_rows: torch.Tensor  # (m,) int64, rows of q belonging to those sequences
    block_ids: torch.Tensor  # (num_tokens // block_size,) int64
    num_tokens: int


@dataclass
class AttentionMetadata:
    """Per-step layout of a flattened (varlen) batch, shared by every layer."""

    block_size: int
    slot_mapping: torch.Tensor  # (T,) int64, cache slot of each new token
    query_start: torch.Tensor  # (B + 1,) int64, cumulative query lengths
    query_lens: list[int]
    context_lens: torch.Tensor  # (B,) int64, KV length of each sequence after this step
    block_tables: torch.Tensor  # (B, max_blocks) int64, padded with 0
    shared_lens: torch.Tensor  # (B,) int64, leading KV tokens served by the sequence's SharedPrefix (or 0)
    shared: list[SharedPrefix]
    sliding_window: int | None = None
    plan: dict[str, Any] = field(default_factory=dict)  # a backend's per-step precomputation

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class AttentionBackend(ABC):
    """Writes the step's new K/V into the cache, then attends each query row over its sequence's KV."""

    name: str

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # (T, Hq, D)
        k: torch.Tensor,  # (T, Hkv, D)
        v: torch.Tensor,  # (T, Hkv, D)
        k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
        v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (T, Hq, D)
        ...


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[1:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combines two softmax-attention results over disjoint key sets. out: (..., D), lse: (...)."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in float32 with GQA by grouping query heads, returning (out, lse).

    q: (..., Hkv, G, Q, D), k and v: (..., Hkv, 1, L, D), mask: broadcastable to (..., Hkv, G, Q, L).
    Returns out (..., Hkv, G, Q, D) and lse (..., Hkv, G, Q).
    """
    scores = (q @ k.transpose(-1, -2)) * scale  # (..., Hkv, G, Q, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(dim=-1)  # (..., Hkv, G, Q)
    # A row with every key masked (sliding window) gets out 0 and lse -inf, which the merge then ignores.
    probs = (scores - lse.nan_to_num(neginf=0.0)[..., None]).exp()
    return probs @ v, lse


class TorchReferenceBackend(AttentionBackend):
    """Readable, device-agnostic attention in float32: the reference the fast kernels are tested against."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        plan = meta.plan.get("torch") or meta.plan.setdefault("torch", self._plan(meta))
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # (slots, Hkv, D)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        qf = q.float()

        # Own part: each sequence's KV after its shared prefix, padded to (B, L) and masked.
        q_pad = torch.cat([qf, qf.new_zeros(1, num_heads, head_dim)])[plan["q_index"]]  # (B, Q, Hq, D)
        batch, max_q = q_pad.shape[:2]
        q_pad = q_pad.view(batch, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Q, D)
        k_own = k_flat[plan["own_slots"]].float().permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, L, D)
        v_own = v_flat[plan["own_slots"]].float().permute(0, 2, 1, 3)[:, :, None]
        out, lse = attend(q_pad, k_own, v_own, plan["own_mask"][:, None, None], scale)
        # Back to rows: (B, Hkv, G, Q, D) -> (B, Q, Hq, D) -> (T, Hq, D)
        out = out.permute(0, 3, 1, 2, 4).reshape(batch, max_q, num_heads, head_dim)[plan["q_valid"]]
        lse = lse.permute(0, 3, 1, 2).reshape(batch, max_q, num_heads)[plan["q_valid"]]

        # Shared part: one pass per group over KV read once, for all of the group's query rows.
        for prefix, slots, mask in zip(meta.shared, plan["shared_slots"], plan["shared_masks"]):
            rows = prefix.query_rows
            q_s = qf[rows].view(-1, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # (Hkv, G, m, D)
            k_s = k_flat[slots].float().permute(1, 0, 2)[:, None]  # (Hkv, 1, S, D)
            v_s = v_flat[slots].float().permute(1, 0, 2)[:, None]
            out_s, lse_s = attend(q_s, k_s, v_s, mask, scale)
            out_s = out_s.permute(2, 0, 1, 3).reshape(-1, num_heads, head_dim)  # (m, Hq, D)
            lse_s = lse_s.permute(2, 0, 1).reshape(-1, num_heads)
            out[rows] = merge_by_lse(out[rows], lse[rows], out_s, lse_s)
        return out.to(q.dtype)

    @staticmethod
    def _plan(meta: AttentionMetadata) -> dict[str, torch.Tensor | list]:
        device = meta.slot_mapping.device
        num_rows = meta.slot_mapping.shape[0]
        q_lens = torch.tensor(meta.query_lens, device=device)  # (B,)
        max_q = max(meta.query_lens)
        j = torch.arange(max_q, device=device)[None, :]  # (1, Q)
        q_valid = j < q_lens[:, None]  # (B, Q)
        q_index = torch.where(q_valid, meta.query_start[:-1, None] + j, num_rows)  # padding reads a zero row
        q_pos = meta.context_lens[:, None] - q_lens[:, None] + j  # (B, Q) absolute positions

        own_lens = meta.context_lens - meta.shared_lens  # (B,)
        l = torch.arange(int(own_lens.max()), device=device)[None, :]  # (1, L)
        k_pos = meta.shared_lens[:, None] + l  # (B, L)
        k_valid = l < own_lens[:, None]
        k_pos_safe = torch.where(k_valid, k_pos, 0)
        blocks = meta.block_tables.gather(1, k_pos_safe // meta.block_size)
        own_slots = blocks * meta.block_size + k_pos_safe % meta.block_size  # (B, L)
        own_mask = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # (B, Q, L)
        if meta.sliding_window is not None:
            own_mask &= q_pos[:, :, None] - k_pos[:, None, :] < meta.sliding_window

        shared_slots, shared_masks = [], []
        for prefix in meta.shared:
            offsets = torch.arange(meta.block_size, device=device)
            shared_slots.append((prefix.block_ids[:, None] * meta.block_size + offsets).flatten())  # (S,)
            mask = None
            if meta.sliding_window is not None:
                row_pos = q_pos[q_valid][prefix.query_rows]  # (m,)
                s_pos = torch.arange(prefix.num_tokens, device=device)
                mask = (row_pos[:, None] - s_pos[None, :] < meta.sliding_window)[None, None]  # (1, 1, m, S)
            shared_masks.append(mask)
        return {
            "q_index": q_index,
            "q_valid": q_valid,
            "own_slots": own_slots,
            "own_mask": own_mask,
            "shared_slots": shared_slots,
            "shared_masks": shared_masks,
        }
