"""Prefix contexts kept warm on each engine: a shared prompt prefix is filled once and forked by every call
that starts with it, across sessions; idle prefixes are evicted least recently used first, past a number of
them or a share of the engine's KV cache (an engine cannot preempt a context that no request runs in, so warm
prefixes past that share would push running requests out)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

from parrot_lc.engine.errors import EngineError
from parrot_lc.engine.engine_client import EngineClient
from parrot_lc.server.tasks import start_now


def prefix_key(token_ids: list[int]) -> str:
    # The ids' machine bytes (made in C), not their text (made id by id): a request's 4k-token system prompt is
    # hashed in about 0.1 ms instead of 0.5.
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()[:32]


@dataclass(frozen=True)
class PromptPrefix:
    """The part of a call's prompt that it shares with others: its token ids and their key, hashed once."""

    token_ids: list[int]
    key: str

    @classmethod
    def of(cls, token_ids: list[int]) -> PromptPrefix:
        return cls(token_ids, prefix_key(token_ids))


@dataclass(eq=False)
class PrefixEntry:
    key: str
    context_id: str
    num_tokens: int
    # Done once a fork of the context may be sent (its fill's command is ahead of it, see EngineClient.fill; or
    # the fill has returned), or with the error of a fill that failed before that.
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    filled: bool = False  # the fill ended, and well: the context may be evicted once idle
    error: Exception | None = None  # why the fill failed: the context is freed once no caller may still fork from it
    users: int = 0
    last_used: int = 0
    owner: str | None = None  # the session whose call it was filled for (None: no session's)
    # Done once the fill ends: how many of its tokens it took from the block cache (0 if it failed).
    fill_cached: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    async def computed_for(self, owner: str) -> int:
        """Of the prefix's tokens, those whose KV its fill computed for `owner`'s calls: a fork's engine request
        counts all that it inherits as cached, but a fill made for the session (for one of its calls, or shared by
        its own choices) is its own work. A prefix filled for another session is cached for this one, warm or
        still filling (a fork that waits for another's fill counts what the engine reports, as vLLM and SGLang
        count a hit on blocks that another request computed). Await it once a fork has begun: the fill has ended."""
        if owner != self.owner:
            return 0
        return self.num_tokens - await asyncio.shield(self.fill_cached)


class PrefixCache:
    """The prefix contexts of one engine, by the hash of their token ids."""

    def __init__(self, engine: EngineClient, max_entries: int, max_cache_fraction: float = 1.0) -> None:
        self.engine = engine
        self.max_entries = max_entries
        self.max_cache_fraction = max_cache_fraction
        self._entries: dict[str, PrefixEntry] = {}
        self._clock = itertools.count()  # orders uses (LRU) and makes each new entry's context id unique

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> set[str]:
        """The keys of the prefixes held now."""
        return set(self._entries)

    @property
    def num_filling(self) -> int:
        """Prefixes whose fill has not ended yet. A fill goes on when every call that waited for it went away
        (cancelled, its session deleted): the prefix is then warm for later calls, idle once filled. (One whose
        calls all went away while room was made for it is dropped unfilled.)"""
        return sum(not entry.filled for entry in self._entries.values())

    async def acquire(self, prefix: PromptPrefix, priority: int, owner: str | None = None) -> PrefixEntry:
        """The context of the prefix, to fork from: filled now if new, at the priority of the call that waits for
        it (the fill is the first part of that call, and a less important fill would be prefilled in the
        background of the steps that decode other calls). It returns once a fork may be sent, which on an engine
        that takes commands in order is before the fill ends: the fork waits in the engine, and starts in the
        step after the fill's, not a round trip through this server later. Release it once the fork has begun
        (its first event) or failed. `owner`: the session of the calling call, whose work a new prefix's fill is
        (`PrefixEntry.computed_for`)."""
        key, token_ids = prefix.key, prefix.token_ids
        entry = self._entries.get(key)
        entry_is_new = entry is None
        if entry_is_new:  # registered before any await, so that concurrent callers share it
            # a fresh context id: an evicted entry of the same key may still be being freed
            entry = PrefixEntry(key, f"prefix/{key}/{next(self._clock)}", len(token_ids), owner=owner)
            self._entries[key] = entry
        entry.users += 1
        entry.last_used = next(self._clock)
        if entry_is_new:
            # Made in a task of its own, not in this caller's: a caller cancelled (its client went away) must not
            # cancel the making that others wait for too, nor an eviction's frees halfway (their contexts would
            # leak). With nothing to evict, the fill's command still leaves in this turn.
            start_now(self._make(entry, token_ids, priority))
        try:
            await asyncio.shield(entry.ready)
            if entry.error is not None:  # failed after its command left, before this caller woke: no fork now
                raise entry.error
        except BaseException:
            self.release(entry)
            raise
        return entry

    def release(self, entry: PrefixEntry) -> None:
        entry.users -= 1
        if entry.error is not None and entry.users == 0:
            start_now(self._free_failed(entry))

    async def evict(self, keep: int = 0, keep_tokens: int | None = None) -> int:
        """Frees idle prefixes, least recently used first, until at most `keep` remain and (if given) all of them
        hold at most `keep_tokens`; returns how many."""
        idle = sorted((e for e in self._entries.values() if _idle(e)), key=lambda e: e.last_used)
        count, tokens = len(self._entries), sum(e.num_tokens for e in self._entries.values())
        victims = []
        for entry in idle:
            if count <= keep and (keep_tokens is None or tokens <= keep_tokens):
                break
            victims.append(entry)
            count, tokens = count - 1, tokens - entry.num_tokens
        return await self._free(victims)

    def _max_tokens(self) -> int | None:
        """The tokens prefixes may hold on this engine (None: its cache's size is not known)."""
        capacity = self.engine.stats().kv_capacity_tokens
        return int(capacity * self.max_cache_fraction) if capacity else None

    async def discard(self, keys: Iterable[str]) -> None:
        """Frees the prefixes' contexts, but not one that a call is forking from (or that is being filled)."""
        await self._free([entry for key in keys if (entry := self._entries.get(key)) is not None and _idle(entry)])

    async def free_unused(self) -> int:
        """Frees every prefix that no call uses, a fill still running or not (its request is cancelled): a
        drain's, when no call will fork from them any more. Returns how many."""
        return await self._free([entry for entry in self._entries.values() if entry.users == 0])

    async def _free(self, victims: list[PrefixEntry]) -> int:
        for entry in victims:  # out of the map first: the frees below await, and others may look meanwhile
            self._entries.pop(entry.key, None)
        frees = [self.engine.free_context(e.context_id) for e in victims]
        errors = [r for r in await asyncio.gather(*frees, return_exceptions=True) if isinstance(r, BaseException)]
        if errors:  # every victim was tried; the first failure is the caller's to see
            raise errors[0]
        return len(victims)

    async def _make(self, entry: PrefixEntry, token_ids: list[int], priority: int) -> None:
        try:
            await self.evict(self.max_entries, self._max_tokens())  # the new entry is in use: never a victim
        except Exception as exc:  # its fill never left: nothing to free, but its waiters must not hang
            self._forget(entry)
            entry.ready.set_exception(exc)
            return
        if entry.users == 0:  # every caller went away (or a drain freed it) before its fill left: none is sent
            self._forget(entry)
            return
        await self._fill(entry, token_ids, priority)

    def _forget(self, entry: PrefixEntry) -> None:
        if self._entries.get(entry.key) is entry:  # not a newer entry of the same key
            del self._entries[entry.key]

    async def _fill(self, entry: PrefixEntry, token_ids: list[int], priority: int) -> None:
        try:
            cached = await self.engine.fill(token_ids, entry.context_id, priority=priority, issued=entry.ready)
        except Exception as exc:  # the entry is dropped; callers that wait for it see the error
            self._forget(entry)
            entry.error = exc
            entry.fill_cached.set_result(0)
            if not entry.ready.done():
                entry.ready.set_exception(exc)
            # Forks already sent start from what the fill computed and compute the rest themselves (or fail, if
            # it computed nothing): the context is freed once they have begun.
            if entry.users == 0:
                await self._free_failed(entry)
        else:
            entry.filled = True
            entry.fill_cached.set_result(cached)
            if not entry.ready.done():
                entry.ready.set_result(None)

    async def _free_failed(self, entry: PrefixEntry) -> None:
        # A fill that failed once started (the KV cache ran out) leaves its context behind.
        with contextlib.suppress(EngineError):
            await self.engine.free_context(entry.context_id)


def _idle(entry: PrefixEntry) -> bool:
    return entry.users == 0 and entry.filled
