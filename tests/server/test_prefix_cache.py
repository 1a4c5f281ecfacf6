"""Warm prefix contexts: kept after their calls end, for the next call that starts the same way, but never more
than a number of them or a share of the engine's KV cache (an engine cannot preempt a context that no request
runs in: past that share, warm prefixes would push running requests out)."""

import asyncio

import pytest

from parrot_lc.engine import SamplingParams
from parrot_lc.server.errors import CallFailedError
from parrot_lc.server.graph import Piece
from parrot_lc.server.local import build_manager
from parrot_lc.server.manager import CompletionPrompt
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
    the fill's reason, not for its missing parent, and the prefix's context goes once no fork can need it."""

    async def main() -> tuple[str, int, int]:
        manager = build_manager(EngineSettings(model="tiny", device="cpu", dtype="float32",
                                               kv_cache_bytes=4 * 2 * 2 * 16 * 2 * 16 * 4),  # 4 blocks of 16 tokens
                                ServerSettings(engine_processes=engine_processes))
        try:  # closed whatever happens: an engine process left running would keep the test from ending
            head = HEADS[0] * 2  # longer than the whole cache
            prompt = head + "When is high tide?"
            pieces = [Piece("text", head), Piece("text", prompt[len(head):])]
            completion = manager.start_completion([CompletionPrompt(pieces, manager.prompts.tokenize(prompt),
                                                                    SamplingParams(max_tokens=2, temperature=0))])
            with pytest.raises(CallFailedError) as failure:
                "".join([text async for _, text in completion.deltas()])
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
