"""Overlapped steps (`overlap_steps`): a step is launched before the tokens of the step before are read back, and
nothing a request computes or streams changes. On the CPU nothing overlaps, but the bookkeeping is the same as
on a GPU: placeholders for tokens in flight, events one step later, a token computed for nothing after a stop."""

import functools
import itertools

import pytest
import torch

from parrot_lc.engine import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def prompts(n: int) -> list[list[int]]:
    return [torch.randint(3, 1024, (5 + 11 * i,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(n)]


def streams(engine, first_wave, second_wave) -> list[tuple[list[int], str, str | None]]:
    """Submits the first wave, steps twice, submits the second, steps until all end; each request's tokens,
    text and finish reason, in submission order."""
    requests = [submit() for submit in first_wave]
    events = {r.request_id: [] for r in requests}
    for step in itertools.count():
        if step == 2:
            for submit in second_wave:
                requests.append(submit())
                events[requests[-1].request_id] = []
        elif step > 2 and not engine.has_work():
            break
        for output in engine.step():
            events[output.request_id].append(output)
    return [([t for e in events[r.request_id] for t in e.token_ids], "".join(e.text for e in events[r.request_id]),
             events[r.request_id][-1].finish_reason) for r in requests]


def mixed_load(engine):
    """Forks of a shared prefix and unforked prompts, prefilled in chunks beside decodes, with different
    lengths and a stop token, submitted in two waves."""
    engine.fill(list(range(3, 60)), "prefix")
    samplings = [SamplingParams(max_tokens=1, **GREEDY), SamplingParams(max_tokens=2, **GREEDY),
                 SamplingParams(max_tokens=9, **GREEDY), SamplingParams(max_tokens=17, **GREEDY),
                 SamplingParams(max_tokens=17, stop_token_ids=(504,), **GREEDY)]
    first = [functools.partial(engine.submit_generate, samplings[i % 5], f"fork{i}", "prefix", token_ids=p)
             for i, p in enumerate(prompts(5))]
    second = [functools.partial(engine.submit_generate, samplings[i % 5], f"own{i}", token_ids=p)
              for i, p in enumerate(prompts(5))]
    return streams(engine, first, second)


def test_overlapped_steps_generate_what_steps_one_at_a_time_generate(make_engine):
    overlapped = make_engine(overlap_steps=True, max_num_batched_tokens=48)
    alone = make_engine(overlap_steps=False, max_num_batched_tokens=48)
    assert mixed_load(overlapped) == mixed_load(alone)


def test_a_request_stopped_by_a_token_leaves_its_context_as_without_overlap(make_engine):
    contexts = []
    for overlap in (True, False):
        engine = make_engine(overlap_steps=overlap)
        engine.fill(list(range(3, 30)), "c")
        first = next(iter(engine.generate(SamplingParams(max_tokens=1, **GREEDY), "c"))).token_ids[0]
        engine.free_context("c")
        engine.fill(list(range(3, 30)), "c")
        # With overlap, the second token is computed before the first is read back and found to stop.
        stop = SamplingParams(max_tokens=20, stop_token_ids=(first,), **GREEDY)
        assert [t for e in engine.generate(stop, "c") for t in e.token_ids] == [first]
        contexts.append(list(engine.tree.get("c").token_ids))
        # The context goes on from there: a fill and a generate see exactly the tokens above.
        engine.fill([7, 8], "c")
        contexts.append([t for e in engine.generate(SamplingParams(max_tokens=5, **GREEDY), "c") for t in e.token_ids])
    assert contexts[:2] == contexts[2:]
    assert min(contexts[0]) >= 0


def test_min_tokens_ends_its_ban_after_the_same_token_as_without_overlap(make_engine):
    """A token still on the device counts towards min_tokens: the fourth token of a seeded run, a stop token
    banned for the first three, ends the output there, overlapped or not."""
    outputs = []
    for overlap in (True, False):
        engine = make_engine(overlap_steps=overlap)
        engine.fill(list(range(3, 30)), "c")
        free_run = [t for e in engine.generate(SamplingParams(max_tokens=8, seed=1, ignore_eos=True), "c")
                    for t in e.token_ids]
        engine.free_context("c")
        engine.fill(list(range(3, 30)), "c")
        held = SamplingParams(max_tokens=8, seed=1, ignore_eos=True, stop_token_ids=(free_run[3],), min_tokens=3)
        outputs.append([t for e in engine.generate(held, "c") for t in e.token_ids])
    assert outputs[0] == outputs[1] == free_run[:4]


def test_a_request_cancelled_while_its_token_is_on_the_device_leaves_no_placeholder(make_engine):
    engine = make_engine(overlap_steps=True)
    engine.fill(list(range(3, 30)), "c")
    request = engine.submit_generate(SamplingParams(max_tokens=50, **GREEDY), "c")
    for _ in range(4):
        engine.step()
    assert request.num_in_flight == 1
    engine.cancel(request.request_id)
    assert min(engine.tree.get("c").token_ids) >= 0
    engine.step()  # reads back the step in flight: the cancelled request gets no event
    assert not engine.has_work()
    list(engine.generate(SamplingParams(max_tokens=3, **GREEDY), "c"))  # the context serves on


def test_contexts_freed_while_a_step_is_in_flight_leak_no_block(make_engine):
    engine = make_engine(overlap_steps=True)
    engine.fill(list(range(3, 40)), "prefix")
    for i in range(3):
        engine.submit_generate(SamplingParams(max_tokens=30, **GREEDY), f"f{i}", "prefix", token_ids=[5 + i] * 20)
    for _ in range(3):
        engine.step()
    for i in range(3):
        engine.free_context(f"f{i}")
    engine.free_context("prefix")
    while engine.has_work():
        assert all(o.error is None for o in engine.step())
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("overlap", [True, False])
def test_each_step_returns_the_tokens_of_the_step_launched_before_it_when_overlapped(make_engine, overlap):
    engine = make_engine(overlap_steps=overlap)
    engine.fill(list(range(3, 30)), "c")
    engine.submit_generate(SamplingParams(max_tokens=3, **GREEDY), "c")
    tokens_per_step = []
    while engine.has_work():
        tokens_per_step.append(sum(len(o.token_ids) for o in engine.step()))
    assert tokens_per_step == ([0, 1, 1, 1] if overlap else [1, 1, 1])


def test_a_step_with_prompt_tokens_reads_the_step_before_back_before_it_launches(make_engine, monkeypatch):
    """A decode step launches, then reads back the step before; a step with a prompt to prefill (a long launch,
    not a CUDA graph) reads it back first, so that its events (here a first token) do not wait behind."""
    engine = make_engine(overlap_steps=True)
    calls = []
    for name in ("_complete", "_launch"):
        method = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *args, method=method, name=name: calls.append(name) or method(*args))
    engine.fill(list(range(3, 30)), "a")
    first = engine.submit_generate(SamplingParams(max_tokens=20, **GREEDY), "a")
    engine.step()  # a's prompt is computed already: it samples, nothing in flight before it
    calls.clear()
    engine.step()  # a decode step
    assert calls == ["_launch", "_complete"]
    engine.submit_generate(SamplingParams(max_tokens=5, **GREEDY), "b", token_ids=list(range(40, 60)))
    calls.clear()
    outputs = engine.step()  # b's prompt beside a's decode
    assert calls == ["_complete", "_launch"]
    assert [o.request_id for o in outputs] == [first.request_id]


def test_sampled_requests_overlap_too_and_keep_their_seeds(make_engine):
    outputs = []
    for overlap in (True, False):
        engine = make_engine(overlap_steps=overlap)
        engine.fill(list(range(3, 30)), "c")
        requests = [engine.submit_generate(SamplingParams(max_tokens=8, temperature=0.9, seed=seed), f"c{seed}", "c")
                    for seed in (7, 8)]
        first = engine.step()
        assert len(first) == (0 if overlap else 2)  # with overlap, the tokens come back with the next step
        events = engine.run_until_done(requests)
        outputs.append([[t for e in first + events[r.request_id] if e.request_id == r.request_id
                         for t in e.token_ids] for r in requests])
    assert outputs[0] == outputs[1]


def test_a_step_that_fails_after_its_batch_ran_leaves_every_context_consistent(make_engine, monkeypatch):
    """The batch computed a token whose value never came back: the context drops it and computes its last
    token again, so that what it holds next is what a context built without the failure holds."""
    engine = make_engine(overlap_steps=True)
    engine.fill(list(range(3, 30)), "c")
    request = engine.submit_generate(SamplingParams(max_tokens=20, **GREEDY), "c")
    for _ in range(3):
        engine.step()
    sample = engine.sampler.sample
    monkeypatch.setattr(engine.sampler, "sample", lambda *args: (_ for _ in ()).throw(RuntimeError("device error")))
    outputs = engine.step()
    monkeypatch.setattr(engine.sampler, "sample", sample)
    assert [o.finish_reason for o in outputs if o.request_id == request.request_id][-1] == "error"
    context = engine.tree.get("c")
    assert min(context.token_ids) >= 0 and context.num_pending >= 0
    engine.fill([700, 800, 900], "c")
    reference = make_engine(overlap_steps=False)
    reference.fill(list(context.token_ids), "c")
    assert torch.allclose(engine.context_logits("c"), reference.context_logits("c"), atol=1e-5)


def test_a_request_ended_by_a_token_read_back_in_a_failing_step_gets_its_last_event(make_engine, monkeypatch):
    engine = make_engine(overlap_steps=True)
    engine.fill(list(range(3, 30)), "a")
    a = engine.submit_generate(SamplingParams(max_tokens=3, **GREEDY), "a")
    events = []
    while a.num_generated < 3:  # until a's last token is on the device
        events += engine.step()
    b = engine.submit_generate(SamplingParams(max_tokens=3, **GREEDY), "b", token_ids=list(range(40, 60)))
    # b's prompt makes the step read a's last token back first; then its launch fails.
    monkeypatch.setattr(engine.runner, "run", lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    events += engine.step()
    assert [e.finish_reason for e in events if e.request_id == a.request_id][-1] == "length"
    assert [e.finish_reason for e in events if e.request_id == b.request_id] == ["error"]
    assert not engine.has_work()
