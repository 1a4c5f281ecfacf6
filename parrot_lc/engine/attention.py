"""Attention over the paged KV cache, behind a backend interface.

Every backend sees the same step metadata: the new tokens of each sequence, where their KV goes, each
sequence's block table, and the groups of sequences whose block tables begin with the same blocks (a shared
ancestor context). A backend computes the shared part once per group and each sequence's own part alone, and
merges the two by log-sum-exp; the torch reference here does that with plain tensor ops on any device.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from parrot_lc.settings import SettingsError


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


@dataclass
class DecodeLayout:
    """A decode step (one query row per sequence, row b is sequence b) laid out for the fused decode kernels.

    Group g's sequences are group_rows[group_ptr[g]:group_ptr[g + 1]]; they read the group's first
    group_lens[g] KV tokens (the blocks group_tables[g]) once, together, and each reads its own KV
    [shared_lens[b], context_lens[b]) through its block table. A sequence in no group has shared_lens 0; a
    padding row has context_lens 0 and comes out 0. Every tensor is int32 on the cache's device, so that a
    CUDA graph can read each step's values from the same buffers.
    """

    block_tables: torch.Tensor  # (B, max_blocks)
    context_lens: torch.Tensor  # (B,)
    shared_lens: torch.Tensor  # (B,), a multiple of the block size
    group_ptr: torch.Tensor  # (num_groups + 1,)
    group_rows: torch.Tensor  # (>= group_ptr[-1],)
    group_tables: torch.Tensor  # (num_groups, max_prefix_blocks)
    group_lens: torch.Tensor  # (num_groups,)
    max_group: int  # the most sequences one group may hold (sizes the kernels' grids)
    max_context: int  # the longest KV range any row may read (sizes the KV splits)

    @property
    def num_groups(self) -> int:
        return self.group_ptr.numel() - 1

    @classmethod
    def of_step(cls, meta: AttentionMetadata) -> DecodeLayout:
        """The layout of a decode step given as metadata (every query length 1)."""
        device, i32 = meta.slot_mapping.device, torch.int32
        sizes = [p.seq_indices.numel() for p in meta.shared]
        width = max((p.block_ids.numel() for p in meta.shared), default=1)
        group_tables = torch.zeros(len(sizes), width, dtype=i32, device=device)
        for i, prefix in enumerate(meta.shared):
            group_tables[i, : prefix.block_ids.numel()] = prefix.block_ids
        rows = [p.seq_indices for p in meta.shared]
        return cls(
            block_tables=meta.block_tables.to(i32),
            context_lens=meta.context_lens.to(i32),
            shared_lens=meta.shared_lens.to(i32),
            group_ptr=torch.tensor([0] + sizes, device=device).cumsum(0).to(i32),
            group_rows=torch.cat(rows).to(i32) if rows else torch.zeros(1, dtype=i32, device=device),
            group_tables=group_tables,
            group_lens=torch.tensor([p.num_tokens for p in meta.shared], dtype=i32, device=device),
            max_group=max(sizes, default=0),
            # The widest table bounds every range, as in a CUDA graph, and is known without a device sync.
            max_context=meta.block_tables.shape[1] * meta.block_size,
        )


def multiprocessors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors: what the kernels size their grids by."""
    return device_properties(device).multi_processor_count


def device_properties(device: torch.device):  # noqa: ANN201 - torch's property class exists only in CUDA builds
    """torch.cuda.get_device_properties of the device, asked once a device (plans read it at every step)."""
    return _device_properties(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _device_properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


class AttentionBackend(ABC):
    """Writes the step's new K/V into the cache, then attends each query row over its sequence's KV."""

    name: str
    # A shared prefix is read once for its group only when that saves at least this many K (and as many V)
    # elements, (group size - 1) x prefix tokens x KV heads x head dim; smaller ones are read per sequence.
    # One threshold for pure decode steps (one token per sequence), one for steps with prefill chunks.
    min_shared_elements_decode: int = 0
    min_shared_elements: int = 0
    decodes_in_graphs: bool = False  # whether its decode steps can be captured in CUDA graphs (cuda_graphs.py)

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

    def warm_up(self, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, sliding_window: int | None) -> None:
        """Compiles, before the first request, what steps would otherwise compile when they first need it
        (nothing, unless the backend compiles kernels at run time). Reads the caches, writes nothing to them."""


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[1:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combines two softmax-attention results over disjoint key sets. out: (..., D), lse: (...). A row that saw
    no key in either (lse -inf in both: a padding row) comes out 0, not NaN."""
    lse = torch.logaddexp(lse_a, lse_b).nan_to_num(neginf=0.0)
    return out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention, returning (out, lse); q comes scaled, and every tensor has one float dtype.

    q: (..., M, D), k and v: (..., L, D), bias: broadcastable to (..., M, L), 0 where a key is seen and -inf
    where it is masked. Returns out (..., M, D) and lse (..., M).
    """
    scores = q @ k.transpose(-1, -2)  # (..., M, L)
    if bias is not None:
        scores += bias
    # Softmax as flash attention does it: one pass of exp, the normalisation after the product with v, and the
    # lse from the row max and sum. A row with every key masked (sliding window) subtracts 0 and sums to 0.
    row_max = scores.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)  # (..., M, 1)
    probs = scores.sub_(row_max).exp_()
    total = probs.sum(dim=-1, keepdim=True)  # (..., M, 1)
    # A seen row sums to at least 1 (its max contributes exp(0)), so the clamp only turns 0 / 0 into out 0;
    # such a row's lse is -inf, which the merge then ignores.
    out = (probs @ v) / total.clamp(min=1.0)
    return out, (row_max + total.log()).squeeze(-1)


def gather_heads(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The KV of whole blocks, head first: cache (num_blocks, block_size, Hkv, D), block_ids (..., n) ->
    (Hkv, ..., n * block_size, D). Whole blocks are contiguous, so this copies large rows (index_select)."""
    kv = cache.index_select(0, block_ids.flatten())  # (N * n, block_size, Hkv, D)
    return kv.view(*block_ids.shape[:-1], -1, *cache.shape[2:]).movedim(-2, 0)


class TorchReferenceBackend(AttentionBackend):
    """Readable, device-agnostic attention in float32: the reference the fast kernels are tested against, and the
    CPU's attention.

    A step without shared prefixes is one fused attention (torch's scaled_dot_product_attention) over each
    sequence's KV. With them, grouped-query heads are folded into query rows, so that each part is one batched
    matrix product per KV head and sequence: q laid out (Hkv, B, G * Q, D) against KV gathered as (Hkv, B, L, D),
    with K and V read once, never repeated per query head.
    """

    name = "torch"
    # On a CPU a second pass and its merge cost more than gathering a small prefix's KV per sequence saves: 8
    # forks of SmolLM2 on a 150-token prefix took 100 ms a decode step with it, 70 without (AMD EPYC, 2 threads).
    # A prefix is read once for its group where that saves at least 4 MiB of float32 K per layer (as much V).
    min_shared_elements_decode = 2**20
    min_shared_elements = 2**20

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        plan = meta.plan.get("torch") or meta.plan.setdefault("torch", self._plan(meta, group))
        if not meta.shared:
            return self._own_kv_only(q, k_cache, v_cache, plan, scale)
        qs = q.float() * scale  # (T, Hq, D)

        # Own part: each sequence's blocks after its shared prefix, padded to (B, L) and masked.
        batch, max_q = plan["q_index"].shape
        q_own = qs[plan["q_index"]].view(batch, max_q, num_kv_heads, group, head_dim)
        q_own = q_own.permute(2, 0, 3, 1, 4).reshape(num_kv_heads, batch, group * max_q, head_dim)
        k_own = gather_heads(k_cache, plan["own_blocks"]).float()  # (Hkv, B, L, D)
        v_own = gather_heads(v_cache, plan["own_blocks"]).float()
        own_bias = plan["own_bias"][:, 0].repeat(1, group, 1)  # (B, G * Q, L): query rows run (G, Q)
        out, lse = attend(q_own, k_own, v_own, own_bias)  # (Hkv, B, G * Q, D), (Hkv, B, G * Q)
        # Back to rows: (Hkv, B, G, Q, D) -> (B, Q, Hkv, G, D) -> (T, Hq, D), dropping padding rows.
        out = out.view(num_kv_heads, batch, group, max_q, head_dim).permute(1, 3, 0, 2, 4)
        out = out.reshape(batch * max_q, num_heads, head_dim)[plan["q_rows"]]
        if meta.shared:
            lse = lse.view(num_kv_heads, batch, group, max_q).permute(1, 3, 0, 2)
            lse = lse.reshape(batch * max_q, num_heads)[plan["q_rows"]]  # (T, Hq)

        # Shared part: one pass per group over KV read once, for all of the group's query rows.
        for prefix, bias in zip(meta.shared, plan["shared_biases"]):
            rows = prefix.query_rows
            q_s = qs[rows].view(-1, num_kv_heads, group, head_dim)  # (m, Hkv, G, D)
            q_s = q_s.permute(1, 2, 0, 3).reshape(num_kv_heads, -1, head_dim)  # (Hkv, G * m, D)
            k_s = gather_heads(k_cache, prefix.block_ids).float()  # (Hkv, S, D)
            v_s = gather_heads(v_cache, prefix.block_ids).float()
            out_s, lse_s = attend(q_s, k_s, v_s, bias)
            out_s = out_s.view(num_kv_heads, group, -1, head_dim).permute(2, 0, 1, 3).reshape(-1, num_heads, head_dim)
            lse_s = lse_s.view(num_kv_heads, group, -1).permute(2, 0, 1).reshape(-1, num_heads)  # (m, Hq)
            out[rows] = merge_by_lse(out[rows], lse[rows], out_s, lse_s)
        return out.to(q.dtype)

    @staticmethod
    def _own_kv_only(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: dict, scale: float):
        """Each sequence over its own KV, in one fused attention (no log-sum-exp: nothing to merge with)."""
        num_heads, head_dim = q.shape[1:]
        batch, max_q = plan["q_index"].shape
        q_own = q.float().unsqueeze(1) if max_q == 1 else q.float()[plan["q_index"]]  # (B, Q, Hq, D)
        q_own = q_own.transpose(1, 2)  # (B, Hq, Q, D)
        k_own = gather_heads(k_cache, plan["own_blocks"]).transpose(0, 1).float()  # (B, Hkv, L, D)
        v_own = gather_heads(v_cache, plan["own_blocks"]).transpose(0, 1).float()
        out = F.scaled_dot_product_attention(q_own, k_own, v_own, attn_mask=plan["own_bias"], scale=scale,
                                             enable_gqa=True)  # (B, Hq, Q, D)
        out = out.transpose(1, 2).reshape(batch * max_q, num_heads, head_dim)  # (B * Q, Hq, D)
        return (out if max_q == 1 else out[plan["q_rows"]]).to(q.dtype)  # (T, Hq, D): padding rows dropped

    @staticmethod
    def _plan(meta: AttentionMetadata, group: int) -> dict[str, torch.Tensor | list]:
        device, bs = meta.slot_mapping.device, meta.block_size
        q_lens = torch.tensor(meta.query_lens, device=device)  # (B,)
        max_q = max(meta.query_lens)
        j = torch.arange(max_q, device=device)[None, :]  # (1, Q)
        q_valid = j < q_lens[:, None]  # (B, Q)
        q_index = torch.where(q_valid, meta.query_start[:-1, None] + j, 0)  # padding rows read row 0, then drop out
        q_pos = meta.context_lens[:, None] - q_lens[:, None] + j  # (B, Q) absolute positions

        # A shared prefix is whole blocks, so each sequence's own KV starts at a block of its table.
        first_block = meta.shared_lens // bs  # (B,)
        num_blocks = (meta.context_lens + bs - 1) // bs - first_block  # (B,)
        n = torch.arange(int(num_blocks.max()), device=device)[None, :]  # (1, n)
        columns = (first_block[:, None] + n).clamp(max=meta.block_tables.shape[1] - 1)
        own_blocks = meta.block_tables.gather(1, columns)  # (B, n), past a table's end: any block, masked
        k_pos = first_block[:, None] * bs + torch.arange(n.shape[1] * bs, device=device)[None, :]  # (B, L)
        own_mask = (k_pos < meta.context_lens[:, None])[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
        if meta.sliding_window is not None:  # own_mask: (B, Q, L)
            own_mask &= q_pos[:, :, None] - k_pos[:, None, :] < meta.sliding_window

        shared_biases = []
        for prefix in meta.shared:
            bias = None
            if meta.sliding_window is not None:
                row_pos = q_pos[q_valid][prefix.query_rows]  # (m,)
                s_pos = torch.arange(prefix.num_tokens, device=device)
                bias = _bias(row_pos[:, None] - s_pos[None, :] < meta.sliding_window).repeat(group, 1)  # (G * m, S)
            shared_biases.append(bias)
        return {
            "q_index": q_index,
            "q_rows": q_valid.flatten().nonzero().flatten(),  # (T,) rows of (B * Q) that are real queries
            "own_blocks": own_blocks,
            "own_bias": _bias(own_mask)[:, None],  # (B, 1, Q, L)
            "shared_biases": shared_biases,
        }


def _bias(mask: torch.Tensor) -> torch.Tensor:
    """An additive float32 mask: 0 where `mask` is True, -inf where it is False."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """The attention backend a setting names. `auto`: on a GPU the CUDA decode kernel where the extension is
    built (Triton for everything else), else Triton; on a CPU the compiled decode kernel where it is built and the
    CPU has what it uses (cpu_kernels), else the torch reference. A backend that cannot run on the device is
    refused here, at start-up (SettingsError), not at the first request."""
    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        from parrot_lc.engine import cpu_kernels
        from parrot_lc.engine.cpu_attention import CpuDecodeBackend

        if device.type == "cpu" and cpu_kernels.available():
            return CpuDecodeBackend()
        if name == "cpu":
            raise SettingsError("attention_backend 'cpu' needs a CPU device, an x86-64 CPU with AVX2, FMA and F16C, "
                                "and the parrot_lc._cpu extension (built by scripts/install.sh where a C++ compiler "
                                "is found)")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchReferenceBackend()
    if device.type != "cuda" and not _triton_interprets():
        raise SettingsError(f"attention_backend {name!r} needs a CUDA device (this engine's is {device.type}); "
                            "on a CPU use auto, cpu or torch")
    from parrot_lc.engine import cuda_attention
    from parrot_lc.engine.triton_attention import TritonBackend

    if name == "cuda" and (device.type != "cuda" or not cuda_attention.available()):
        raise SettingsError("attention_backend 'cuda' needs a CUDA device of sm_80 or newer and the parrot_lc._cuda "
                            "extension (built by setup.py where torch has CUDA and nvcc is found)")
    if name == "cuda" or (name == "auto" and cuda_attention.available()):
        return cuda_attention.CudaBackend()
    return TritonBackend()


def _triton_interprets() -> bool:
    """Whether Triton is installed and runs its kernels in its CPU interpreter (TRITON_INTERPRET=1, as the tests
    set): then its backend runs on a CPU device too."""
    try:
        import triton
    except ImportError:
        return False
    return bool(triton.knobs.runtime.interpret)
