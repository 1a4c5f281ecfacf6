"""Which sequences of a step read a shared prefix's KV once (`shared_prefix_attention`): every group of sequences
whose block tables begin alike (`groups`), only a prefix common to the whole step (`whole_batch`, vLLM's cascade
attention rule), or none (`off`); whichever rule, the tokens generated are the same."""

import pytest

from conftest import generate_from_all
from parrot_lc.engine import SamplingParams
from parrot_lc.engine.model_runner import shared_groups

BS = 4  # tokens a block
# Two prefixes: rows 0-2 share blocks 10, 11 (row 2 a third one too), rows 3-4 share block 20; row 5 is alone.
TABLES = [[10, 11, 12], [10, 11, 13], [10, 11, 14, 15], [20, 21], [20, 22], [30, 31]]
COMPUTED = [10, 10, 14, 6, 7, 8]


def test_groups_finds_every_prefix_that_several_sequences_share():
    assert shared_groups(TABLES, COMPUTED, BS, "groups") == [([0, 1, 2], 2), ([3, 4], 1)]


def test_whole_batch_finds_no_group_when_the_batch_holds_several_prefixes():
    assert shared_groups(TABLES, COMPUTED, BS, "whole_batch") == []


def test_whole_batch_finds_the_prefix_common_to_every_sequence():
    tables, computed = TABLES[:3], COMPUTED[:3]
    assert shared_groups(tables, computed, BS, "whole_batch") == [([0, 1, 2], 2)]


def test_whole_batch_finds_none_when_one_sequence_has_no_computed_block_yet():
    # A new prompt with no cache hit in the step: the rest share a prefix, but not the whole batch.
    assert shared_groups([*TABLES[:3], [40]], [*COMPUTED[:3], 0], BS, "whole_batch") == []


def test_only_blocks_computed_before_the_step_are_shared():
    # Row 1 has computed one block (its second is this step's): the group shares one block, not two.
    assert shared_groups(TABLES[:2], [10, 5], BS, "groups") == [([0, 1], 1)]


def test_off_finds_no_group():
    assert shared_groups(TABLES[:3], COMPUTED[:3], BS, "off") == []


@pytest.mark.parametrize("rule", ["whole_batch", "off"])
def test_the_generated_tokens_are_the_same_whichever_rule(make_engine, rule):
    """Forks of two prefixes and prompts that take cached blocks, decoded at once: with `groups` they read their
    prefixes in shared groups, with the others each on its own (or as one whole batch); greedy tokens agree."""
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def run(engine) -> tuple[dict[int, list[int]], list[list]]:
        engine.runner.min_shared_elements = engine.runner.min_shared_elements_decode = 0  # however small the prefix
        groups_seen = []
        find = engine.runner._shared_groups
        engine.runner._shared_groups = lambda *args: groups_seen.append(find(*args)) or groups_seen[-1]
        engine.fill(list(range(3, 43)), "app a")
        engine.fill(list(range(50, 90)), "app b")
        forks = [engine.submit_fill([100 + i], f"fork {i}", "app a" if i % 2 else "app b") for i in range(4)]
        engine.run_until_done(forks)
        prompts = [list(range(3, 43)) + [200 + i] for i in range(2)]  # take app a's cached blocks
        tokens = generate_from_all(engine, prompts, sampling)
        gens = [engine.submit_generate(sampling, f"fork {i}") for i in range(4)]
        events = engine.run_until_done(gens)
        tokens |= {10 + i: [t for e in events[g.request_id] for t in e.token_ids] for i, g in enumerate(gens)}
        return tokens, groups_seen

    # The torch reference reads groups in decode steps too (the compiled CPU decode step reads each table whole).
    reference, groups_seen = run(make_engine(attention_backend="torch"))
    assert any(len(groups) == 2 for groups in groups_seen)  # both prefixes at once, in one step
    tokens, groups_seen = run(make_engine(attention_backend="torch", shared_prefix_attention=rule))
    assert tokens == reference
    assert all(len(groups) <= 1 for groups in groups_seen)
    # The prompts that took app a's blocks decode as a whole batch of one prefix: one group, but for `off`.
    assert any(groups_seen) == (rule == "whole_batch")
