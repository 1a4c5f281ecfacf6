"""Warm prefix contexts: kept after their calls end, for the next call that starts the same way, but never more
than a number of them or a share of the engine's KV cache (an engine cannot preempt a context that no request
runs in: past that share, warm prefixes would push running requests out)."""

import asyncio

import pytest

from conftest import hide_kv_capacity
from parrot_lc.engine import SamplingParams
from parrot_lc.engine.async_engine import AsyncEngine
from parrot_lc.server.errors import CONTEXT_LENGTH_EXCEEDED, ServerError
from parrot_lc.server.graph import Piece
from parrot_lc.server.local import build_manager
from parrot_lc.server.manager import CompletionPrompt
from parrot_lc.server.prefix_cache import PrefixCache, PrefixEntry, PromptPrefix
from parrot_lc.settings import EngineSettings, ServerSettings

HEADS = [f"App {name} answers questions about the harbour, its tides and its ships. " * 4
         for name in ("one", "two", "three", "four")]


def warm_prefixes_after_chats(heads: list[str], **server) -> tuple[list[int], int, int]:
    """Runs one chat per head, one after another; returns the warm prefixes' sizes in tokens (least recently used
    first), the engine's KV capacity in tokens and its contexts at the end."""

    async def main() -> tuple[list[int], int, int]:
        manager = build_manager(EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=8 * 2**20),
                                ServerSettings(engine_processes=False, **server))
        sampling = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        for head in heads:
            prompt = head + "When is high tide?"
            pieces = [Piece("text", head), Piece("text", prompt[len(head):])]
            completion = manager.start_completion([CompletionPrompt(pieces, manager.prompts.tokenize(prompt),
                                                                    sampling)])
            assert "".join([text async for _, text in completion.deltas()])
            await manager.end_completion(completion)
        slot = manager.engines[0]
        entries = sorted(slot.prefixes._entries.values(), key=lambda e: e.last_used)
        for _ in range(100):  # the last call's own context is freed in the background of its session's end
            if slot.engine.stats().num_contexts == len(entries):
                break
            await asyncio.sleep(0.02)
        stats = slot.engine.stats()
        manager.close()
        return [e.num_tokens for e in entries], stats.kv_capacity_tokens, stats.num_contexts

    return asyncio.run(main())


def test_prefixes_stay_warm_within_the_cache_share():
    sizes, _, contexts = warm_prefixes_after_chats(HEADS)
    assert len(sizes) == len(HEADS) and contexts == len(HEADS)


def test_idle_prefixes_past_the_cache_share_are_freed_least_recently_used_first():
    sizes, capacity, _ = warm_prefixes_after_chats(HEADS)
    share = (sizes[-1] + sizes[-2] + 1) / capacity  # room for the two latest prefixes, not three
    kept, _, contexts = warm_prefixes_after_chats(HEADS, prefix_cache_fraction=share)
    assert kept == sizes[-2:] and contexts == 2


def test_no_more_prefixes_stay_warm_than_max_prefixes_per_engine():
    sizes, _, contexts = warm_prefixes_after_chats(HEADS, max_prefixes_per_engine=3)
    assert len(sizes) == 3 and contexts == 3


@pytest.mark.parametrize("engine_processes", [False, True])
def test_a_prefix_the_engine_refuses_fails_its_call_for_that_reason_and_leaves_nothing(engine_processes):
    """The call's fork leaves before the engine has answered the fill (at once, to an engine process): it fails for
    the fill's reason, not for its missing parent, and the prefix's context goes once no fork can need it. (The
    engine keeps its cache's size to itself: else the call is refused before it reaches the engine.)"""

    async def main() -> tuple[str, int, int]:
        manager = build_manager(EngineSettings(model="tiny", device="cpu", dtype="float32",
                                               kv_cache_bytes=4 * 2 * 2 * 16 * 2 * 16 * 4),  # 4 blocks of 16 tokens
                                ServerSettings(engine_processes=engine_processes))
        hide_kv_capacity(manager)
        try:  # closed whatever happens: an engine process left running would keep the test from ending
            head = HEADS[0] * 2  # longer than the whole cache
            prompt = head + "When is high tide?"
            pieces = [Piece("text", head), Piece("text", prompt[len(head):])]
            completion = manager.start_completion([CompletionPrompt(pieces, manager.prompts.tokenize(prompt),
                                                                    SamplingParams(max_tokens=2, temperature=0))])
            with pytest.raises(ServerError) as failure:  # a 400 context_length_exceeded: no engine can hold it
                "".join([text async for _, text in completion.deltas()])
            assert failure.value.code == CONTEXT_LENGTH_EXCEEDED
            await manager.end_completion(completion)
            slot = manager.engines[0]
            for _ in range(100):
                if slot.engine.stats().num_contexts == 0:
                    break
                await asyncio.sleep(0.02)
            return str(failure.value), len(slot.prefixes), slot.engine.stats().num_contexts
        finally:
            manager.close()

    message, prefixes, contexts = asyncio.run(main())
    assert "the KV cache holds 64" in message
    assert prefixes == 0 and contexts == 0


# ---- one caller's cancellation while its prefix is being made: never another caller's failure -----------------

class HeldEngine:
    """A tiny engine whose context frees and fills wait at a gate until the test opens it: a caller can be cancelled
    while its prefix is being made room for (the eviction's frees) or filled."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.frees, self.fills = asyncio.Event(), asyncio.Event()  # set: they go through
        self.frees.set()
        self.fills.set()
        self.held = 0  # commands waiting at a gate now

    async def free_context(self, context_id: str) -> None:
        await self._gate(self.frees)
        await self.engine.free_context(context_id)

    async def fill(self, token_ids, context_id, parent_context_id=None, priority=0, issued=None) -> int:
        await self._gate(self.fills)
        return await self.engine.fill(token_ids, context_id, parent_context_id, priority, issued)

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def stats(self):
        return self.engine.stats()

    async def _gate(self, gate: asyncio.Event) -> None:
        self.held += 1
        try:
            await gate.wait()
        finally:
            self.held -= 1


async def until(condition, what: str, seconds: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def on_held_engine(tiny, scenario):
    """Runs `scenario(engine)` on a HeldEngine over the tiny engine, whose thread is stopped after."""
    engine = AsyncEngine(tiny)
    try:
        return asyncio.run(scenario(HeldEngine(engine)))
    finally:
        engine.close()


OLD, NEW = PromptPrefix.of(list(range(5, 40))), PromptPrefix.of(list(range(50, 90)))


async def warm(cache: PrefixCache, prefix: PromptPrefix) -> None:
    """The prefix filled and idle in the cache."""
    cache.release(await cache.acquire(prefix, 0))
    await until(lambda: cache.num_filling == 0, "the fills to end")


async def forks_from(engine: HeldEngine, entry: PrefixEntry) -> list[int]:
    """The tokens a call forked from the prefix's context generates (its context freed after)."""
    context_id = f"call-{entry.context_id}"
    events = engine.generate(SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), context_id,
                             entry.context_id, 0, [7])
    tokens = [t async for event in events for t in event.token_ids]
    await engine.free_context(context_id)
    return tokens


async def creator_cancelled_while(gate: str, engine: HeldEngine, cache: PrefixCache) -> list[list[int]]:
    """Three callers want NEW; the first (which creates it) is cancelled while `gate` holds its making. Returns what
    the other two generate from the prefix they get."""
    getattr(engine, gate).clear()
    creator, *others = [asyncio.create_task(cache.acquire(NEW, 0)) for _ in range(3)]
    await until(lambda: engine.held == 1, "the making to be held")
    creator.cancel()
    await asyncio.sleep(0.01)  # its cancellation lands while the making is held
    getattr(engine, gate).set()
    with pytest.raises(asyncio.CancelledError):
        await creator
    entries = await asyncio.gather(*others)
    outputs = [await forks_from(engine, entry) for entry in entries]
    for entry in entries:
        cache.release(entry)
    return outputs


def test_a_creator_cancelled_while_making_room_for_the_prefix_leaves_it_to_the_callers_that_wait(tiny):
    async def scenario(engine: HeldEngine) -> list[list[int]]:
        cache = PrefixCache(engine, max_entries=1)
        await warm(cache, OLD)  # evicted to make room for NEW
        return await creator_cancelled_while("frees", engine, cache)

    outputs = on_held_engine(tiny, scenario)
    assert [len(tokens) for tokens in outputs] == [2, 2]


def test_a_creator_cancelled_while_the_prefix_is_filled_leaves_it_to_the_callers_that_wait(tiny):
    async def scenario(engine: HeldEngine) -> list[list[int]]:
        return await creator_cancelled_while("fills", engine, PrefixCache(engine, max_entries=4))

    outputs = on_held_engine(tiny, scenario)
    assert [len(tokens) for tokens in outputs] == [2, 2]


@pytest.mark.parametrize("gate", ["frees", "fills"])
def test_when_every_caller_of_a_prefix_is_cancelled_while_it_is_made_no_context_or_kv_block_is_left(tiny, gate):
    async def scenario(engine: HeldEngine) -> tuple[int, int, int]:
        cache = PrefixCache(engine, max_entries=1)
        await warm(cache, OLD)
        getattr(engine, gate).clear()
        callers = [asyncio.create_task(cache.acquire(NEW, 0)) for _ in range(3)]
        await until(lambda: engine.held == 1, "the making to be held")
        for caller in callers:
            caller.cancel()
        await asyncio.sleep(0.01)  # their cancellations land while the making is held
        getattr(engine, gate).set()
        assert all(isinstance(r, asyncio.CancelledError)
                   for r in await asyncio.gather(*callers, return_exceptions=True))
        await until(lambda: cache.num_filling == 0, "the fills to end")
        await cache.evict()  # what is warm is idle: freed
        # The engine's counters come as of its last command: the frees may still be on their way there.
        await until(lambda: engine.stats().num_contexts == 0, "every context to be freed")
        return len(cache), engine.stats().num_contexts, engine.stats().kv_blocks_used

    assert on_held_engine(tiny, scenario) == (0, 0, 0)
