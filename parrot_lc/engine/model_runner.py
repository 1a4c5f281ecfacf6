"""The model over its paged KV cache: built once (the cache sized and allocated, the attention backend warmed up,
CUDA graphs captured), then each step's chunks turned into one flattened batch and run, the logits kept."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from parrot_lc.engine.attention import AttentionBackend, AttentionMetadata, SharedPrefix
from parrot_lc.engine.context import in_flight_row
from parrot_lc.engine.host_to_device import to_device
from parrot_lc.engine.model_config import ModelConfig
from parrot_lc.engine.models.llama import LlamaForCausalLM
from parrot_lc.engine.scheduler import ScheduledChunk
from parrot_lc.settings import EngineSettings, SharedPrefixRule

if TYPE_CHECKING:  # cuda_graphs imports Triton: only an engine that captures graphs loads it
    from parrot_lc.engine.cuda_graphs import DecodeGraphs, SharedGroup


@dataclass
class StepInputs:
    """A step's flattened batch as Python lists, before it becomes tensors."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)


BLOCK_COPIES_PER_LAUNCH = 16  # blocks gathered at once: 16 x 8 MiB for Llama-2-7B's 32 layers
CPU_KV_CACHE_BYTES = 512 * 2**20


def kv_cache_bytes(settings: EngineSettings, device: torch.device) -> int:
    """The KV cache's size: the setting's, else a fraction of the GPU memory left after the weights, else 512 MiB
    on a CPU."""
    if settings.kv_cache_bytes is not None:
        return settings.kv_cache_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * settings.kv_cache_memory_fraction)
    return CPU_KV_CACHE_BYTES


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int, graphs: DecodeGraphs | None = None,
        min_shared_elements: tuple[int, int] = (0, 0), shared_prefix_rule: SharedPrefixRule = "groups",
    ) -> None:
        """`min_shared_elements`: the attention backend's thresholds for reading a shared prefix once, in decode
        steps and in steps with prefill chunks; `shared_prefix_rule`: which sequences may (`shared_groups`)."""
        self.model = model
        self.kv_cache = kv_cache  # (L, 2, num_blocks, block_size, Hkv, D)
        self.block_size = block_size
        self.device = kv_cache.device
        self.graphs = graphs
        self.kv_elements_per_token = kv_cache.shape[-2] * kv_cache.shape[-1]  # Hkv x D, in one layer's K
        self._block_copies: dict[int, int] = {}  # destination block -> source block, for copies not made yet
        self.min_shared_elements_decode, self.min_shared_elements = min_shared_elements
        self.shared_prefix_rule = shared_prefix_rule

    @classmethod
    def create(cls, model: LlamaForCausalLM, config: ModelConfig, backend: AttentionBackend, settings: EngineSettings,
               device: torch.device, dtype: torch.dtype) -> ModelRunner:
        """What a model replica needs before its first step: the KV cache sized and allocated, the attention
        backend warmed up, decode steps captured in CUDA graphs (where they run in graphs)."""
        cfg, bs = config, settings.block_size
        block_bytes = cfg.num_layers * 2 * bs * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
        num_blocks = max(1, kv_cache_bytes(settings, device) // block_bytes)
        # One block more than the allocator hands out: padding rows of CUDA graphs write their KV there.
        kv_cache = torch.zeros(
            cfg.num_layers, 2, num_blocks + 1, bs, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device
        )  # (L, 2, num_blocks + 1, block_size, Hkv, D)
        backend.warm_up(cfg.num_heads, kv_cache[0, 0], kv_cache[0, 1], cfg.sliding_window)
        graphs = None
        if settings.cuda_graphs and device.type == "cuda" and backend.decodes_in_graphs:
            from parrot_lc.engine.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(model, kv_cache, bs, settings.max_num_seqs, dummy_slot=num_blocks * bs)
            graphs.capture_all()
        # A sliding-window model's decode steps read shared prefixes in the prefill path's second pass, so they
        # take the threshold of steps with prefill chunks.
        decode_threshold = (backend.min_shared_elements_decode if cfg.sliding_window is None
                            else backend.min_shared_elements)
        return cls(model, kv_cache, bs, graphs, (decode_threshold, backend.min_shared_elements),
                   settings.shared_prefix_attention)

    @property
    def num_blocks(self) -> int:
        """The blocks the allocator hands out (the cache's last one is CUDA graphs' padding)."""
        return self.kv_cache.shape[2] - 1

    def copy_block(self, src: int, dst: int) -> None:
        """Copies a block's KV in every layer, before the next run reads or writes the cache: the copies of a
        step's forks (their parents' partial last blocks, hundreds when a prompt's users arrive at once) go in
        a few launches rather than one each (a millisecond of host time each on the H100's host)."""
        if dst in self._block_copies.values():  # a freed block that a waiting copy still reads: make that one now
            self._copy_blocks()
        # A block reused as the destination of a later copy takes that one; a copy of a block whose own copy is
        # not made yet reads that copy's source. So no waiting copy reads a block that another one writes.
        self._block_copies[dst] = self._block_copies.get(src, src)

    def _copy_blocks(self) -> None:
        while self._block_copies:
            dst, src = zip(*itertools.islice(self._block_copies.items(), BLOCK_COPIES_PER_LAUNCH))
            # (L, 2, n, block_size, Hkv, D): the sources are gathered before any destination is written.
            self.kv_cache[:, :, self._to_device(list(dst))] = self.kv_cache[:, :, self._to_device(list(src))]
            for block in dst:  # only once made: a launch that fails leaves them for the next run
                del self._block_copies[block]

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], in_flight_tokens: torch.Tensor | None = None) -> None:
        """Computes the chunks' pending tokens; a context whose tokens are then all computed gets its
        next-token logits in `context.last_logits`, and a request that gathers its prompt's log-probabilities
        gets those its chunk gives. Nothing here waits for the device: a token still being
        sampled there (a placeholder, see `in_flight_token`) is read from `in_flight_tokens` (S,), the
        sampled tokens of the step before, on the device."""
        self._copy_blocks()
        chunks = [c for c in chunks if c.num_tokens > 0]
        if not chunks:
            return
        step = self._gather(chunks)
        done = [i for i, c in enumerate(chunks) if c.num_tokens == c.request.context.num_pending]
        block_tables = self._block_tables(step)  # (B, widest table)
        decode = all(n == 1 for n in step.query_lens)
        groups = self._shared_groups(chunks, step.tables, self.min_shared_elements_decode if decode
                                     else self.min_shared_elements)
        input_ids = self._input_ids(step.ids, in_flight_tokens)  # (T,)
        prompt_logprobs = any(c.request.prompt_logprobs is not None for c in chunks)  # logits of more rows
        if self.graphs is not None and decode and not prompt_logprobs and self.graphs.fits(
                len(step.query_lens), block_tables.shape[1], len(groups)):
            logits = self.graphs.run(input_ids, step.positions, step.slots, block_tables, step.context_lens, groups)
            # A copy: the graph's output buffer is overwritten by the next replay.
            logits = logits.clone() if len(done) == len(chunks) else logits[self._to_device(done)]  # (N, V)
        else:
            positions, meta = self._tensors(step, block_tables, groups)
            hidden = self.model(input_ids, positions, self.kv_cache, meta)  # (T, C)
            logits = None
            if done:
                last_rows = torch.tensor(step.query_lens).cumsum(0)[done] - 1  # (N,)
                logits = self.model.compute_logits(hidden[self._to_device(last_rows)])  # (N, V)
            if prompt_logprobs:
                self._gather_prompt_logprobs(chunks, step.query_lens, hidden)
        for chunk in chunks:
            chunk.request.context.num_computed += chunk.num_tokens
        for row, i in enumerate(done):
            chunks[i].request.context.last_logits = logits[row]

    def _gather_prompt_logprobs(
        self, chunks: list[ScheduledChunk], query_lens: list[int], hidden: torch.Tensor
    ) -> None:
        """Hands each request that gathers its prompt's log-probabilities the logits of its chunk's rows that give
        some (hidden: (T, C), the step's rows); before the chunks' contexts count their tokens computed."""
        for chunk, start in zip(chunks, itertools.accumulate(query_lens, initial=0)):
            request, context = chunk.request, chunk.request.context
            if request.prompt_logprobs is None:
                continue
            positions = request.prompt_logprobs.positions(request.fill_start, context.num_computed,
                                                          context.num_computed + chunk.num_tokens)
            if positions:
                first = start + positions.start - context.num_computed
                logits = self.model.compute_logits(hidden[first : first + len(positions)])  # (N, V)
                request.prompt_logprobs.add(logits, request.fill_start, positions)

    def _to_device(self, values: list[int] | torch.Tensor) -> torch.Tensor:
        return to_device(values, self.device)

    def _input_ids(self, ids: list[int], in_flight_tokens: torch.Tensor | None) -> torch.Tensor:
        """The step's token ids (T,) on the device, placeholders replaced by the tokens they stand for."""
        input_ids = self._to_device(ids)
        if min(ids) < 0:
            rows = [i for i, t in enumerate(ids) if t < 0]
            assert in_flight_tokens is not None, "a placeholder token with no step in flight"
            sources = self._to_device([in_flight_row(ids[i]) for i in rows])
            input_ids[self._to_device(rows)] = in_flight_tokens[sources]
        return input_ids

    def _gather(self, chunks: list[ScheduledChunk]) -> StepInputs:
        bs = self.block_size
        step = StepInputs()
        for chunk in chunks:
            ctx = chunk.request.context
            start, end = ctx.num_computed, ctx.num_computed + chunk.num_tokens
            step.ids.extend(ctx.token_ids[start:end])
            step.positions.extend(range(start, end))
            step.slots.extend(ctx.blocks[p // bs] * bs + p % bs for p in range(start, end))
            step.query_lens.append(chunk.num_tokens)
            step.context_lens.append(end)
            step.tables.append(ctx.blocks)
        return step

    def _tensors(
        self, step: StepInputs, block_tables: torch.Tensor, groups: list[SharedGroup]
    ) -> tuple[torch.Tensor, AttentionMetadata]:
        query_start = torch.tensor([0] + step.query_lens).cumsum(0)
        shared, shared_lens = self._shared_prefixes(groups, block_tables, query_start)
        meta = AttentionMetadata(
            block_size=self.block_size,
            slot_mapping=self._to_device(step.slots),
            query_start=self._to_device(query_start),
            query_lens=step.query_lens,
            context_lens=self._to_device(step.context_lens),
            block_tables=self._to_device(block_tables),
            shared_lens=self._to_device(shared_lens),
            shared=shared,
            sliding_window=self.model.config.sliding_window,
        )
        return self._to_device(step.positions), meta

    @staticmethod
    def _block_tables(step: StepInputs) -> torch.Tensor:
        # Row by row into numpy: a third of the host time of torch.tensor over padded lists (128 x 200 blocks).
        tables = np.zeros((len(step.tables), max(len(t) for t in step.tables)), dtype=np.int64)  # (B, width)
        for row, table in zip(tables, step.tables):
            row[: len(table)] = table
        return torch.from_numpy(tables)

    def _shared_groups(
        self, chunks: list[ScheduledChunk], tables: list[list[int]], min_shared_elements: int
    ) -> list[SharedGroup]:
        """The step's shared groups (`shared_groups`) but those too small for the backend's shared pass to pay:
        each sequence reads those as part of its own KV."""
        computed = [chunk.request.context.num_computed for chunk in chunks]
        groups = shared_groups(tables, computed, self.block_size, self.shared_prefix_rule)
        per_block = self.block_size * self.kv_elements_per_token
        return [(members, num_blocks) for members, num_blocks in groups
                if (len(members) - 1) * num_blocks * per_block >= min_shared_elements]

    def _shared_prefixes(
        self, groups: list[SharedGroup], block_tables: torch.Tensor, query_start: torch.Tensor
    ) -> tuple[list[SharedPrefix], torch.Tensor]:
        """The shared prefixes of the step's groups (see `_shared_groups`) and each sequence's shared length."""
        shared: list[SharedPrefix] = []
        shared_lens = torch.zeros(len(block_tables), dtype=torch.long)
        for members, num_blocks in groups:
            rows = torch.cat([torch.arange(query_start[i], query_start[i + 1]) for i in members])
            shared.append(
                SharedPrefix(
                    seq_indices=self._to_device(members),
                    query_rows=self._to_device(rows),
                    block_ids=self._to_device(block_tables[members[0], :num_blocks]),
                    num_tokens=num_blocks * self.block_size,
                )
            )
            shared_lens[members] = num_blocks * self.block_size
        return shared, shared_lens


def shared_groups(
    tables: list[list[int]], num_computed: list[int], block_size: int, rule: SharedPrefixRule = "groups"
) -> list[SharedGroup]:
    """(members, number of blocks) of each group of a step's sequences whose block tables start with the same
    blocks, which the attention backend reads once for all of them. A block appears in two tables only when one
    context inherited it from an ancestor or both took it from the block cache (whose keys cover every token
    before a block), and always at the same index, so those blocks are one shared prefix. Only blocks computed
    before this step (`num_computed`: each sequence's tokens computed before it) can be shared: this step's tokens
    are each sequence's own.

    `rule` (the `shared_prefix_attention` setting): `groups`, every such group (several prefixes in one step);
    `whole_batch`, one group only where every sequence of the step shares a prefix, else none (vLLM's cascade
    attention: a prefix common to the whole batch); `off`, none."""
    if rule == "off":
        return []
    by_first_block: dict[int, list[int]] = defaultdict(list)
    for i, (table, computed) in enumerate(zip(tables, num_computed)):
        if computed >= block_size:
            by_first_block[table[0]].append(i)
    if rule == "whole_batch" and [len(m) for m in by_first_block.values()] != [len(tables)]:
        return []
    groups = []
    for members in by_first_block.values():
        if len(members) < 2:
            continue
        num_blocks = min(num_computed[i] for i in members) // block_size
        first = tables[members[0]]
        for i in members[1:]:  # list slices compare in C; forks of one parent agree at once
            if tables[i][:num_blocks] != first[:num_blocks]:
                num_blocks = next(k for k, (a, b) in enumerate(zip(first, tables[i])) if a != b)
        if num_blocks > 0:
            groups.append((members, num_blocks))
    return groups
