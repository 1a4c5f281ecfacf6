"""How a call reaches the engine: a call whose inputs have values starts in its submitter's turn of the event
loop, so its first command (its prefix's fill) leaves before the submitter awaits anything, not after every
request handler that is ready meanwhile (eager tasks, Python 3.12 and later; earlier Pythons start it a turn
later); and its fork of the prefix follows the fill's command at once, not the fill's end."""

import asyncio

import pytest

from parrot_lc.engine import SamplingParams
from parrot_lc.server.graph import Piece
from parrot_lc.server.local import build_manager
from parrot_lc.server.manager import CompletionPrompt
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
            return await fill(token_ids, context_id, *args, **kwargs)

        engine.fill = recording_fill
        head = "You keep the tide tables of a small harbour and answer its pilots. " * 3
        prompt = head + "When is high tide?"
        pieces = [Piece("text", head), Piece("text", prompt[len(head):])]
        completion = manager.start_completion([CompletionPrompt(pieces, manager.prompts.tokenize(prompt),
                                                                SamplingParams(max_tokens=2, temperature=0))])
        sent = list(fills)
        assert "".join([text async for _, text in completion.deltas()])
        await manager.end_completion(completion)
        manager.close()
        return sent

    assert [context.split("/")[0] for context in asyncio.run(main())] == ["prefix"]


def test_a_fork_of_a_new_prefix_is_sent_before_the_prefix_is_filled():
    """The engine takes commands in order, so a call's fork waits there for its prefix's fill: it starts in the
    step after the fill's, not a round trip through the server later."""

    async def main() -> tuple[list[str], str, str]:
        # 32-token steps: the prefix's fill takes a dozen of them.
        manager = build_manager(EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20,
                                               max_num_batched_tokens=32), ServerSettings(engine_processes=False))
        engine, order = manager.engines[0].engine, []
        fill, generate = engine.fill, engine.generate

        async def recording_fill(token_ids, context_id, *args, **kwargs):
            cached = await fill(token_ids, context_id, *args, **kwargs)
            order.append("prefix filled")
            return cached

        def recording_generate(sampling, context_id, parent_context_id=None, *args, **kwargs):
            order.append("fork sent" if parent_context_id else "generate sent")
            return generate(sampling, context_id, parent_context_id, *args, **kwargs)

        engine.fill, engine.generate = recording_fill, recording_generate
        head = "You keep the tide tables of a small harbour and answer its pilots about the tides. " * 6
        prompt = head + "When is high tide?"
        sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        pieces = [Piece("text", head), Piece("text", prompt[len(head):])]
        completion = manager.start_completion([CompletionPrompt(pieces, manager.prompts.tokenize(prompt), sampling)])
        forked = "".join([text async for _, text in completion.deltas()])
        await manager.end_completion(completion)
        alone = manager.start_completion([CompletionPrompt([Piece("text", prompt)], manager.prompts.tokenize(prompt),
                                                           sampling)])
        unforked = "".join([text async for _, text in alone.deltas()])
        await manager.end_completion(alone)
        manager.close()
        return order, forked, unforked

    order, forked, unforked = asyncio.run(main())
    assert order[:2] == ["fork sent", "prefix filled"]
    assert forked == unforked
