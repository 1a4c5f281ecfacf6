"""Decode steps replayed from CUDA graphs, one per batch-size bucket, so small batches are not bound by
Python's launch overhead. A graph covers the whole forward (embedding to logits) of one token per sequence
without shared prefixes, reading its inputs from static buffers that each step overwrites."""

from __future__ import annotations

import torch

from parrot_lc.engine.attention import AttentionMetadata
from parrot_lc.engine.models.llama import LlamaForCausalLM

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(
        self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int, max_batch: int, dummy_slot: int
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = max_batch
        self.dummy_slot = dummy_slot  # padding rows write their KV here, in a block no context owns
        self.max_blocks = -(-model.config.max_position_embeddings // block_size)
        device = kv_cache.device
        n = max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), dummy_slot, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def fits(self, batch: int, widest_table: int) -> bool:
        return batch <= self.max_batch and widest_table <= self.max_blocks

    def run(
        self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]], context_lens: list[int]
    ) -> torch.Tensor:
        """One decode token per sequence; returns logits (B, V) float32 (a view, valid until the next run)."""
        batch = len(ids)
        bucket = next(b for b in self.buckets if b >= batch)
        pad = bucket - batch
        width = max(map(len, tables))  # columns past a row's length are never read: no need to clear them
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        # Padding rows: token 0 at position 0, KV written to the dummy slot, no key read (context length 0).
        self.input_ids[:bucket].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:bucket].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:bucket].copy_(torch.tensor(slots + [self.dummy_slot] * pad), non_blocking=True)
        self.context_lens[:bucket].copy_(torch.tensor(context_lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        self.block_tables[:batch, :width].copy_(table, non_blocking=True)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:batch]

    def _forward(self, bucket: int) -> torch.Tensor:
        device = self.kv_cache.device
        rows = torch.arange(bucket + 1, dtype=torch.int32, device=device)
        meta = AttentionMetadata(
            block_size=self.block_size,
            slot_mapping=self.slots[:bucket],
            query_start=rows.long(),
            query_lens=[1] * bucket,
            context_lens=self.context_lens[:bucket].long(),
            block_tables=self.block_tables[:bucket],
            shared_lens=torch.zeros(bucket, dtype=torch.long, device=device),
            shared=[],
            sliding_window=self.model.config.sliding_window,
        )
        # The Triton backend's plan, made from the static buffers so that the graph reads each step's values.
        meta.plan["triton"] = {
            "positions": self.positions[:bucket],
            "own": (rows, rows[:-1], self.block_tables[:bucket], torch.zeros_like(rows[:-1]),
                    self.context_lens[:bucket], 1),
        }
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_cache, meta)  # (B, C)
        return self.model.compute_logits(hidden)  # (B, V)

    @torch.inference_mode()
    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(bucket)  # compiles the kernels and settles the allocator outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward(bucket)
        return graph, logits
