"""Contexts and the tree they form: a context's KV is its ancestors' KV followed by its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable

import torch

from parrot_lc.engine.block_allocator import BlockAllocator
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
    `num_inherited_blocks` blocks are the parent's full blocks, held by reference, never written.
    """

    context_id: ContextId
    parent: "Context | None" = None
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    num_inherited_blocks: int = 0
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
    """Owns every context and the blocks they hold; forks copy no full block of KV."""

    def __init__(
        self, allocator: BlockAllocator, block_size: int, copy_block: Callable[[int, int], None]
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self._copy_block = copy_block
        self._contexts: dict[ContextId, Context] = {}
        self.reused_tokens = 0  # tokens whose KV a fork got without computing it

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
        child.num_computed = parent.num_computed
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
        """Preemption: drops the context's own KV; its tokens stay, to be recomputed later."""
        for block in context.blocks[context.num_inherited_blocks :]:
            self.allocator.decref(block)
        del context.blocks[context.num_inherited_blocks :]
        context.num_computed = context.num_inherited_blocks * self.block_size
        context.last_logits = None

    def own_block_count(self, context: Context) -> int:
        return len(context.blocks) - context.num_inherited_blocks
