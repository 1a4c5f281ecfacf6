"""The engines a manager drives: those it runs itself and those that registered over HTTP, each in a slot with
its warm prefix contexts and its load; and where a call runs."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field

from parrot_lc.engine.engine import EngineStats
from parrot_lc.engine.errors import EngineUnavailableError
from parrot_lc.engine.engine_client import EngineClient
from parrot_lc.server.errors import NotFoundError, TooManyEnginesError
from parrot_lc.server.graph import Call
from parrot_lc.server.prefix_cache import PrefixCache, PromptPrefix
from parrot_lc.server.remote_engine import RemoteEngine
from parrot_lc.settings import ServerSettings

log = logging.getLogger("parrot_lc.engines")

# The engines' counters that the server exports as Prometheus counters (summed over engines): they only ever rise.
COUNTERS = ("prefill_tokens", "reused_tokens", "cached_tokens", "decode_tokens", "num_steps")
_REMEMBERED_ENGINES = 1024  # dropped engines whose counters are kept, should they register again


def _no_counts() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


@dataclass
class EngineCounts:
    """What one engine adds to the pool's counters: the growth of its own counters while it is in the pool, so that
    the sums never go down. Its counters as last read are `seen`; counters that read lower than that (its process
    restarted) count from 0 again. An engine that registers again at the URL of one dropped (or replaced) begins
    from that one's last counters: if they continue (it is the same process, its heartbeats were late), only what
    it did since counts; if they went down (it restarted), all it did counts."""

    seen: dict[str, int] = field(default_factory=_no_counts)
    counted: dict[str, int] = field(default_factory=_no_counts)

    def observe(self, stats: EngineStats) -> None:
        now = {name: getattr(stats, name) for name in COUNTERS}
        restarted = any(now[name] < self.seen[name] for name in COUNTERS)
        for name in COUNTERS:
            self.counted[name] += now[name] if restarted else now[name] - self.seen[name]
        self.seen = now


def context_capacity(stats: EngineStats) -> int | None:
    """The tokens one context may hold in an engine's KV cache (None: not known, an engine that tells no capacity):
    the whole cache less a block (0 for a cache of one block). A context forked from a shared prefix (a warm prefix
    context, the prompt of a request's n choices) copies the prefix's last block where that is partly filled, while
    the prefix context keeps its own."""
    blocks = stats.kv_blocks_used + stats.kv_blocks_free
    if not stats.kv_capacity_tokens or not blocks:
        return None
    return stats.kv_capacity_tokens - stats.kv_capacity_tokens // blocks


@dataclass
class Registration:
    """An engine process that registered over HTTP: the token its heartbeats carry, and when the last came."""

    engine: RemoteEngine
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    last_heartbeat: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class EngineSlot:
    """An engine as the manager sees it: its prefix contexts and the calls running on it."""

    name: str
    engine: EngineClient
    prefixes: PrefixCache
    background: asyncio.Semaphore  # caps the calls that are not latency-critical
    registration: Registration | None = None  # engines that registered over HTTP only
    running: int = 0
    calls: set[str] = field(default_factory=set)  # placed here and not ended (`session/call`), named if it is lost
    call_ended: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) as each call ends
    placed: int = 0  # calls ever placed here: breaks ties in load, so idle engines take turns
    counts: EngineCounts = field(default_factory=EngineCounts)  # its part of the pool's counters
    # Calls' contexts being freed: a call cancelled meanwhile (its session deleted once its output was read) has
    # ended before its free is answered, which a drain waits for before it counts the contexts left.
    frees: set[asyncio.Future] = field(default_factory=set)

    def end_call(self) -> None:
        """Wakes whoever waits for a call on this engine to end (for memory), once."""
        self.call_ended.set()
        self.call_ended = asyncio.Event()

    @property
    def label(self) -> str:
        """Its name, and where a registered engine runs (its own logs are there)."""
        return f"{self.name} ({self.registration.engine.url})" if self.registration is not None else self.name


class EnginePool:
    """The slots, named `engine-N` with N never used twice: a name given again after its engine was dropped would
    let the heartbeats of one engine process keep another's slot alive."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.slots: list[EngineSlot] = []
        self._numbers = itertools.count()
        self._group_slots: dict[str, EngineSlot] = {}  # a task group's calls run on one engine
        self._dropped_counts = _no_counts()  # what the engines dropped had counted, kept in the totals
        # Registered engines dropped: their counters as last read, by URL (one address serves one engine), should
        # they register again; engines in this process never come back.
        self._dropped_seen: dict[str, dict[str, int]] = {}

    def add(self, engine: EngineClient, registration: Registration | None = None) -> EngineSlot:
        settings = self.settings
        slot = EngineSlot(f"engine-{next(self._numbers)}", engine,
                          PrefixCache(engine, settings.max_prefixes_per_engine, settings.prefix_cache_fraction),
                          asyncio.Semaphore(settings.max_background_calls_per_engine), registration)
        seen = self._dropped_seen.pop(registration.engine.url, None) if registration is not None else None
        if seen is not None:  # an engine dropped before (registered again at its URL): its counts are in already
            slot.counts.seen = seen
        self.slots.append(slot)
        return slot

    def counter_totals(self) -> dict[str, int]:
        """The engines' counters (`COUNTERS`) summed over every engine this pool ever had, dropped or replaced ones
        included: each sum only rises, as a Prometheus counter must (a sum of the engines' own counters went back
        when an engine was dropped, and Prometheus took that for a reset)."""
        totals = dict(self._dropped_counts)
        for slot in self.slots:
            slot.counts.observe(slot.engine.stats())
            for name in COUNTERS:
                totals[name] += slot.counts.counted[name]
        return totals

    def context_capacity(self) -> int | None:
        """The tokens one context may hold on every engine (`context_capacity` of each engine that tells its KV
        cache's size, in its counters: a remote engine's come with its registration and heartbeats), as a call may be
        placed on any engine and fail over to any other. None where none tells it: no engine yet, or only an
        OpenAI-compatible server's, which keeps its cache to itself."""
        return min((capacity for slot in self.slots if (capacity := context_capacity(slot.engine.stats())) is not None),
                   default=None)

    def register(self, engine: RemoteEngine) -> EngineSlot:
        """Adds an engine process that registered, with a token of its own for its heartbeats. One registered
        before at the same URL is dropped first (a restarted process holds none of its contexts, and one address
        serves one engine); past max_remote_engines, TooManyEnginesError."""
        for old in self.registered():
            if old.registration.engine.url == engine.url:
                self.drop(old, "it registered again, as a new engine: a restarted process holds none of its contexts")
        most = self.settings.max_remote_engines
        if len(self.registered()) >= most:
            raise TooManyEnginesError(f"the server holds {most} remote engines already (its max_remote_engines): "
                                      "stop one, or raise the limit", field="url")
        return self.add(engine, Registration(engine))

    def heartbeat(self, name: str, token: str | None, stats: EngineStats) -> None:
        """Takes a registered engine's counters. Anything but the name and token it registered with is
        NotFoundError, on which an engine process registers again: its slot was dropped, or the name is another
        engine's (given by this run of the server, when the engine registered with an earlier one)."""
        slot = next((s for s in self.slots if s.name == name), None)
        if slot is None:
            raise NotFoundError(f"unknown engine {name!r}: register again", field="name")
        registration = slot.registration
        if registration is None:
            raise NotFoundError(f"engine {name!r} runs in the server: it sends no heartbeats", field="name")
        if token is None or not secrets.compare_digest(token.encode("utf-8", "replace"), registration.token.encode()):
            raise NotFoundError(f"engine {name!r} is not the one registered with this token: register again",
                                field="name")
        registration.last_heartbeat = time.monotonic()
        registration.engine.update_stats(stats)
        slot.counts.observe(stats)

    def registered(self) -> list[EngineSlot]:
        return [s for s in self.slots if s.registration is not None]

    def drop(self, slot: EngineSlot, reason: str) -> None:
        """Forgets an engine that died (`reason`: how that showed), with one warning that names it and the calls it
        had: they fail over to the others as they notice. What it counted stays in the totals (`counter_totals`)."""
        if slot in self.slots:
            self.slots.remove(slot)
            calls = sorted(slot.calls)
            fate = ("no call was on it" if not calls else
                    f"its {len(calls)} call{'s' * (len(calls) > 1)} "
                    f"{'resume on another engine' if self.slots else 'fail: no engine is left'}: {', '.join(calls)}")
            log.warning("engine %s lost (%s); %s", slot.label, reason, fate,
                        extra={"engine": slot.name, "reason": reason, "calls": calls})
            slot.counts.observe(slot.engine.stats())  # a registered engine's: as its last heartbeat sent them
            for name in COUNTERS:
                self._dropped_counts[name] += slot.counts.counted[name]
            self._group_slots = {g: s for g, s in self._group_slots.items() if s is not slot}
            if slot.registration is not None:
                url = slot.registration.engine.url
                self._dropped_seen.pop(url, None)  # (re-inserted last: the oldest go first)
                self._dropped_seen[url] = slot.counts.seen
                while len(self._dropped_seen) > _REMEMBERED_ENGINES:
                    del self._dropped_seen[next(iter(self._dropped_seen))]
                slot.engine.close()

    def drop_silent(self, timeout: float) -> None:
        """Drops registered engines whose last heartbeat is older than `timeout` seconds."""
        now = time.monotonic()
        for slot in [s for s in self.registered() if now - s.registration.last_heartbeat > timeout]:
            self.drop(slot, f"no heartbeat for {timeout:.1f} s")

    def place(self, call: Call, prefix: PromptPrefix | None) -> EngineSlot:
        """Prefix affinity first (the engine that holds the prefix), then the call's task group, then load."""
        if not self.slots:
            raise EngineUnavailableError("no engine is serving: start one (`parrot-lc engine --manager URL`)")
        if prefix is not None:
            for slot in self.slots:
                if prefix.key in slot.prefixes:
                    return slot
        if call.task_group in self._group_slots:
            return self._group_slots[call.task_group]
        slot = min(self.slots, key=lambda s: (s.running, s.placed))
        if call.task_group is not None:
            self._group_slots[call.task_group] = slot
        return slot
