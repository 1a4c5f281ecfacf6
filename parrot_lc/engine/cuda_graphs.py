"""Decode steps replayed from CUDA graphs, one per batch-size bucket and number of shared-prefix groups, so
that small batches are not bound by Python's launch overhead. A graph covers the whole forward (embedding to
logits) of one token per sequence, reading its inputs from static buffers that each step overwrites; the
sequences of a group read their shared prefix once (the fused decode kernel's layout, `DecodeLayout`)."""

from __future__ import annotations

import torch

from parrot_lc.engine.attention import AttentionMetadata, DecodeLayout
from parrot_lc.engine.host_to_device import to_device
from parrot_lc.engine.models.llama import LlamaForCausalLM
from parrot_lc.engine.triton_attention import rows_per_tile, shared_splits

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
GROUP_BUCKETS = (0, 1, 2, 4, 8)  # shared-prefix groups a graph has room for; a step with more runs eagerly

SharedGroup = tuple[list[int], int]  # (the batch rows of the sequences that share it, its number of blocks)


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
        # Shared prefixes: each sequence's own KV starts after its group's prefix; group g holds the rows
        # group_rows[group_ptr[g]:group_ptr[g + 1]] and reads the prefix's group_lens[g] tokens once.
        groups = GROUP_BUCKETS[-1]
        self.shared_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.group_ptr = torch.zeros(groups + 1, dtype=torch.int32, device=device)
        self.group_rows = torch.zeros(n, dtype=torch.int32, device=device)
        self.group_tables = torch.zeros(groups, self.max_blocks, dtype=torch.int32, device=device)
        self.group_lens = torch.zeros(groups, dtype=torch.int32, device=device)
        self.no_shared = torch.zeros(n, dtype=torch.int32, device=device)
        self.logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()  # one memory pool: graphs replay one at a time

    def capture_all(self) -> None:
        """Captures every graph up front, largest first (they share one memory pool), so that no request
        waits for a capture. A group needs two sequences: a bucket gets a graph of up to g groups when the
        fewest groups rounded up to g (one more than the group bucket below) fit in it."""
        for bucket in reversed(self.buckets):
            for below, group_bucket in zip((-1, *GROUP_BUCKETS), GROUP_BUCKETS):
                if group_bucket == 0 or 2 * (below + 1) <= bucket:
                    self._graphs[(bucket, group_bucket)] = self._capture(bucket, group_bucket)

    def fits(self, batch: int, widest_table: int, num_groups: int = 0) -> bool:
        return batch <= self.max_batch and widest_table <= self.max_blocks and num_groups <= GROUP_BUCKETS[-1]

    def run(
        self, input_ids: torch.Tensor, positions: list[int], slots: list[int], block_tables: torch.Tensor,
        context_lens: list[int], groups: list[SharedGroup] = (),
    ) -> torch.Tensor:
        """One decode token per sequence; returns logits (B, V) float32 (a view, valid until the next run).
        `input_ids`: (B,) on the device; `block_tables`: (B, widest table) on the CPU, rows padded past their
        length (never read). Nothing here waits for the device."""
        batch = len(positions)
        bucket = next(b for b in self.buckets if b >= batch)
        group_bucket = next(g for g in GROUP_BUCKETS if g >= len(groups))
        pad = bucket - batch
        width = block_tables.shape[1]  # columns past a row's length are never read: no need to clear them
        # Padding rows: position 0, KV written to the dummy slot, no key read (context length 0); their token is
        # whatever an earlier step left, a valid id.
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:bucket].copy_(self._on_device(positions + [0] * pad))
        self.slots[:bucket].copy_(self._on_device(slots + [self.dummy_slot] * pad))
        self.context_lens[:bucket].copy_(self._on_device(context_lens + [0] * pad, torch.int32))
        self.block_tables[:batch, :width].copy_(self._on_device(block_tables))
        if group_bucket:
            self._set_groups(groups, block_tables, bucket, group_bucket)
        key = (bucket, group_bucket)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bucket, group_bucket)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:batch]

    def _on_device(self, values: list[int] | torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return to_device(values, self.kv_cache.device, dtype)

    def _set_groups(self, groups: list[SharedGroup], block_tables: torch.Tensor, bucket: int, group_bucket: int) -> None:
        shared_lens, rows, ptr, lens = [0] * bucket, [], [0], []
        tables = torch.zeros(len(groups), block_tables.shape[1], dtype=block_tables.dtype)  # (G, width)
        for g, (members, num_blocks) in enumerate(groups):
            rows += members
            ptr.append(len(rows))
            lens.append(num_blocks * self.block_size)
            for member in members:
                shared_lens[member] = num_blocks * self.block_size
            # The prefix's blocks: the first ones of any member's table (its first member's).
            tables[g, :num_blocks] = block_tables[members[0], :num_blocks]
        unused = group_bucket - len(groups)  # empty groups: no rows, no keys
        self.group_tables[: len(groups), : tables.shape[1]].copy_(self._on_device(tables))
        self.shared_lens[:bucket].copy_(self._on_device(shared_lens, torch.int32))
        self.group_rows[: len(rows)].copy_(self._on_device(rows, torch.int32))
        self.group_ptr[: group_bucket + 1].copy_(self._on_device(ptr + [len(rows)] * unused, torch.int32))
        self.group_lens[:group_bucket].copy_(self._on_device(lens + [0] * unused, torch.int32))

    def _forward(self, bucket: int, group_bucket: int) -> torch.Tensor:
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
        plan = meta.plan["triton"] = {"positions": self.positions[:bucket]}
        if meta.sliding_window is None:
            plan["decode"] = self._decode_layout(bucket, group_bucket)
        else:
            self._windowed_plan(plan, bucket, group_bucket)
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_cache, meta)  # (B, C)
        # Into the one output buffer of every graph; the graph's own temporaries go back to the shared pool.
        return self.logits[:bucket].copy_(self.model.compute_logits(hidden))  # (B, V)

    def _decode_layout(self, bucket: int, group_bucket: int) -> DecodeLayout:
        shared = group_bucket > 0
        return DecodeLayout(
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket],
            # Without groups the shared lengths stay 0 whatever an earlier step with groups left in them.
            shared_lens=self.shared_lens[:bucket] if shared else self.no_shared[:bucket],
            group_ptr=self.group_ptr[: group_bucket + 1],
            group_rows=self.group_rows[:bucket],
            group_tables=self.group_tables[:group_bucket],
            group_lens=self.group_lens[:group_bucket],
            max_group=bucket if shared else 0,
            max_context=self.max_blocks * self.block_size,
        )

    def _windowed_plan(self, plan: dict, bucket: int, group_bucket: int) -> None:
        """A sliding-window model's decode: own parts and shared prefixes in two passes of the paged kernel."""
        device = self.kv_cache.device
        rows = torch.arange(bucket + 1, dtype=torch.int32, device=device)
        shared_lens = self.shared_lens[:bucket] if group_bucket else self.no_shared[:bucket]
        plan["own"] = (rows, rows[:-1], self.block_tables[:bucket], shared_lens, self.context_lens[:bucket], 1)
        if group_bucket:
            num_kv_heads = self.kv_cache.shape[-2]
            plan["shared"] = (self.group_ptr[: group_bucket + 1], self.group_rows[:bucket],
                              self.group_tables[:group_bucket], self.no_shared[:group_bucket],
                              self.group_lens[:group_bucket], bucket)
            # Every row is merged: a row in no group has the shared pass's empty result (lse -inf), which leaves
            # its own result as it is; a padding row has neither and comes out 0.
            plan["shared_rows"] = rows[:-1].long()
            tiles = -(-bucket // rows_per_tile(bucket, self.model.config.num_heads // num_kv_heads))
            plan["splits"] = shared_splits(device, group_bucket * num_kv_heads * tiles,
                                           self.max_blocks * self.block_size)

    @torch.inference_mode()
    def _capture(self, bucket: int, group_bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(bucket, group_bucket)  # compiles the kernels and settles the allocator outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(bucket, group_bucket)
        return graph, logits
