"""Reference-counted allocator of the fixed-size KV blocks of the paged cache."""

from __future__ import annotations

from collections import deque

from parrot_lc.engine.block_cache import BlockCache
from parrot_lc.engine.errors import OutOfMemoryError


class BlockAllocator:
    """Hands out block ids; a block returns to the free list when its last holder lets it go.

    Contexts forked from one parent hold the parent's full blocks by reference, so a parent freed while
    children live keeps those blocks until the last child goes. With a block cache, a released block that holds
    indexed KV stays there, unused, and counts as free: it is handed out (evicted) only when no empty block is left.
    """

    def __init__(self, num_blocks: int, cache: BlockCache | None = None) -> None:
        self.num_blocks = num_blocks
        self.cache = cache
        self._free: deque[int] = deque(range(num_blocks))  # blocks that hold nothing worth keeping
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free) + (self.cache.num_unused if self.cache is not None else 0)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self.cache is not None and self.cache.num_unused:
            block = self.cache.evict()
        else:
            raise OutOfMemoryError("no free KV block")
        self._refs[block] = 1
        return block

    def drop_cached(self) -> int:
        """Empties the unused blocks of the block cache (their KV is forgotten, no hit finds them any more);
        returns how many. They counted as free already: only what they hold changes."""
        if self.cache is None:
            return 0
        blocks = self.cache.evict_unused()
        self._free.extend(blocks)
        return len(blocks)

    def incref(self, block: int) -> None:
        """One more holder of an allocated block, or of an unused cached one (a lookup found it)."""
        if self._refs[block] == 0:
            assert self.cache is not None, f"block {block} is not allocated"
            self.cache.reuse(block)
        self._refs[block] += 1

    def decref(self, block: int) -> None:
        assert self._refs[block] > 0, f"block {block} is already free"
        self._refs[block] -= 1
        if self._refs[block] == 0 and (self.cache is None or not self.cache.release(block)):
            self._free.append(block)

    def refcount(self, block: int) -> int:
        return self._refs[block]
