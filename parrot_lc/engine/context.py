"""Contexts and the tree they form: a context's KV is its ancestors' KV followed by its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable

import torch

from parrot_lc.engine.block_allocator import BlockAllocator
from parrot_lc.engine.block_cache import block_key
from parrot_lc.engine.errors import ContextNotFoundError, InvalidRequestError, OutOfMemoryError

if TYPE_CHECKING:
    from parrot_lc.engine.request import Request

ContextId = Hashable


def in_flight_token(row: int) -> int:
    """The placeholder a context holds for a token sampled in the step still on the device, in row `row` of
    that step's sampled tokens: negative, so that it can never be taken for a token id."""
    return -1 - row


def in_flight_row(placeholder: int) -> int:
    """The row of the in-flight step's sampled tokens that `placeholder` (`in_flight_token`) stands for."""
    return -1 - placeholder


@dataclass(eq=False)
class Context:
    """One node of the context tree: a token sequence whose KV lives in `blocks`.

    `token_ids` holds every token of the context, ancestors' included; the first `num_computed` of them have
    KV in the cache, the rest are pending (filled or generated, not yet run through the model). A token sampled
    in a step whose results are not back from the device yet is a negative placeholder (`in_flight_token`) at
    the end, which the next step can already compute. The first
    `num_inherited_blocks` blocks are the parent's full blocks, held by reference, never written; so are blocks
    taken from the block cache, and the first `num_indexed_blocks` blocks may be in the cache, read by others.
    """

    context_id: ContextId
    parent: "Context | None" = None
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    num_inherited_blocks: int = 0
    block_keys: list[bytes] = field(default_factory=list)  # keys (`block_key`) of its leading full blocks' tokens
    num_indexed_blocks: int = 0  # leading blocks offered to the block cache: computed, and keyed
    num_cached: int = 0  # tokens it got without computing them: its parent's at the fork, block cache hits
    recompute_end: int = 0  # tokens before this were computed, then dropped by preemption: no hits when taken again
    last_logits: torch.Tensor | None = None  # (V,) float32, next-token logits once every token is computed
    active_request: "Request | None" = None
    forked: bool = True  # False while a fork waits for its parent's in-flight request
    num_waiting_forks: int = 0  # children waiting to fork from this context: it takes no new request until then
    freed: bool = False

    @property
    def busy(self) -> bool:
        return self.active_request is not None or self.num_waiting_forks > 0

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed


class ContextTree:
    """Owns every context and the blocks they hold; forks copy no full block of KV. With the allocator's block
    cache, contexts also share full blocks by content: whatever a context computes is indexed, and a context
    takes the cached blocks that hold its next tokens instead of computing them."""

    def __init__(
        self, allocator: BlockAllocator, block_size: int, copy_block: Callable[[int, int], None]
    ) -> None:
        self.allocator = allocator
        self.cache = allocator.cache
        self.block_size = block_size
        self._copy_block = copy_block
        self._contexts: dict[ContextId, Context] = {}
        self.reused_tokens = 0  # tokens whose KV a fork got without computing it
        self.cached_tokens = 0  # tokens whose KV a context took from the block cache (recomputations not counted)

    def __contains__(self, context_id: ContextId) -> bool:
        return context_id in self._contexts

    def __len__(self) -> int:
        return len(self._contexts)

    def get(self, context_id: ContextId) -> Context:
        try:
            return self._contexts[context_id]
        except KeyError:
            raise ContextNotFoundError(f"unknown context {context_id!r}") from None

    def create(self, context_id: ContextId, parent: Context | None = None) -> Context:
        """Registers a context; with a parent it is forked at once when the parent is idle, else later."""
        if context_id in self._contexts:
            raise InvalidRequestError(f"context {context_id!r} already exists")
        context = Context(context_id, parent=parent, forked=parent is None)
        self._contexts[context_id] = context
        if parent is not None:
            parent.num_waiting_forks += 1
            if parent.active_request is None:
                try:
                    self.fork(context)
                except OutOfMemoryError:
                    pass  # the fork waits for a free block, like any request
        return context

    def fork(self, child: Context) -> None:
        """Gives `child` its parent's KV: full blocks by reference, the partial last block copied."""
        parent = child.parent
        assert parent is not None and not child.forked
        if parent.freed:  # the fork never comes to exist
            self.free(child.context_id)
            raise ContextNotFoundError(f"parent context {parent.context_id!r} was freed before the fork")
        num_full = parent.num_computed // self.block_size
        partial = parent.num_computed % self.block_size > 0
        if partial and self.allocator.num_free == 0:
            raise OutOfMemoryError("no free KV block for the fork's copy of its parent's partial block")
        child.blocks = parent.blocks[:num_full]
        for block in child.blocks:
            self.allocator.incref(block)
        child.num_inherited_blocks = num_full
        if partial:
            copy = self.allocator.allocate()
            self._copy_block(parent.blocks[num_full], copy)
            child.blocks.append(copy)
        child.token_ids = list(parent.token_ids) + child.token_ids
        child.block_keys = list(parent.block_keys)  # keys of the same tokens
        child.num_indexed_blocks = min(num_full, parent.num_indexed_blocks)
        child.num_computed = parent.num_computed
        child.num_cached = parent.num_computed
        child.last_logits = parent.last_logits
        parent.num_waiting_forks -= 1
        child.forked = True
        self.reused_tokens += parent.num_computed

    def free(self, context_id: ContextId) -> Context:
        context = self.get(context_id)
        del self._contexts[context_id]
        if not context.forked:
            context.parent.num_waiting_forks -= 1
        for block in context.blocks:
            self.allocator.decref(block)
        context.blocks = []
        context.freed = True
        return context

    def tokens_that_fit(self, context: Context) -> int:
        """How many more tokens this context can compute with its own room plus every free block."""
        room = len(context.blocks) * self.block_size - context.num_computed
        return room + self.allocator.num_free * self.block_size

    def reserve(self, context: Context, num_tokens: int) -> None:
        """Allocates blocks so that `num_tokens` more tokens can be computed (caller checked they fit)."""
        needed = context.num_computed + num_tokens
        while len(context.blocks) * self.block_size < needed:
            context.blocks.append(self.allocator.allocate())

    def release_own_blocks(self, context: Context) -> None:
        """Preemption: drops the context's own KV; its tokens stay, to be recomputed later (or taken back from the
        block cache, where their blocks stay until their memory is needed)."""
        self.index_blocks(context)
        for block in context.blocks[context.num_inherited_blocks :]:
            self.allocator.decref(block)
        del context.blocks[context.num_inherited_blocks :]
        context.recompute_end = max(context.recompute_end, context.num_computed)
        context.num_computed = context.num_inherited_blocks * self.block_size
        context.num_indexed_blocks = min(context.num_indexed_blocks, context.num_inherited_blocks)
        context.last_logits = None

    def uncompute(self, context: Context, num_computed: int) -> None:
        """Forgets the KV of the tokens from `num_computed` on (a failed step's), to be computed again. The block
        that holds token `num_computed` is let go, not written over, where others may read it (inherited, or
        indexed): the context then computes that block again from its start."""
        index = num_computed // self.block_size
        if index < max(context.num_inherited_blocks, context.num_indexed_blocks):
            for block in context.blocks[index:]:
                self.allocator.decref(block)
            del context.blocks[index:]
            num_computed = index * self.block_size
            context.num_inherited_blocks = min(context.num_inherited_blocks, index)
        context.num_indexed_blocks = min(context.num_indexed_blocks, index)
        context.num_computed = num_computed
        context.last_logits = None

    def own_block_count(self, context: Context) -> int:
        return len(context.blocks) - context.num_inherited_blocks

    # ---- the block cache ---------------------------------------------------------------------------

    def block_key(self, context: Context, index: int) -> bytes | None:
        """The key of the context's block `index` (kept in `block_keys`); None while that block is not full or a
        token of it, or of a block before it, is still on the device."""
        keys, bs = context.block_keys, self.block_size
        while len(keys) <= index:
            tokens = context.token_ids[len(keys) * bs : (len(keys) + 1) * bs]
            if len(tokens) < bs or min(tokens) < 0:
                return None
            keys.append(block_key(keys[-1] if keys else b"", tokens))
        return keys[index]

    def index_blocks(self, context: Context) -> None:
        """Indexes the context's computed full blocks not offered to the cache yet: their KV is written (their step
        is launched), so others may read them from the next step on."""
        if self.cache is None:
            return
        while context.num_indexed_blocks < context.num_computed // self.block_size:
            key = self.block_key(context, context.num_indexed_blocks)
            if key is None:  # a token still on the device: indexed once it is back
                return
            self.cache.add(key, context.blocks[context.num_indexed_blocks])
            context.num_indexed_blocks += 1

    def take_cached_blocks(self, context: Context) -> bytes | None:
        """Takes by reference the longest run of cached blocks that hold the context's next pending tokens, from
        the block of its first pending token on (a block of its own there, partly computed, is let go); at least
        one token stays pending, for the logits. Returns the key of the block after the run, which the cache
        lacks (None: no full block of pending tokens is left to look up)."""
        if self.cache is None:
            return None
        self.index_blocks(context)
        bs = self.block_size
        while (end := (context.num_computed // bs + 1) * bs) < len(context.token_ids):
            index = end // bs - 1
            key = self.block_key(context, index)
            block = self.cache.get(key) if key is not None else None
            if block is None:
                return key
            self.allocator.incref(block)
            if index < len(context.blocks):
                self.allocator.decref(context.blocks[index])
                context.blocks[index] = block
            else:
                context.blocks.append(block)
            hit = max(0, end - max(context.num_computed, context.recompute_end))
            context.num_cached += hit
            self.cached_tokens += hit
            context.num_computed = end
            context.num_indexed_blocks = index + 1
        return None

    def keys_completed(self, context: Context, num_tokens: int) -> list[bytes]:
        """The keys of the blocks that computing the context's next `num_tokens` tokens completes."""
        if self.cache is None:
            return []
        bs = self.block_size
        keys = (self.block_key(context, i) for i in range(context.num_computed // bs,
                                                        (context.num_computed + num_tokens) // bs))
        return [key for key in keys if key is not None]
