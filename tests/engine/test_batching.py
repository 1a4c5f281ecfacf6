"""Continuous batching changes nothing in what each request computes."""

import torch

from parrot_lc.engine import SamplingParams


def test_greedy_generation_of_8_mixed_length_prompts_in_one_batch_equals_each_alone(make_engine):
    prompts = [torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 17, 40, 5, 64, 33, 1, 90)]
    sampling = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    alone = []
    for i, prompt in enumerate(prompts):
        engine = make_engine()
        engine.fill(prompt, i)
        alone.append([t for e in engine.generate(sampling, i) for t in e.token_ids])

    engine = make_engine(max_num_batched_tokens=64)  # prefill chunks and decodes share steps
    fills = [engine.submit_fill(p, i) for i, p in enumerate(prompts)]
    engine.run_until_done(fills)
    gens = [engine.submit_generate(sampling, i) for i in range(len(prompts))]
    events = engine.run_until_done(gens)
    batched = [[t for e in events[g.request_id] for t in e.token_ids] for g in gens]
    assert batched == alone


def test_prefill_and_decode_run_in_the_same_step(tiny):
    tiny.fill([5, 6, 7], "a")
    decoding = tiny.submit_generate(SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True), "a")
    tiny.step()
    filling = tiny.submit_fill(list(range(3, 200)), "b")
    tiny.step()
    assert tiny.stats().num_running == 2
    tiny.run_until_done([decoding, filling])


def test_higher_priority_requests_are_scheduled_first(make_engine):
    engine = make_engine(max_num_seqs=1)
    low = engine.submit_fill([5, 6, 7], "low", priority=0)
    high = engine.submit_fill([8, 9, 10], "high", priority=5)
    finished = [o.request_id for o in engine.step() if o.finished]
    assert finished == [high.request_id]
    engine.run_until_done([low])


def test_stats_count_prefilled_decoded_and_reused_tokens(tiny):
    tiny.fill(list(range(3, 40)), "p")
    list(tiny.generate(SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), "g", "p"))
    stats = tiny.stats()
    assert (stats.prefill_tokens, stats.decode_tokens, stats.reused_tokens) == (37, 4, 37)
    assert stats.num_contexts == 2 and stats.kv_blocks_used > 0


def test_the_step_log_has_a_line_per_step_that_adds_up_to_the_stats(make_engine, tmp_path):
    import json

    # Without the block cache: the prompts' common blocks would be computed once, the other two waiting a step.
    engine = make_engine(step_log=tmp_path / "steps.jsonl", prefix_caching=False)
    sampling = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.run_until_done([engine.submit_generate(sampling, i, token_ids=list(range(3, 40 + i))) for i in range(3)])
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    stats = engine.stats()
    assert sum(s["launched"] for s in steps) == stats.num_steps == 5  # the prompts together, then 4 decodes
    assert sum(s["prefill_tokens"] for s in steps) == stats.prefill_tokens == 37 + 38 + 39
    assert sum(s["decode_tokens"] for s in steps) == stats.decode_tokens == 3 * 4
    assert sum(s["events"] for s in steps) == 3 * 5
    assert all(s["ms"] >= 0 for s in steps) and [s["t"] for s in steps] == sorted(s["t"] for s in steps)


def prefilled_beside_a_decode(engine, decode_priority: int, fill_priority: int) -> int:
    """Tokens of a 300-token prompt prefilled in the first step it shares with another request's decode."""
    engine.fill([5, 6, 7], "chat")
    engine.submit_generate(SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True), "chat",
                           priority=decode_priority)
    engine.step()
    before = engine.stats().prefill_tokens
    engine.submit_fill(list(range(3, 303)), "job", priority=fill_priority)
    engine.step()
    return engine.stats().prefill_tokens - before


def test_a_step_decoding_for_a_more_important_request_prefills_less_important_prompts_in_small_pieces(make_engine):
    engine = make_engine(max_num_batched_tokens=256, background_prefill_tokens=32)
    assert prefilled_beside_a_decode(engine, decode_priority=2, fill_priority=1) == 32


def test_prompts_as_important_as_the_decoding_requests_take_the_whole_step_budget(make_engine):
    engine = make_engine(max_num_batched_tokens=256, background_prefill_tokens=32)
    assert prefilled_beside_a_decode(engine, decode_priority=1, fill_priority=1) == 255  # 256 less the decode's one


def test_a_generate_that_carries_its_prompt_equals_a_fill_then_a_generate(make_engine):
    prefix = torch.randint(3, 1024, (21,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = torch.randint(3, 1024, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    separate, merged = make_engine(), make_engine()
    for engine in (separate, merged):
        engine.fill(prefix, "prefix")
    separate.fill(prompt, "call", "prefix")
    expected = [t for e in separate.generate(sampling, "call") for t in e.token_ids]
    request = merged.submit_generate(sampling, "call", "prefix", token_ids=prompt)
    events = merged.run_until_done([request])[request.request_id]
    assert [t for e in events for t in e.token_ids] == expected
    assert merged.stats().prefill_tokens == separate.stats().prefill_tokens  # the prompt counts as prefill
    assert len(events) == len(expected)  # no event for the fill: the first one brings the first token


def test_a_preempted_request_recomputing_its_context_is_prefilled_as_background_work(make_engine):
    # Without the block cache, which would give the job back most of its dropped KV instead.
    engine = make_engine(max_num_batched_tokens=256, background_prefill_tokens=32, prefix_caching=False)
    decoding = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    engine.fill([5, 6, 7], "chat")
    engine.submit_generate(decoding, "chat", priority=2)
    engine.fill(list(range(3, 203)), "job")
    job = engine.submit_generate(decoding, "job", priority=1)
    engine.step()
    engine.step()  # both decoding
    engine.tree.release_own_blocks(job.context)  # preempted, as the scheduler does when blocks run out
    def computed() -> int:
        stats = engine.stats()
        return stats.prefill_tokens + stats.decode_tokens

    before = computed()
    engine.step()
    assert computed() - before == 1 + 32  # the chat's token and a background piece of the job's context
