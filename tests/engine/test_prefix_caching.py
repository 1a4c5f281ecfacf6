"""Prefix caching by content: a context takes the cached KV blocks of any earlier prompt that begins like its own,
whoever sent it, and computes the same logits as without them; blocks that no context holds make room least
recently used first; requests that arrive together compute their common blocks once; the tokens served from the
cache are counted, from the engine's events to the OpenAI-compatible usage and /metrics."""

import asyncio
import dataclasses
import re

import httpx
import openai
import pytest
import torch

from conftest import assert_logits_follow_reference, generate_from_all, greedy_text_ids
from parrot_lc.engine import EngineStats, SamplingParams
from parrot_lc.engine.process_engine import ProcessEngine
from parrot_lc.server.local import LocalServer
from parrot_lc.server.remote_engine import RemoteEngine
from parrot_lc.settings import EngineSettings

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # tiny: layers * (k, v) * block of 16 * kv heads * head dim * float32


def random_tokens(n: int, seed: int, vocab: int = 1024) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generated(events) -> list[int]:
    return [t for event in events for t in event.token_ids]


# ---- the engine -------------------------------------------------------------------------------------------


def test_a_prompt_that_begins_like_an_earlier_one_takes_its_full_blocks(tiny):
    shared = random_tokens(40, 0)  # two full blocks and half of one
    tiny.fill(shared + random_tokens(5, 1), "a")
    tiny.fill(shared + random_tokens(7, 2), "b")
    a, b = tiny.tree.get("a"), tiny.tree.get("b")
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    stats = tiny.stats()
    assert (stats.cached_tokens, stats.prefill_tokens, stats.reused_tokens) == (32, 45 + 47 - 32, 0)


@pytest.mark.parametrize("prompt_len", [32, 37])  # a prompt of whole blocks keeps its last one to compute
def test_cached_blocks_give_the_logits_and_tokens_of_computing_them(make_engine, prompt_len):
    cached, uncached = make_engine(), make_engine(prefix_caching=False)
    prompt = random_tokens(prompt_len, 0)
    for engine in (cached, uncached):
        engine.fill(prompt + random_tokens(3, 9), "earlier")
        engine.fill(prompt, "later")
    assert cached.stats().cached_tokens == 16 * ((prompt_len - 1) // 16)
    assert torch.allclose(cached.context_logits("later"), uncached.context_logits("later"), atol=1e-5)
    assert greedy_text_ids(cached, "later", 12) == greedy_text_ids(uncached, "later", 12)


@pytest.mark.parametrize("family", ["llama", "mistral-sliding-window"])
def test_cached_blocks_give_the_reference_models_logits(make_engine, hf_checkpoint, family):
    path, reference = hf_checkpoint(family)
    engine = make_engine(model=str(path))
    prompt = random_tokens(53, 3, vocab=512)
    engine.fill(prompt + [7, 8, 9], "warm")
    assert_logits_follow_reference(engine, reference, prompt, steps=5)  # its prompt takes the warm blocks
    assert engine.stats().cached_tokens == 48


def test_requests_that_arrive_together_compute_their_common_blocks_once(make_engine):
    shared = random_tokens(100, 0)
    prompts = [shared + random_tokens(4, 10 + i) for i in range(8)]

    def run(engine):
        requests = [engine.submit_generate(GREEDY, i, token_ids=p) for i, p in enumerate(prompts)]
        events = engine.run_until_done(requests)
        return [generated(events[r.request_id]) for r in requests], [events[r.request_id][0].cached_tokens
                                                                     for r in requests]

    engine = make_engine()
    together, cached = run(engine)
    alone, _ = run(make_engine(prefix_caching=False))
    assert together == alone
    # The first computes the six full blocks of the instruction; the others wait a step and take them.
    assert cached == [0] + [96] * 7
    assert engine.stats().prefill_tokens == 104 + 7 * 8


@pytest.mark.parametrize("budget", [24, 64, 100])
def test_a_common_prompt_longer_than_a_steps_budget_is_computed_once(make_engine, budget):
    shared = random_tokens(200, 0)  # 12 full blocks and half of one, over 2 to 9 steps' token budget
    prompts = [shared + random_tokens(5, 10 + i) for i in range(4)]
    engine = make_engine(max_num_batched_tokens=budget)
    requests = [engine.submit_generate(GREEDY, i, token_ids=p) for i, p in enumerate(prompts)]
    events = engine.run_until_done(requests)
    # The first computes its 205 tokens; each other waits while the first fills the blocks it would compute, then
    # takes the 12 common blocks and computes its last 13 tokens.
    assert engine.stats().prefill_tokens == 205 + 3 * 13
    assert [events[r.request_id][0].cached_tokens for r in requests] == [0, 192, 192, 192]
    uncached = make_engine(prefix_caching=False)
    for i, prompt in enumerate(prompts):
        uncached.fill(prompt, i)
    assert [generated(events[r.request_id]) for r in requests] == [greedy_text_ids(uncached, i, 8) for i in range(4)]


def test_requests_waiting_for_a_filler_that_is_cancelled_compute_the_rest_themselves(make_engine):
    shared = random_tokens(200, 0)
    prompts = [shared + random_tokens(5, 10 + i) for i in range(3)]
    engine = make_engine(max_num_batched_tokens=64)
    filler, *waiting = [engine.submit_generate(GREEDY, i, token_ids=p) for i, p in enumerate(prompts)]
    engine.step()  # the filler computes blocks 0-3; the others wait for them
    engine.cancel(filler.request_id)
    events = engine.run_until_done(waiting)
    # The first of the others takes the filler's 4 blocks and computes the rest; the last takes all 12.
    assert engine.stats().prefill_tokens == 64 + (205 - 64) + 13
    assert [events[r.request_id][0].cached_tokens for r in waiting] == [64, 192]
    uncached = make_engine(prefix_caching=False)
    for i, prompt in enumerate(prompts[1:]):
        uncached.fill(prompt, i)
    assert [generated(events[r.request_id]) for r in waiting] == [greedy_text_ids(uncached, i, 8) for i in range(2)]


def test_requests_waiting_for_a_filler_that_is_preempted_finish_unchanged(make_engine):
    shared = random_tokens(200, 0)
    prompts = [shared + random_tokens(5, 10 + i) for i in range(2)]
    urgent_prompt = random_tokens(250, 7)
    engine = make_engine(kv_cache_bytes=20 * BLOCK_BYTES, max_num_batched_tokens=64)
    requests = [engine.submit_generate(GREEDY, i, token_ids=p) for i, p in enumerate(prompts)]
    engine.step()
    engine.step()  # the filler has computed 8 blocks, the other taken 4 and waits for the next
    # 16 blocks of 20 for a more important request: the two are preempted, the filler among them.
    requests.append(engine.submit_generate(GREEDY, "urgent", token_ids=urgent_prompt, priority=5))
    tokens = {r.request_id: [] for r in requests}
    while engine.has_work():
        for output in engine.step():
            assert output.error is None
            tokens[output.request_id] += output.token_ids
            if output.finished:  # as the server frees a call's context
                engine.free_context(output.context_id)
    assert engine.stats().num_preemptions > 0
    uncached = make_engine(prefix_caching=False)
    for name, prompt in [*enumerate(prompts), ("urgent", urgent_prompt)]:
        uncached.fill(prompt, name)
    assert [tokens[r.request_id] for r in requests] == [greedy_text_ids(uncached, name, 8) for name in (0, 1, "urgent")]


def test_a_block_is_taken_only_once_its_kv_is_computed(make_engine):
    engine = make_engine(max_num_batched_tokens=24)  # the 60-token prompt takes three steps
    cache = engine.allocator.cache
    prompt = random_tokens(60, 0)
    first = engine.submit_fill(prompt, "first")
    engine.step()  # tokens 0-23: block 0 computed, block 1 half
    context = engine.tree.get("first")
    assert cache.get(engine.tree.block_key(context, 0)) == context.blocks[0]
    assert cache.get(engine.tree.block_key(context, 1)) is None
    second = engine.submit_fill(prompt, "second")
    engine.step()  # the first computes tokens 24-47, completing blocks 1 and 2: the second takes block 0 and waits
    assert engine.tree.get("second").num_computed == 16
    engine.run_until_done([first, second])
    assert engine.tree.get("second").blocks[:3] == context.blocks[:3]
    assert engine.stats().prefill_tokens == 60 + 12
    uncached = make_engine(prefix_caching=False)
    uncached.fill(prompt, "alone")
    assert torch.allclose(engine.context_logits("second"), uncached.context_logits("alone"), atol=1e-5)


def test_unused_cached_blocks_make_room_least_recently_used_first_and_held_ones_never(make_engine):
    engine = make_engine(kv_cache_bytes=8 * BLOCK_BYTES)
    a, b, held = random_tokens(33, 1), random_tokens(33, 2), random_tokens(17, 3)
    for name, prompt in (("a", a), ("b", b), ("a again", a)):  # a's blocks are the last ones let go
        engine.fill(prompt, name)
        engine.free_context(name)
    engine.fill(held, "held")
    assert (engine.stats().kv_blocks_used, engine.stats().kv_blocks_free) == (2, 6)  # 4 of the free ones cached
    engine.fill(random_tokens(64, 4), "big")  # 4 blocks: the 2 empty ones, then b's (released before a's)
    engine.free_context("big")
    hits = engine.stats().cached_tokens
    engine.fill(a, "a third")
    assert engine.stats().cached_tokens == hits + 32
    engine.fill(b, "b again")
    assert engine.stats().cached_tokens == hits + 32
    uncached = make_engine(prefix_caching=False)
    uncached.fill(held, "held")
    assert greedy_text_ids(engine, "held", 4) == greedy_text_ids(uncached, "held", 4)


def test_preempted_requests_with_cached_blocks_finish_unchanged(make_engine):
    shared = random_tokens(20, 0)
    prompts = [shared + random_tokens(12, 10 + i) for i in range(6)]
    sampling = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    roomy = generate_from_all(make_engine(prefix_caching=False), prompts, sampling)
    engine = make_engine(kv_cache_bytes=10 * BLOCK_BYTES)  # 6 contexts of 52 tokens, sharing one block, need 19
    assert generate_from_all(engine, prompts, sampling) == roomy
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.cached_tokens >= 5 * 16 and stats.kv_blocks_used == 0
    assert all(engine.allocator.refcount(b) == 0 for b in range(engine.allocator.num_blocks))


def test_a_preempted_context_takes_its_blocks_back_from_the_cache_but_counts_no_hit(make_engine):
    engine, uncached = make_engine(), make_engine(prefix_caching=False)
    prompt = random_tokens(50, 0)
    engine.fill(prompt, "job")
    job = engine.submit_generate(SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), "job")
    tokens = generated(engine.step() + engine.step())  # its first two tokens; the second is not computed yet
    engine.tree.release_own_blocks(job.context)  # preempted, as the scheduler does when blocks run out
    before = engine.stats()
    tokens += generated(engine.step())
    after = engine.stats()
    assert after.prefill_tokens - before.prefill_tokens == 52 - 48  # blocks 0-2 came back from the cache
    assert after.cached_tokens == before.cached_tokens
    tokens += generated(engine.run_until_done([job])[job.request_id])
    uncached.fill(prompt, "job")
    assert tokens == greedy_text_ids(uncached, "job", 10)


def test_forgetting_kv_inside_a_shared_block_lets_the_block_go_instead_of_writing_it(make_engine):
    engine, uncached = make_engine(), make_engine(prefix_caching=False)
    prompt = random_tokens(40, 0)
    engine.fill(prompt, "a")
    engine.fill(prompt + [5], "b")  # takes a's blocks 0 and 1
    b = engine.tree.get("b")
    shared = b.blocks[1]
    engine.tree.uncompute(b, 20)  # as a failed step's last token is: token 20 lies in the shared block 1
    assert b.num_computed == 16 and shared not in b.blocks and engine.allocator.refcount(shared) == 1
    engine.fill([6], "b")
    uncached.fill(prompt + [5, 6], "b")
    assert torch.allclose(engine.context_logits("b"), uncached.context_logits("b"), atol=1e-5)


def test_requests_that_share_cached_blocks_read_them_as_one_shared_prefix(make_engine, monkeypatch):
    # The torch reference: it reads a group's prefix once in decode steps too.
    engine, uncached = make_engine(attention_backend="torch"), make_engine(prefix_caching=False)
    engine.runner.min_shared_elements = engine.runner.min_shared_elements_decode = 0  # however small the prefix
    prompts = [random_tokens(40, 0) + [6 + i] for i in range(3)]
    engine.fill(prompts[0][:40] + [5], "warm")
    steps = []
    shared_groups = engine.runner._shared_groups
    monkeypatch.setattr(engine.runner, "_shared_groups", lambda *args: steps.append(shared_groups(*args)) or steps[-1])
    requests = [engine.submit_generate(GREEDY, i, token_ids=p) for i, p in enumerate(prompts)]
    events = engine.run_until_done(requests)
    assert ([0, 1, 2], 2) in [group for groups in steps for group in groups]  # 3 sequences, the 2 cached blocks
    for i, prompt in enumerate(prompts):
        uncached.fill(prompt, i)
    assert [generated(events[r.request_id]) for r in requests] == [greedy_text_ids(uncached, i, 8) for i in range(3)]


def test_events_count_the_prompt_tokens_that_the_request_did_not_compute(tiny):
    prompt = random_tokens(40, 0)
    tiny.fill(prompt, "warm")

    def cached_tokens(request) -> list[int]:
        return [event.cached_tokens for event in tiny.run_until_done([request])[request.request_id]]

    assert set(cached_tokens(tiny.submit_generate(GREEDY, "again", token_ids=prompt + [5]))) == {32}
    assert set(cached_tokens(tiny.submit_generate(GREEDY, "fork", "warm", token_ids=[6]))) == {40}  # what it inherits
    assert set(cached_tokens(tiny.submit_generate(GREEDY, "warm", token_ids=[7]))) == {0}  # its own KV is no hit
    fill = tiny.submit_fill(prompt + random_tokens(20, 5), "cold")
    fork = tiny.submit_generate(GREEDY, "waiting fork", "cold", token_ids=[8])  # waits for the fill
    events = tiny.run_until_done([fill, fork])
    assert events[fill.request_id][-1].cached_tokens == 32
    assert {event.cached_tokens for event in events[fork.request_id]} == {60}


def test_the_setting_off_shares_no_block_between_prompts(make_engine):
    engine = make_engine(prefix_caching=False)
    prompt = random_tokens(40, 0)
    engine.fill(prompt, "a")
    engine.fill(prompt, "b")
    assert engine.allocator.cache is None
    assert not set(engine.tree.get("a").blocks) & set(engine.tree.get("b").blocks)
    assert (engine.stats().cached_tokens, engine.stats().prefill_tokens) == (0, 80)


# ---- across processes and HTTP ----------------------------------------------------------------------------


async def cached_tokens_of_a_prompt_run_twice(engine) -> tuple[list[int], list[int]]:
    prompt = random_tokens(40, 0)
    runs = []
    for name in ("first", "second"):
        runs.append([event.cached_tokens async for event in engine.generate(GREEDY, name, token_ids=prompt)])
        await engine.free_context(name)
    return runs[0], runs[1]


def test_cached_tokens_cross_the_process_engines_pipe():
    engine = ProcessEngine(EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20))
    try:
        first, second = asyncio.run(cached_tokens_of_a_prompt_run_twice(engine))
        assert set(first) == {0} and set(second) == {32}
        assert engine.stats().cached_tokens == 32
    finally:
        engine.close()


def test_cached_tokens_cross_the_remote_engines_http_events(engine_app_urls):
    [url] = engine_app_urls("key", 1)

    async def scenario() -> tuple[list[int], list[int], EngineStats]:
        zero = EngineStats(**dict.fromkeys((f.name for f in dataclasses.fields(EngineStats)), 0))
        engine = RemoteEngine(url, zero, authorization="Bearer key")
        runs = await cached_tokens_of_a_prompt_run_twice(engine)
        await engine.probe(5.0)
        return *runs, engine.stats()

    first, second, stats = asyncio.run(scenario())
    assert set(first) == {0} and set(second) == {32} and stats.cached_tokens == 32


# ---- the OpenAI-compatible server ---------------------------------------------------------------------------

UNIT = "Read the harbour log below and answer the question about it in one short sentence, citing the entry. "
INSTRUCTION = UNIT * 17 + "Read the log"  # 753 tokens of the tiny tokenizer: 47 full blocks, then the question


@pytest.fixture(scope="module", params=[True, False], ids=["caching", "no caching"])
def served(request) -> tuple[LocalServer, bool]:
    """A server, and whether its engine caches prefixes."""
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=64 * 2**20,
                              prefix_caching=request.param)
    with LocalServer(settings) as server:
        yield server, request.param


def counter(server: LocalServer, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return float(re.search(rf"^{name}_total (\S+)$", text, re.M).group(1))


def test_concurrent_completions_with_a_shared_instruction_compute_it_once(served):
    server, caching = served
    prompts = [f"{INSTRUCTION}\nQ{i}: who left?" for i in range(8)]
    assert len(server.manager.tokenizer(prompts[0]).input_ids) == 763
    before = {name: counter(server, name) for name in ("parrot_prefix_cached_tokens", "parrot_prefill_tokens")}

    async def complete_all():
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(client.completions.create(model="tiny", prompt=p, max_tokens=4,
                                                                    temperature=0) for p in prompts))

    usages = [response.usage for response in asyncio.run(complete_all())]
    prompt_tokens = sum(u.prompt_tokens for u in usages)
    cached_tokens = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert counter(server, "parrot_prefix_cached_tokens") - before["parrot_prefix_cached_tokens"] == cached_tokens
    assert counter(server, "parrot_prefill_tokens") - before["parrot_prefill_tokens"] == prompt_tokens - cached_tokens
    if caching:
        assert cached_tokens == 7 * 752 >= 0.85 * prompt_tokens  # the first computes what the others take
    else:
        assert cached_tokens == 0


def test_a_chat_counts_the_system_prompt_of_its_warm_prefix_context_as_cached(served):
    server, _ = served
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    system = "You answer questions about the tides of a small harbour, in one sentence. " * 4
    system_tokens = len(server.manager.tokenizer.apply_chat_template([{"role": "system", "content": system}]))
    cached = [client.chat.completions.create(
        model="tiny", max_tokens=2, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
    ).usage.prompt_tokens_details.cached_tokens for question in ("When is high tide?", "And low tide?")]
    # The second chat forks the prefix context that the first filled (either setting). (The first forks it too, and
    # counts it as well: the manager filled it for that chat as an engine request of its own.)
    assert cached[1] >= system_tokens - 1
