"""Resetting the prefix cache: the blocks that no context holds are dropped from the block cache and freed, so the
next prompts compute everything and give what they gave warm; contexts, forks and running requests keep their
blocks and generate unchanged; the reset runs between steps in the engine's thread or process."""

import asyncio

import torch

from conftest import greedy_text_ids
from parrot_lc.engine import SamplingParams
from parrot_lc.engine.async_engine import AsyncEngine
from parrot_lc.engine.process_engine import ProcessEngine
from parrot_lc.settings import EngineSettings

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fill(engine, context_id, prompt: list[int]) -> int:
    """Fills a new context with `prompt`; returns the prompt tokens it took from the block cache."""
    request = engine.submit_fill(prompt, context_id)
    return engine.run_until_done([request])[request.request_id][-1].cached_tokens


def test_after_a_reset_a_repeated_prompt_computes_everything_and_gives_the_same_logits_and_tokens(tiny):
    prompt = random_tokens(40, 0)
    fill(tiny, "first", prompt)
    tiny.free_context("first")
    assert fill(tiny, "warm", prompt) == 32
    warm_logits, warm_tokens = tiny.context_logits("warm"), greedy_text_ids(tiny, "warm", 8)
    tiny.free_context("warm")
    free_before = tiny.stats().kv_blocks_free

    assert tiny.reset_prefix_cache() == 2  # the prompt's two full blocks
    assert tiny.stats().kv_blocks_free == free_before  # unused cached blocks counted as free already
    assert fill(tiny, "cold", prompt) == 0
    assert torch.allclose(tiny.context_logits("cold"), warm_logits, atol=1e-5)
    assert greedy_text_ids(tiny, "cold", 8) == warm_tokens


def test_a_reset_leaves_a_context_its_running_fork_and_their_later_tokens_unchanged(make_engine):
    engine, uncached = make_engine(), make_engine(prefix_caching=False)
    parent, suffix = random_tokens(40, 1), random_tokens(9, 2)
    engine.fill(random_tokens(33, 3), "gone")
    engine.free_context("gone")  # two unused cached blocks
    engine.fill(parent, "parent")
    running = engine.submit_generate(GREEDY, "fork", "parent", token_ids=suffix)
    tokens = [t for _ in range(3) for event in engine.step() for t in event.token_ids]
    held = {name: list(engine.tree.get(name).blocks) for name in ("parent", "fork")}
    refs = {block: engine.allocator.refcount(block) for blocks in held.values() for block in blocks}

    assert engine.reset_prefix_cache() == 2
    assert {name: engine.tree.get(name).blocks for name in held} == held
    assert {block: engine.allocator.refcount(block) for block in refs} == refs
    tokens += [t for event in engine.run_until_done([running])[running.request_id] for t in event.token_ids]
    uncached.fill(parent, "parent")
    uncached.fill(suffix, "fork", "parent")
    assert tokens == greedy_text_ids(uncached, "fork", 8)
    assert greedy_text_ids(engine, "parent", 8) == greedy_text_ids(uncached, "parent", 8)


def test_blocks_that_a_context_holds_stay_in_the_cache(tiny):
    prompt = random_tokens(40, 4)
    tiny.fill(prompt, "held")
    assert tiny.reset_prefix_cache() == 0
    assert fill(tiny, "again", prompt) == 32


def test_an_engine_without_prefix_caching_has_nothing_to_reset(make_engine):
    engine = make_engine(prefix_caching=False)
    engine.fill(random_tokens(40, 5), "a")
    engine.free_context("a")
    assert engine.reset_prefix_cache() == 0


async def reset_while_generating(engine) -> tuple[int, list[int]]:
    """Generates a prompt; while another request generates, resets; then generates the prompt again. Returns the
    blocks freed and the second run's cached tokens, event by event."""
    prompt = random_tokens(40, 6)
    async for _ in engine.generate(GREEDY, "first", token_ids=prompt):
        pass
    await engine.free_context("first")
    running = engine.generate(SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), "running",
                              token_ids=random_tokens(20, 7))
    await anext(running)
    freed = await engine.reset_prefix_cache()  # sent between that request's steps
    async for _ in running:
        pass
    cold = [event.cached_tokens async for event in engine.generate(GREEDY, "cold", token_ids=prompt)]
    return freed, cold


def test_the_reset_runs_between_the_steps_of_the_engines_thread(tiny):
    engine = AsyncEngine(tiny)
    try:
        freed, cold = asyncio.run(reset_while_generating(engine))
    finally:
        engine.close()
    assert freed == 2 and set(cold) == {0}


def test_the_reset_crosses_the_process_engines_pipe():
    engine = ProcessEngine(EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20))
    try:
        freed, cold = asyncio.run(reset_while_generating(engine))
    finally:
        engine.close()
    assert freed == 2 and set(cold) == {0}
