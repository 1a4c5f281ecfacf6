"""An engine in a process of its own (ProcessEngine) answers as the in-process AsyncEngine does: the same tokens,
the same typed errors, cancellation that frees the request's blocks, and a server built on it."""

import asyncio

import httpx
import pytest

from parrot_lc.engine import SamplingParams
from parrot_lc.engine.async_engine import AsyncEngine
from parrot_lc.engine.errors import ContextNotFoundError, EngineUnavailableError, InvalidRequestError
from parrot_lc.engine.process_engine import ProcessEngine
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings, ServerSettings

SETTINGS = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=32 * 2**20)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def process_engine():
    engine = ProcessEngine(SETTINGS)
    yield engine
    engine.close()


async def forked_answers(engine) -> list[list[int]]:
    """Three forks of one prefix, decoded at once; the contexts are freed after."""
    await engine.fill(list(range(3, 40)), "prefix")
    async def answer(i: int) -> list[int]:
        events = engine.generate(GREEDY, f"fork{i}", "prefix", token_ids=[50 + i, 60 + i])
        return [t async for output in events for t in output.token_ids]
    answers = await asyncio.gather(*(answer(i) for i in range(3)))
    for context in ["prefix"] + [f"fork{i}" for i in range(3)]:
        await engine.free_context(context)
    return answers


def test_a_process_engine_generates_what_the_in_process_engine_does(process_engine, make_engine):
    in_process = AsyncEngine(make_engine())
    try:
        assert asyncio.run(forked_answers(process_engine)) == asyncio.run(forked_answers(in_process))
    finally:
        in_process.close()


def test_a_refused_request_raises_the_engines_typed_error_in_the_caller(process_engine):
    async def scenario() -> None:
        with pytest.raises(ContextNotFoundError, match="nope"):
            await process_engine.fill([5, 6], "orphan", "nope")
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await process_engine.fill([10**6], "bad")
        await process_engine.fill([5, 6, 7], "after")  # and it serves on
        await process_engine.free_context("after")

    asyncio.run(scenario())


def test_a_generation_closed_early_is_cancelled_and_its_blocks_freed(process_engine):
    async def scenario() -> None:
        used = process_engine.stats().kv_blocks_used
        events = process_engine.generate(SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True), "long",
                                         token_ids=list(range(3, 20)))
        for _ in range(3):
            await anext(events)
        await events.aclose()
        await process_engine.free_context("long")  # after the cancel, in order: the stats below are newer
        assert process_engine.stats().kv_blocks_used == used

    asyncio.run(scenario())


def test_a_server_with_engine_processes_answers_a_chat():
    settings = ServerSettings(port=0, engine_processes=True)
    with LocalServer(SETTINGS, settings) as server:
        assert isinstance(server.manager.engines[0].engine, ProcessEngine)
        body = {"model": "tiny", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]}
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 5


def test_callers_learn_that_a_dead_engine_process_is_unavailable():
    """The manager moves work off an unavailable engine: a waiting caller and a later one both learn it."""
    engine = ProcessEngine(SETTINGS)
    try:
        async def scenario() -> None:
            events = engine.generate(SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True), "long",
                                     token_ids=list(range(3, 20)))
            await anext(events)
            engine._process.kill()
            with pytest.raises(EngineUnavailableError):
                async for _ in events:
                    pass
            with pytest.raises(EngineUnavailableError):
                await engine.fill([5, 6], "later")

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.close()


class Unpicklable:
    def __hash__(self) -> int:
        return 0

    def __reduce__(self):
        raise ValueError("cannot pickle this id")  # the error a closed pipe raises too


def test_a_command_that_cannot_be_sent_fails_its_caller_and_the_engine_serves_on(process_engine):
    async def scenario() -> None:
        with pytest.raises(InvalidRequestError, match="could not be sent"):
            await process_engine.fill([5, 6], Unpicklable())  # a context id no pipe can carry
        await process_engine.fill([5, 6, 7], "after-unpicklable")
        await process_engine.free_context("after-unpicklable")

    asyncio.run(asyncio.wait_for(scenario(), 60))
