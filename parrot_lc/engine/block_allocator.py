"""Reference-counted allocator of the fixed-size KV blocks of the paged cache."""

from __future__ import annotations

from collections import deque

from parrot_lc.engine.errors import OutOfMemoryError


class BlockAllocator:
    """Hands out block ids; a block returns to the free list when its last holder lets it go.

    Contexts forked from one parent hold the parent's full blocks by reference, so a parent freed while
    children live keeps those blocks until the last child goes.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfMemoryError("no free KV block")
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def incref(self, block: int) -> None:
        assert self._refs[block] > 0, f"block {block} is not allocated"
        self._refs[block] += 1

    def decref(self, block: int) -> None:
        assert self._refs[block] > 0, f"block {block} is already free"
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def refcount(self, block: int) -> int:
        return self._refs[block]
