"""`timeout` of runs that wait for many values: a batch run as one graph and a deferred run fail once none of their
values arrived for `timeout` seconds (IdleTimeoutError, a TimeoutError as an eager request's timeout is), never
merely because the whole run outlasts `timeout` (its calls queue on the server, one after another)."""

import asyncio
import re
import time

import pytest
from conftest import raised_within
from pydantic import ValidationError

from parrot_lc import ParrotLLM
from parrot_lc.frontend import IdleTimeoutError, ParrotError
from parrot_lc.integrations.langchain import deferred

PROMPTS = ["Parrots eat", "The harbour opens at", "A crane lifts", "Ships sail to"]  # no shared prefix: one call each
LAST_FIRST = [1.2, 0.9, 0.6, 0.3]  # the first prompt's call ends last, 0.3 s after the one before
STALLED = r"no value arrived for 1\.\d s, the idle timeout \(1 s\): 4 of the session's 4 call outputs are still missing"


@pytest.fixture
def llm(parrot_server):
    return ParrotLLM(base_url=parrot_server, max_tokens=4, temperature=0, timeout=1.0)


@pytest.fixture
def eager(llm) -> list[str]:
    """Each prompt's completion, invoked alone."""
    return [llm.invoke(prompt) for prompt in PROMPTS]


def stalls_for_its_timeout(run) -> None:
    error, took = raised_within(10, run)
    assert isinstance(error, TimeoutError)  # caught as an eager call's RequestTimeoutError is
    assert isinstance(error, IdleTimeoutError) and isinstance(error, ParrotError)
    assert re.fullmatch(STALLED, str(error)), error
    assert 1.0 <= took < 6


def outlasts_its_timeout(run) -> list[str]:
    start = time.monotonic()
    result = run()
    assert time.monotonic() - start > 1.0  # the first prompt's value alone came after more than `timeout`
    return result


def test_a_batch_on_a_server_that_ends_no_call_raises_idle_timeout_error_after_its_timeout(llm, generation_delays):
    generation_delays([None] * len(PROMPTS))
    stalls_for_its_timeout(lambda: llm.batch(PROMPTS))


def test_a_batch_whose_values_keep_arriving_outlasts_its_timeout(llm, eager, generation_delays):
    generation_delays(LAST_FIRST)
    assert outlasts_its_timeout(lambda: llm.batch(PROMPTS)) == eager


def test_an_async_batch_on_a_server_that_ends_no_call_raises_idle_timeout_error_after_its_timeout(
        llm, generation_delays):
    generation_delays([None] * len(PROMPTS))
    stalls_for_its_timeout(lambda: asyncio.run(llm.abatch(PROMPTS)))


def test_an_async_batch_whose_values_keep_arriving_outlasts_its_timeout(llm, eager, generation_delays):
    generation_delays(LAST_FIRST)
    assert outlasts_its_timeout(lambda: asyncio.run(llm.abatch(PROMPTS))) == eager


def test_a_deferred_run_on_a_server_that_ends_no_call_raises_idle_timeout_error_after_its_timeout(
        llm, generation_delays):
    generation_delays([None] * len(PROMPTS))
    stalls_for_its_timeout(lambda: deferred(llm).batch(PROMPTS))


def test_a_deferred_run_whose_values_keep_arriving_outlasts_its_timeout(llm, eager, generation_delays):
    generation_delays(LAST_FIRST)
    assert outlasts_its_timeout(lambda: deferred(llm).batch(PROMPTS)) == eager


def test_an_async_deferred_run_on_a_server_that_ends_no_call_raises_idle_timeout_error_after_its_timeout(
        llm, generation_delays):
    generation_delays([None] * len(PROMPTS))
    stalls_for_its_timeout(lambda: asyncio.run(deferred(llm).abatch(PROMPTS)))


def test_an_async_deferred_run_whose_values_keep_arriving_outlasts_its_timeout(llm, eager, generation_delays):
    generation_delays(LAST_FIRST)
    assert outlasts_its_timeout(lambda: asyncio.run(deferred(llm).abatch(PROMPTS))) == eager


# ---- a run of more calls than a session may hold: its parts wait for room -------------------------------------

MORE_PROMPTS = PROMPTS + ["Gulls follow", "The tide turns at"]  # 6 calls, a session of 4 (call_limit_of_4)
NO_ROOM = r"no room came for the graph's next part for 1\.\d s, the idle timeout \(1 s\): .*2 of its 6 calls were not submitted"


@pytest.mark.parametrize("run", [lambda llm: llm.batch(MORE_PROMPTS), lambda llm: deferred(llm).batch(MORE_PROMPTS),
                                 lambda llm: asyncio.run(llm.abatch(MORE_PROMPTS))], ids=["batch", "deferred", "abatch"])
def test_a_run_larger_than_its_session_on_a_server_that_ends_no_call_raises_idle_timeout_error_waiting_for_room(
        llm, generation_delays, call_limit_of_4, run):
    generation_delays([None] * len(MORE_PROMPTS))
    error, took = raised_within(10, lambda: run(llm))
    assert isinstance(error, IdleTimeoutError) and re.fullmatch(NO_ROOM, str(error)), error
    assert 1.0 <= took < 6


def test_a_batch_larger_than_its_session_whose_calls_keep_ending_outlasts_its_timeout(llm, generation_delays,
                                                                                      call_limit_of_4):
    expected = [llm.invoke(prompt) for prompt in MORE_PROMPTS]
    generation_delays([0.7] * len(MORE_PROMPTS))  # two parts: the second's room comes after 0.7 s, its values 0.7 later
    assert outlasts_its_timeout(lambda: llm.batch(MORE_PROMPTS)) == expected


@pytest.mark.parametrize("timeout", [0, -1, float("inf")])
def test_a_timeout_that_is_no_positive_number_of_seconds_is_refused_naming_it(timeout):
    with pytest.raises(ValidationError, match="timeout"):
        ParrotLLM(base_url="http://127.0.0.1:9", timeout=timeout)
