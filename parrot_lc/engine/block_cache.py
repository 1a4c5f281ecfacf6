"""Prefix caching by content: full KV blocks indexed by the tokens they hold and every token before them, so that a
context whose tokens begin like an earlier one's takes that one's blocks instead of computing them again, whoever
sent either: not only a fork, which the context tree gives its parent's blocks."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def block_key(previous: bytes, token_ids: list[int]) -> bytes:
    """The key of a full block: a digest of the key of the block before it (b"" for a context's first) and of the
    block's tokens. Equal keys mean equal tokens from the context's first on, hence equal KV; a block whose own
    tokens match but whose context differs gets another key. A cryptographic digest, so that no client can make
    its prompt's blocks take the keys of another client's; of the ids' machine bytes, made in C."""
    return hashlib.sha256(previous + array("q", token_ids).tobytes()).digest()


class BlockCache:
    """Which block holds the KV of which key. A block is indexed once its KV is computed (its step launched: later
    steps read it after that one wrote it) and stays indexed while it holds that KV. A block that no context holds
    any more keeps its KV until the allocator needs the memory: such unused blocks go least recently released
    first, and a lookup that finds one puts it in use again."""

    def __init__(self) -> None:
        self._blocks: dict[bytes, int] = {}  # key -> block
        self._keys: dict[int, bytes] = {}  # block -> key
        self._unused: OrderedDict[int, None] = OrderedDict()  # indexed blocks that no context holds, oldest first

    def get(self, key: bytes) -> int | None:
        return self._blocks.get(key)

    def add(self, key: bytes, block: int) -> None:
        """Indexes a computed block, unless another block holds that key already (two contexts that computed the
        same tokens at once: the first stays, the second stays its context's alone)."""
        if key not in self._blocks and block not in self._keys:
            self._blocks[key] = block
            self._keys[block] = key

    @property
    def num_unused(self) -> int:
        return len(self._unused)

    def release(self, block: int) -> bool:
        """A block's last holder let it go; True if it keeps its KV here (it is indexed), False if it is free."""
        if block not in self._keys:
            return False
        self._unused[block] = None
        return True

    def reuse(self, block: int) -> None:
        """An unused block is held again (a lookup found it)."""
        del self._unused[block]

    def evict(self) -> int:
        """Unindexes the least recently released unused block and returns it, for new KV."""
        block, _ = self._unused.popitem(last=False)
        del self._blocks[self._keys.pop(block)]
        return block

    def evict_unused(self) -> list[int]:
        """Unindexes every unused block and returns them, empty (a reset: the next prompts start cold). Blocks
        that contexts hold stay indexed: their KV is still written there and read."""
        blocks = list(self._unused)
        self._unused.clear()
        for block in blocks:
            del self._blocks[self._keys.pop(block)]
        return blocks
