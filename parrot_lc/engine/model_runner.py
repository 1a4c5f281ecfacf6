"""Turns a step's chunks into one flattened batch, runs the model over the paged cache, keeps the logits."""

from __future__ import annotations

from collections import defaultdict

import torch

from parrot_lc.engine.attention import AttentionMetadata, SharedPrefix
from parrot_lc.engine.models.llama import LlamaForCausalLM
from parrot_lc.engine.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache  # (L, 2, num_blocks, block_size, Hkv, D)
        self.block_size = block_size
        self.device = kv_cache.device

    def copy_block(self, src: int, dst: int) -> None:
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> None:
        """Computes the chunks' pending tokens; a context whose tokens are then all computed gets its
        next-token logits in `context.last_logits`."""
        chunks = [c for c in chunks if c.num_tokens > 0]
        if not chunks:
            return
        input_ids, positions, meta = self._prepare(chunks)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)  # (T, C)
        done = [i for i, c in enumerate(chunks) if c.num_tokens == c.request.context.num_pending]
        logits = None
        if done:
            last_rows = (meta.query_start[1:] - 1)[done]  # (N,)
            logits = self.model.compute_logits(hidden[last_rows])  # (N, V)
        for chunk in chunks:
            chunk.request.context.num_computed += chunk.num_tokens
        for row, i in enumerate(done):
            chunks[i].request.context.last_logits = logits[row]

    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        query_lens, context_lens, tables = [], [], []
        for chunk in chunks:
            ctx = chunk.request.context
            start, end = ctx.num_computed, ctx.num_computed + chunk.num_tokens
            ids.extend(ctx.token_ids[start:end])
            pos.extend(range(start, end))
            slots.extend(ctx.blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(chunk.num_tokens)
            context_lens.append(end)
            tables.append(ctx.blocks)
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        query_start = torch.tensor([0] + query_lens).cumsum(0)
        shared, shared_lens = self._shared_prefixes(chunks, block_tables, query_start)
        device = self.device
        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_start=query_start.to(device),
            query_lens=query_lens,
            context_lens=torch.tensor(context_lens, dtype=torch.long, device=device),
            block_tables=block_tables.to(device),
            shared_lens=shared_lens.to(device),
            shared=shared,
            sliding_window=self.model.config.sliding_window,
        )
        return (
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(pos, dtype=torch.long, device=device),
            meta,
        )

    def _shared_prefixes(
        self, chunks: list[ScheduledChunk], block_tables: torch.Tensor, query_start: torch.Tensor
    ) -> tuple[list[SharedPrefix], torch.Tensor]:
        """Groups sequences whose block tables start with the same blocks; a block appears in two tables
        only when one context inherited it from an ancestor, so those blocks are one shared prefix."""
        by_first_block: dict[int, list[int]] = defaultdict(list)
        for i, chunk in enumerate(chunks):
            if chunk.request.context.num_computed >= self.block_size:
                by_first_block[int(block_tables[i, 0])].append(i)
        shared: list[SharedPrefix] = []
        shared_lens = torch.zeros(len(chunks), dtype=torch.long)
        for members in by_first_block.values():
            if len(members) < 2:
                continue
            tables = block_tables[members]  # (n, max_blocks)
            # Only blocks computed before this step can be shared: this step's tokens are each sequence's own.
            limit = min(chunks[i].request.context.num_computed // self.block_size for i in members)
            same = (tables[:, :limit] == tables[:1, :limit]).all(dim=0)
            num_blocks = int(same.long().cumprod(0).sum())
            if num_blocks == 0:
                continue
            rows = torch.cat([torch.arange(query_start[i], query_start[i + 1]) for i in members])
            shared.append(
                SharedPrefix(
                    seq_indices=torch.tensor(members, device=self.device),
                    query_rows=rows.to(self.device),
                    block_ids=tables[0, :num_blocks].to(self.device),
                    num_tokens=num_blocks * self.block_size,
                )
            )
            shared_lens[members] = num_blocks * self.block_size
        return shared, shared_lens
