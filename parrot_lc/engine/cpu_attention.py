"""Decode attention on a CPU in one compiled call (cpu_kernels.decode_attention).

A decode step's attention is small on a CPU (one query row per sequence, a few hundred keys), so as torch ops its
cost is their number: the reference gathers each sequence's blocks, builds a mask and runs torch's fused attention,
~10 ops a layer. Here one call writes the new K and V and attends each sequence over its whole block table, a
shared prefix's blocks included: on a CPU a prefix read per sequence costs less than a second pass and a merge (see
TorchReferenceBackend's thresholds). Steps with prompt tokens, sliding windows or other dtypes run the reference.
"""

from __future__ import annotations

import torch

from parrot_lc.engine import cpu_kernels
from parrot_lc.engine.attention import TorchReferenceBackend


class CpuDecodeBackend(TorchReferenceBackend):
    name = "cpu"
    # Decode steps read each sequence's whole table, so the model runner need not group them (steps with prompt
    # tokens keep the reference's threshold).
    min_shared_elements_decode = 2**62

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        decode = len(meta.query_lens) == q.shape[0]  # one query row per sequence
        if not decode or meta.sliding_window is not None or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        return cpu_kernels.decode_attention(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.block_tables,
                                            meta.context_lens, scale)  # (B, Hq, D)
