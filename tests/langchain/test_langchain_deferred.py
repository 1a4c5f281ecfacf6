"""The Runnable adapter: unchanged chains run as one graph on the server and return what eager runs return."""

import asyncio
import functools
import logging
import operator
import re
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult
from langchain_core.output_parsers import CommaSeparatedListOutputParser, StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel
from langchain_text_splitters import RecursiveCharacterTextSplitter

from conftest import free_port
from parrot_lc import ChatParrot, ParrotLLM
from parrot_lc.frontend import ParrotConnectionError
from parrot_lc.integrations.langchain import deferred

DOCUMENT = " ".join(
    f"Section {i}. The harbour of town {i} handled {i * 120} ships last year, and its new crane cut unloading "
    f"times by {i + 3} hours; the council plans a second pier for {2026 + i}." for i in range(8)
)


@pytest.fixture
def llm(parrot_server):
    return ParrotLLM(base_url=parrot_server, max_tokens=6, temperature=0)


def map_reduce_chain(llm):
    map_prompt = PromptTemplate.from_template("Summarize this part of a report in one sentence:\n{chunk}\nSummary:")
    reduce_prompt = PromptTemplate.from_template("Combine these summaries into one paragraph:\n{summaries}\nParagraph:")
    summarize = map_prompt | llm | StrOutputParser()
    return (
        RunnableLambda(lambda doc: RecursiveCharacterTextSplitter(chunk_size=200, chunk_overlap=0).split_text(doc))
        | summarize.map()
        | RunnableLambda(lambda parts: {"summaries": "\n".join(parts)})
        | reduce_prompt | llm | StrOutputParser()
    )


def refine_chain(llm, steps: int = 3):
    prompt = PromptTemplate.from_template("Current summary: {summary}\nNew text: {text}\nRefined summary:")
    chain = RunnableLambda(lambda doc: {"summary": "", "text": doc[:150]})
    for i in range(steps):
        nxt = DOCUMENT[150 * (i + 1):150 * (i + 2)]
        chain = chain | prompt | llm | StrOutputParser() | RunnableLambda(lambda s, nxt=nxt: {"summary": s, "text": nxt})
    return chain | RunnableLambda(lambda d: d["summary"])


def test_map_reduce_deferred_equals_eager_the_map_calls_in_one_submission(parrot_server):
    """The map calls go in one request; the lambda that joins their texts reads them (Python's join wants real
    strings), so the reduce call goes in a second one."""
    seen = []
    llm = ParrotLLM(base_url=parrot_server, max_tokens=6, temperature=0,
                    sync_client_kwargs={"event_hooks": {"request": [lambda r: seen.append(r.url.path)]}})
    eager = map_reduce_chain(llm).invoke(DOCUMENT)
    seen.clear()
    runnable = deferred(map_reduce_chain(llm))
    assert runnable.invoke(DOCUMENT) == eager
    assert sum(path.endswith("/calls") for path in seen) == 2 == runnable.last_run.submissions
    assert sum(path.endswith("/variables:batchCreate") for path in seen) == 2  # each graph's variables in one
    assert not any(path.endswith("/variables") or path.startswith("/v1/") for path in seen)


def test_a_refine_chain_deferred_equals_eager(llm):
    assert deferred(refine_chain(llm)).invoke(DOCUMENT) == refine_chain(llm).invoke(DOCUMENT)


def test_a_call_with_penalties_deferred_equals_eager(parrot_server):
    """The penalties are sampling settings of the recorded call, as of the eager request; the prompt repeats itself
    so that they change the answer."""
    llm = ParrotLLM(base_url=parrot_server, max_tokens=12, temperature=0, frequency_penalty=2.0,
                    repetition_penalty=1.5)
    prompt = PromptTemplate.from_template("{text} {text} {text}")
    eager = (prompt | llm).invoke("the cat")
    assert deferred(prompt | llm).invoke("the cat") == eager
    assert eager != (prompt | llm.bind(frequency_penalty=0.0, repetition_penalty=1.0)).invoke("the cat")


def test_a_deferred_chat_reply_names_the_served_model_as_the_eager_one_does(parrot_server):
    """A server at base_url, no model named: its replies name the model it serves, and so do deferred ones."""
    chat = ChatParrot(base_url=parrot_server, max_tokens=4, temperature=0)
    prompt = PromptTemplate.from_template("Say {word}.")
    eager = (prompt | chat).invoke({"word": "hi"})
    recorded = deferred(prompt | chat).invoke({"word": "hi"})
    assert recorded.response_metadata["model_name"] == eager.response_metadata["model_name"] == "tiny"
    assert recorded.content == eager.content


class ModelNames(BaseCallbackHandler):
    """The model name each LLM result names: in its `llm_output`, and in each of its generations' info."""

    def __init__(self) -> None:
        self.names: list[tuple[str, list[str]]] = []

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        infos = [generation.generation_info for generations in response.generations for generation in generations]
        self.names.append((response.llm_output["model_name"], [info["model_name"] for info in infos]))


@pytest.mark.parametrize("method", ["invoke", "ainvoke"])
def test_a_deferred_completion_names_the_served_model_as_the_eager_one_does(parrot_server, method):
    """A server at base_url, no model named: a completion's reply names the model it serves, and so does the
    result of a deferred call, in its llm_output and its generation's info."""
    chain = PromptTemplate.from_template("Say {word}.") | ParrotLLM(base_url=parrot_server, max_tokens=4,
                                                                     temperature=0)

    def run(runnable: Any, names: ModelNames) -> Any:
        result = getattr(runnable, method)({"word": "hi"}, {"callbacks": [names]})
        return asyncio.run(result) if method == "ainvoke" else result

    eager, recorded = ModelNames(), ModelNames()
    assert run(chain, eager) == run(deferred(chain), recorded)
    assert recorded.names == eager.names == [("tiny", ["tiny"])]


def test_deferred_results_carry_the_finish_reasons_of_eager_ones(parrot_server):
    """A recorded call's finish reason is a value not known yet, as its text is: the run's output holds the real
    one, in a chat reply's (or its stream's) response_metadata and in a completion's generation_info."""
    chat = ChatParrot(base_url=parrot_server, max_tokens=16, temperature=1.0, seed=3)
    llm = ParrotLLM(base_url=parrot_server, max_tokens=16, temperature=1.0, seed=3)
    say = PromptTemplate.from_template("Say {word}.")
    text = (say | chat).invoke({"word": "hi"}).content
    stop = re.search(r"[A-Za-z]{3}", text[2:]).group(0)  # inside the reply: it ends there

    def streamed(chain: Any) -> Any:
        return functools.reduce(operator.add, chain.stream({"word": "hi"}))

    reasons = []
    for model in (chat, chat.bind(stop=[stop])):
        chain = say | model
        eager = chain.invoke({"word": "hi"}).response_metadata["finish_reason"]
        assert deferred(chain).invoke({"word": "hi"}).response_metadata["finish_reason"] == eager
        assert streamed(deferred(chain)).response_metadata["finish_reason"] == eager
        reasons.append(eager)
    assert reasons == ["length", "stop"]
    generate = RunnableLambda(lambda prompt: llm.generate([prompt], stop=[stop]).generations[0][0].generation_info)
    assert deferred(generate).invoke("Say hi.") == generate.invoke("Say hi.")


def test_a_finish_reason_carried_into_a_later_prompt_is_its_text_there(llm):
    """A call's prompt holds text and other calls' outputs only: a finish reason in it is waited for, and the call
    gets its text."""
    chat = ChatParrot(base_url=llm.base_url, max_tokens=4, temperature=0)
    chain = (PromptTemplate.from_template("Say {word}.") | chat
             | RunnableLambda(lambda reply: {"reason": reply.response_metadata["finish_reason"]})
             | PromptTemplate.from_template("It ended by {reason}, so") | llm)
    run = deferred(chain)
    assert run.invoke({"word": "hi"}) == chain.invoke({"word": "hi"})
    assert run.last_run.submissions == 2  # the second call's prompt waited for the first's end


def test_parallel_branches_deferred_equal_eager(llm):
    prompt = PromptTemplate.from_template("{style} take on: {topic}")
    chain = RunnableParallel(
        short=RunnableLambda(lambda t: {"style": "A short", "topic": t}) | prompt | llm,
        long=RunnableLambda(lambda t: {"style": "A long", "topic": t}) | prompt | llm,
    )
    assert deferred(chain).invoke("harbours") == chain.invoke("harbours")


def test_a_lambda_that_reads_the_text_waits_for_it_and_the_run_goes_on(llm, caplog):
    branch = RunnableLambda(lambda text: "LONG" if len(text) > 3 else "SHORT")
    chain = PromptTemplate.from_template("Say: {x}") | llm | StrOutputParser() | branch
    with caplog.at_level(logging.INFO, logger="parrot_lc.deferred"):
        assert deferred(chain).invoke({"x": "hello"}) == chain.invoke({"x": "hello"})
    assert "reads a value: it waits for it, and the run goes on" in caplog.text


def test_a_parser_that_needs_the_value_gets_it(llm):
    chain = PromptTemplate.from_template("List: {x}") | llm | CommaSeparatedListOutputParser()
    assert deferred(chain).invoke({"x": "a, b"}) == chain.invoke({"x": "a, b"})


def test_the_server_session_of_a_deferred_run_is_deleted(llm, local_server):
    sessions = len(local_server.manager.sessions)
    deferred(PromptTemplate.from_template("Hi {x}") | llm).invoke({"x": "there"})
    assert len(local_server.manager.sessions) == sessions


def test_a_fallback_for_a_chat_model_whose_server_is_down_gives_the_eager_answer(parrot_server):
    # the first model's server is down: its call runs at once and fails, the fallback's runs at once (another
    # server); the run opened no session on the first's server, so its end must not ask that server for a graph
    down = ChatParrot(base_url=f"http://127.0.0.1:{free_port()}", max_tokens=4, temperature=0, max_retries=0)
    chat = ChatParrot(base_url=parrot_server, max_tokens=4, temperature=0)
    chain = ChatPromptTemplate.from_messages([("human", "Hi {x}")]) | down.with_fallbacks([chat]) | StrOutputParser()
    runnable = deferred(chain)
    assert runnable.invoke({"x": "there"}) == chain.invoke({"x": "there"})
    assert runnable.last_run.graph == []


def test_a_chat_model_whose_server_is_down_raises_the_connection_error_and_blames_no_chat_template():
    down = ChatParrot(base_url=f"http://127.0.0.1:{free_port()}", max_tokens=4, max_retries=0)
    chain = ChatPromptTemplate.from_messages([("human", "Hi {x}")]) | down | StrOutputParser()
    with pytest.raises(ParrotConnectionError):
        chain.invoke({"x": "there"})
    runnable = deferred(chain)
    with pytest.raises(ParrotConnectionError):
        runnable.invoke({"x": "there"})
    assert not [note for note in runnable.last_run.waits if "template" in note]
