"""Waits for many values (`Session.get_values`): bounded by progress, not by their total time. A run's calls queue on
the server, so its last values come long after its first; the wait fails only once no value arrived for its idle
timeout, as on a server that stopped answering. Calls whose input is never set stand for calls that never end."""

import asyncio
import re
import threading
import time

import pytest
from conftest import raised_within

from parrot_lc.frontend import AsyncParrotClient, IdleTimeoutError, ParrotClient, SemanticFunction, VariableTimeoutError

answer = SemanticFunction.from_template("Question: {{input:question}}\nAnswer:{{output:answer}}", max_tokens=4,
                                        temperature=0.0)
QUESTIONS = [f"What is {i} plus {i}?" for i in range(4)]
PACE = 0.3  # seconds between two values arriving: well within the idle timeout of 1 s
STALLED = r"no value arrived for 0\.\d s, the idle timeout \(0\.5 s\): 3 of the session's 3 call outputs are still"


@pytest.fixture
def client(parrot_server):
    with ParrotClient(parrot_server, timeout=60) as client:
        yield client


@pytest.fixture
def expected(client) -> list[str]:
    """Each question's answer, asked alone."""
    with client.session() as session:
        return [answer(session.variable(value=q)).get() for q in QUESTIONS]


def test_a_wait_for_values_that_never_come_raises_idle_timeout_error_after_the_idle_timeout(client):
    with client.session() as session:
        outputs = [answer(session.variable("never set")) for _ in range(3)]
        error, took = raised_within(10, lambda: session.get_values(outputs, idle_timeout=0.5))
    assert isinstance(error, IdleTimeoutError) and re.match(STALLED, str(error)), error
    assert isinstance(error, VariableTimeoutError) and isinstance(error, TimeoutError)
    assert error.missing == 3 and error.waited >= 0.5
    assert 0.5 <= took < 5


def test_a_wait_goes_on_while_values_keep_arriving_though_the_first_one_comes_last(client, expected):
    with client.session() as session:
        inputs = [session.variable("question") for _ in QUESTIONS]
        outputs = [answer(question) for question in inputs]

        def set_last_first() -> None:
            for question, text in reversed(list(zip(inputs, QUESTIONS))):
                time.sleep(PACE)
                question.set(text)

        setter = threading.Thread(target=set_last_first)
        start = time.monotonic()
        setter.start()
        try:
            values = session.get_values(outputs, idle_timeout=1.0)
        finally:
            setter.join()
    assert time.monotonic() - start > 1.0  # the first value alone came after more than the idle timeout
    assert values == expected


def test_an_async_wait_for_values_that_never_come_raises_idle_timeout_error_after_the_idle_timeout(parrot_server):
    async def run() -> None:
        async with AsyncParrotClient(parrot_server, timeout=60) as client, client.session() as session:
            async with session.graph():
                outputs = [answer(session.variable("never set")) for _ in range(3)]
            await session.get_values(outputs, idle_timeout=0.5)

    error, took = raised_within(10, lambda: asyncio.run(run()))
    assert isinstance(error, IdleTimeoutError) and re.match(STALLED, str(error)), error
    assert 0.5 <= took < 5


def test_an_async_wait_goes_on_while_values_keep_arriving_though_the_first_one_comes_last(parrot_server, expected):
    async def run() -> list[str]:
        async with AsyncParrotClient(parrot_server, timeout=60) as client, client.session() as session:
            inputs = [session.variable("question") for _ in QUESTIONS]
            async with session.graph():
                outputs = [answer(question) for question in inputs]

            async def set_last_first() -> None:
                for question, text in reversed(list(zip(inputs, QUESTIONS))):
                    await asyncio.sleep(PACE)
                    await question.aset(text)

            values, _ = await asyncio.gather(session.get_values(outputs, idle_timeout=1.0), set_last_first())
            return values

    start = time.monotonic()
    assert asyncio.run(run()) == expected
    assert time.monotonic() - start > 1.0
