"""Forked contexts read their ancestors' KV: same logits as one unforked context, no full block copied."""

import pytest
import torch

from parrot_lc.engine import SamplingParams, cpu_kernels
from parrot_lc.engine.errors import ContextNotFoundError

from conftest import greedy_text_ids


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("prefix_len", [16, 21])  # a block boundary, and a partial last block
def test_forked_context_gives_the_logits_of_the_whole_prompt_in_one_context(tiny, prefix_len):
    prefix, suffix = random_tokens(prefix_len, 0), random_tokens(9, 1)
    tiny.fill(prefix, "prefix")
    tiny.fill(suffix, "fork", parent_context_id="prefix")
    tiny.fill(prefix + suffix, "whole")
    assert torch.allclose(tiny.context_logits("fork"), tiny.context_logits("whole"), atol=1e-5)


def test_fork_of_a_fork_gives_the_logits_of_the_whole_prompt(tiny):
    a, b, c = random_tokens(20, 0), random_tokens(13, 1), random_tokens(5, 2)
    tiny.fill(a, "a")
    tiny.fill(b, "ab", parent_context_id="a")
    tiny.fill(c, "abc", parent_context_id="ab")
    tiny.fill(a + b + c, "whole")
    assert torch.allclose(tiny.context_logits("abc"), tiny.context_logits("whole"), atol=1e-5)


def test_fork_shares_full_blocks_and_copies_only_the_partial_one(tiny):
    tiny.fill(random_tokens(16 * 3 + 5, 0), "prefix")  # 3 full blocks + 1 partial
    used = tiny.stats().kv_blocks_used
    tiny.fill(random_tokens(2, 1), "fork", parent_context_id="prefix")
    assert tiny.stats().kv_blocks_used == used + 1  # the copied partial block, which has room for 2 more
    assert tiny.stats().reused_tokens == 16 * 3 + 5


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_many_forks_generate_what_unforked_contexts_generate(make_engine, backend):
    if backend == "cpu" and not cpu_kernels.available():
        pytest.skip("parrot_lc._cpu is not built or not usable here")
    # Triton runs on the GPU when there is one, else in its CPU interpreter.
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    tiny = make_engine(attention_backend=backend, device=device)
    prefix = random_tokens(40, 0)
    suffixes = [random_tokens(n, 10 + n) for n in (1, 5, 16, 23)]
    tiny.fill(prefix, "prefix")
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i, suffix in enumerate(suffixes):
        tiny.fill(suffix, f"fork{i}", parent_context_id="prefix")
    forked = [tiny.submit_generate(sampling, f"fork{i}") for i in range(len(suffixes))]
    events = tiny.run_until_done(forked)  # all forks decode in one batch, sharing the prefix
    for i, suffix in enumerate(suffixes):
        tiny.fill(prefix + suffix, f"alone{i}")
        expected = greedy_text_ids(tiny, f"alone{i}", 12)
        got = [t for e in events[forked[i].request_id] for t in e.token_ids]
        assert got == expected


def test_parent_freed_while_fork_lives_keeps_the_shared_blocks(tiny):
    prefix = random_tokens(35, 0)
    tiny.fill(prefix, "prefix")
    tiny.fill(random_tokens(3, 1), "fork", parent_context_id="prefix")
    expected_logits = tiny.context_logits("fork").clone()
    tiny.free_context("prefix")
    tiny.fill(prefix + random_tokens(3, 1), "whole")
    assert torch.allclose(expected_logits, tiny.context_logits("whole"), atol=1e-5)
    assert greedy_text_ids(tiny, "fork", 6) == greedy_text_ids(tiny, "whole", 6)
    tiny.free_context("fork")
    tiny.free_context("whole")
    assert tiny.stats().kv_blocks_used == 0


def test_fork_submitted_while_parent_fills_waits_for_the_parent(tiny):
    prefix, suffix = random_tokens(30, 0), random_tokens(4, 1)
    parent = tiny.submit_fill(prefix, "prefix")
    child = tiny.submit_fill(suffix, "fork", parent_context_id="prefix")
    tiny.run_until_done([parent, child])
    tiny.fill(prefix + suffix, "whole")
    assert torch.allclose(tiny.context_logits("fork"), tiny.context_logits("whole"), atol=1e-5)


def test_generate_with_a_parent_forks_a_new_context(tiny):
    prefix = random_tokens(18, 0)
    tiny.fill(prefix, "prefix")
    forked = greedy_text_ids(tiny, "answer", 8, parent="prefix")
    tiny.fill(prefix, "alone")
    assert forked == greedy_text_ids(tiny, "alone", 8)
    assert tiny.stats().reused_tokens == 18


def test_a_fork_waiting_for_a_fill_that_ended_before_it_began_fails(tiny):
    parent = tiny.submit_fill(random_tokens(30, 0), "prefix")
    child = tiny.submit_generate(SamplingParams(max_tokens=2, temperature=0.0), "fork", parent_context_id="prefix")
    tiny.cancel(parent.request_id)
    final = tiny.run_until_done([child])[child.request_id][-1]
    assert isinstance(final.error, ContextNotFoundError)
    assert len(tiny.tree) == 0 and tiny.stats().kv_blocks_used == 0


def test_a_fork_of_a_fill_stopped_midway_computes_the_rest_of_the_prompt(make_engine):
    engine = make_engine(max_num_batched_tokens=16)  # the 40-token fill takes three steps
    prefix, suffix = random_tokens(40, 0), random_tokens(5, 1)
    parent = engine.submit_fill(prefix, "prefix")
    child = engine.submit_fill(suffix, "fork", parent_context_id="prefix")
    engine.step()
    engine.cancel(parent.request_id)
    engine.run_until_done([child])
    engine.fill(prefix + suffix, "whole")
    assert torch.allclose(engine.context_logits("fork"), engine.context_logits("whole"), atol=1e-5)


def test_a_fork_of_a_fork_before_any_step_reads_the_copied_partial_block(tiny):
    # Each fork copies its parent's partial last block; the copies wait for the next step and are made together.
    prefix, suffix = random_tokens(21, 0), random_tokens(4, 1)
    tiny.fill(prefix, "a")
    middle = tiny.submit_fill(random_tokens(3, 2), "b", parent_context_id="a")  # forks now: "a" is idle
    tiny.cancel(middle.request_id)  # "b" holds what it inherited, its own tokens never went in
    tiny.fill(suffix, "c", parent_context_id="b")
    tiny.fill(prefix + suffix, "whole")
    assert torch.allclose(tiny.context_logits("c"), tiny.context_logits("whole"), atol=1e-5)


def test_a_block_freed_while_a_waiting_copy_reads_it_is_copied_from_before_it_is_reused(make_engine):
    # More waiting copies than one launch makes, and the block one of them reads freed and taken by another fork.
    engine = make_engine(kv_cache_bytes=4 * 2**20)
    prefix, suffix = random_tokens(21, 0), random_tokens(4, 3)
    engine.fill(prefix, "p")
    others = [f"q{i}" for i in range(16)]
    for i, name in enumerate(others):
        engine.fill(random_tokens(21, 100 + i), name)
    fillers = []
    while engine.allocator.num_free > 1:  # leave one free block: the next fork's copy takes the one "p" frees
        fillers.append(f"f{len(fillers)}")
        engine.fill(random_tokens(min(8, engine.allocator.num_free - 1) * 16, 500 + len(fillers)), fillers[-1])
    waiting = engine.submit_fill(random_tokens(3, 1), "c", parent_context_id="p")  # its copy of p's block waits
    engine.cancel(waiting.request_id)
    read_block = engine.tree.get("p").blocks[-1]
    engine.free_context("p")
    engine.submit_fill(random_tokens(2, 2), "g0", parent_context_id=others[0])
    assert engine.tree.get("g0").blocks[-1] == read_block
    for name in fillers:
        engine.free_context(name)
    for i, name in enumerate(others[1:15]):
        engine.submit_fill(random_tokens(2, 2), f"g{i + 1}", parent_context_id=name)
    engine.fill(suffix, "d", parent_context_id="c")
    engine.fill(prefix + suffix, "whole")
    assert torch.allclose(engine.context_logits("d"), engine.context_logits("whole"), atol=1e-5)
