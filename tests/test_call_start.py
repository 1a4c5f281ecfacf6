"""A call whose inputs have values starts in its submitter's turn of the event loop: its first command to the
engine (its prefix's fill) leaves before the submitter awaits anything, not after every request handler that is
ready meanwhile (eager tasks, Python 3.12 and later; earlier Pythons start it a turn later)."""

import asyncio

import pytest

from parrot_lc.engine import SamplingParams
from parrot_lc.server.graph import Piece
from parrot_lc.server.local import build_manager
from parrot_lc.server.tasks import start_now
from parrot_lc.settings import EngineSettings, ServerSettings

EAGER = hasattr(asyncio, "eager_task_factory")


def test_a_task_started_now_has_run_up_to_its_first_wait_where_python_has_eager_tasks():
    steps: list[str] = []

    async def work() -> None:
        steps.append("started")
        await asyncio.sleep(0)
        steps.append("resumed")

    async def main() -> list[str]:
        task = start_now(work())
        seen = list(steps)
        await task
        return seen

    assert asyncio.run(main()) == (["started"] if EAGER else [])
    assert steps == ["started", "resumed"]


@pytest.mark.skipif(not EAGER, reason="eager tasks came with Python 3.12")
def test_a_chats_prefix_fill_reaches_the_engine_before_start_completion_returns():
    async def main() -> list[str]:
        manager = build_manager(EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20),
                                ServerSettings(engine_processes=False))
        engine, fills = manager.engines[0].engine, []
        fill = engine.fill

        async def recording_fill(token_ids, context_id, *args, **kwargs):
            fills.append(context_id)
            await fill(token_ids, context_id, *args, **kwargs)

        engine.fill = recording_fill
        head = "You keep the tide tables of a small harbour and answer its pilots. " * 3
        prompt = head + "When is high tide?"
        completion = manager.start_completion([Piece("text", head), Piece("text", prompt[len(head):])],
                                              SamplingParams(max_tokens=2, temperature=0), manager.tokenize(prompt))
        sent = list(fills)
        assert "".join([text async for text in completion.deltas()])
        await manager.end_completion(completion)
        manager.close()
        return sent

    assert [context.split("/")[0] for context in asyncio.run(main())] == ["prefix"]
