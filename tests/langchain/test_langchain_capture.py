"""Deferred runs of real LangChain applications (langchain-classic chains, LCEL, LangGraph, async code, functions
that call chains): each runs eagerly and deferred with the same result, and says how many LLM calls the deferred run
captured and in how many graphs it sent them. No code reads a value that is not known yet as text: where one is
read, the run waits for it; where that cannot be followed, the step runs eagerly."""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import pickle
import threading
from typing import Annotated, Any, TypedDict

import pytest
from langchain_classic.chains.summarize import load_summarize_chain
from langchain_core.caches import InMemoryCache
from langchain_core.documents import Document
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import base as language_model_base
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser, StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.prompts.string import DEFAULT_FORMATTER_MAPPING
from langchain_core.runnables import RunnableBranch, RunnableLambda, RunnableParallel, RunnableSequence
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, Send
from pydantic import BaseModel

from parrot_lc.frontend import InvalidRequestError
from parrot_lc.integrations.langchain import deferred
from parrot_lc.integrations.langchain._graph import shared_prefix_lengths
from parrot_lc.integrations.langchain._markers import MARK, DeferredText

DOCS = [Document(page_content=f"Section {i}. The harbour of town {i} handled {i * 120} ships; its new crane cut "
                              f"unloading by {i + 3} hours.") for i in range(4)]
SAY = PromptTemplate.from_template("Say something about {topic}:")
MAP = PromptTemplate.from_template("Summarize this part of a harbour report in one sentence:\n{part}\nSummary:")
SYSTEM = "You are the harbour authority's careful assistant. Answer in one short sentence, keeping every number."


def both(chain: Any, chain_input: Any, *, calls: int, graphs: int, same=lambda output: output) -> Any:
    """Runs `chain` eagerly and deferred: the same result (as `same` reads it), `calls` LLM calls captured, sent in
    `graphs` graphs. Returns the deferred run's report."""
    eager = chain.invoke(chain_input)
    runnable = deferred(chain)
    assert same(runnable.invoke(chain_input)) == same(eager)
    run = runnable.last_run
    assert (len(run.graph), run.submissions) == (calls, graphs), run.waits
    return run


def content(message: Any) -> str:
    return message.content


@pytest.fixture(params=["llm", "chat"])
def model(request, parrot_llm, chat_parrot):
    """Each case with ParrotLLM and with ChatParrot."""
    return parrot_llm if request.param == "llm" else chat_parrot


def text_of(output: Any) -> str:
    """A model's output as text: ParrotLLM's string, ChatParrot's message content."""
    return output if isinstance(output, str) else output.content


# ---- langchain-classic ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chain_type, calls, graphs", [
    ("map_reduce", 5, 2),  # the combine step measures the summaries' tokens: it waits for the map calls
    ("refine", 4, 1),
    ("stuff", 1, 1),
])
def test_load_summarize_chain(model, chain_type, calls, graphs):
    chain = load_summarize_chain(model, chain_type=chain_type)
    both(chain, {"input_documents": DOCS}, calls=calls, graphs=graphs, same=lambda out: out["output_text"])


# ---- LCEL ----------------------------------------------------------------------------------------------------------


def test_map_whose_outputs_a_lambda_only_passes_along_is_one_graph(model, graphs_sent):
    chain = ((MAP | model | StrOutputParser()).map()
             | RunnableLambda(lambda parts: {"topic": parts[-1]})
             | SAY | model | StrOutputParser())
    both(chain, [{"part": doc.page_content} for doc in DOCS], calls=5, graphs=1)
    maps = graphs_sent[-1][:4]
    heads = {call["template"][0]["text"] for call in maps}
    assert len(heads) == 1 and MAP.template.split("{part}")[0] in heads.pop()  # one shared prefix, filled once


def test_a_lambda_that_joins_the_outputs_waits_for_them(parrot_llm):
    chain = ((MAP | parrot_llm | StrOutputParser()).map()
             | RunnableLambda(lambda parts: {"topic": "\n".join(f"- {p}" for p in parts)})
             | SAY | parrot_llm)
    run = both(chain, [{"part": doc.page_content} for doc in DOCS], calls=5, graphs=2)
    assert any("reads a value" in wait for wait in run.waits)


def test_runnable_parallel(model):
    chain = RunnableParallel(a=SAY | model | StrOutputParser(), b=MAP | model | StrOutputParser()) | \
        PromptTemplate.from_template("{a} / {b}") | model | StrOutputParser()
    both(chain, {"topic": "cranes", "part": DOCS[0].page_content}, calls=3, graphs=1)


def test_runnable_branch_on_the_output(parrot_llm):
    chain = SAY | parrot_llm | RunnableBranch(
        (lambda text: len(text) > 5, PromptTemplate.from_template("Long: {t}") | parrot_llm),  # 4 tokens: short
        PromptTemplate.from_template("Short: {t}") | parrot_llm)
    both(chain, {"topic": "ships"}, calls=2, graphs=2)


def test_a_lambda_that_reads_the_text_gets_it_and_the_wait_is_logged_once(parrot_llm, caplog):
    reader = RunnableLambda(lambda text: {"length": len(text), "has_a": "a" in text, "upper": text.upper(),
                                          "first": text[:2], "same": text == text.strip(), "f": f"<{text}>"})
    chain = (SAY | parrot_llm).map() | RunnableLambda(lambda texts: texts) | reader.map()
    with caplog.at_level(logging.INFO, logger="parrot_lc.deferred"):
        both(chain, [{"topic": "ships"}, {"topic": "cranes"}], calls=2, graphs=1)
    assert [r.message for r in caplog.records if r.levelno == logging.INFO].count(
        "deferred run: RunnableLambda reads a value: it waits for it, and the run goes on") == 1


def test_json_output_parser_gets_the_real_text(parrot_llm):
    chain = SAY | parrot_llm | RunnableLambda(lambda text: json.dumps({"said": text})) | JsonOutputParser()
    run = both(chain, {"topic": "ships"}, calls=1, graphs=1)
    assert any("runs again on their values" in wait for wait in run.waits)  # json.dumps wants a real str


class Said(BaseModel):
    said: str


def test_pydantic_output_parser_gets_the_real_text(model):
    chain = SAY | model | StrOutputParser() | RunnableLambda(lambda text: json.dumps({"said": text})) | \
        PydanticOutputParser(pydantic_object=Said)
    both(chain, {"topic": "ships"}, calls=1, graphs=1)


def test_a_parser_that_fails_on_the_real_text_fails_as_eagerly(parrot_llm):
    chain = SAY | parrot_llm | JsonOutputParser()
    with pytest.raises(OutputParserException) as eager:
        chain.invoke({"topic": "ships"})
    with pytest.raises(OutputParserException) as lazy:
        deferred(chain).invoke({"topic": "ships"})
    assert str(lazy.value) == str(eager.value)


def test_with_retry_around_a_step_that_fails_once(parrot_llm):
    def flaky_every_other_call(text: str, calls: list = []) -> str:  # noqa: B006 - the state of the flakiness
        calls.append(text)
        if len(calls) % 2:
            raise ConnectionError("flaky")
        return text.strip()

    chain = SAY | parrot_llm | RunnableLambda(flaky_every_other_call).with_retry(stop_after_attempt=2)
    both(chain, {"topic": "ships"}, calls=1, graphs=1)


def test_templates_that_read_values_get_them(parrot_llm):
    jinja = PromptTemplate.from_template("{% if said %}Again: {{ said|upper }}{% endif %}", template_format="jinja2")
    listed = PromptTemplate.from_template("All of it: {parts}")  # a list is formatted by its repr
    chain = ((SAY | parrot_llm).map() | RunnableLambda(lambda parts: {"parts": parts, "said": parts[0]})
             | RunnableParallel(a=jinja | parrot_llm, b=listed | parrot_llm))
    both(chain, [{"topic": "ships"}, {"topic": "cranes"}], calls=4, graphs=2)


def test_deferred_batch_is_one_run(parrot_llm):
    chain = SAY | parrot_llm | StrOutputParser()
    runnable = deferred(chain)
    topics = [{"topic": "ships"}, {"topic": "cranes"}, {"topic": "piers"}]
    assert runnable.batch(topics) == chain.batch(topics)
    assert (len(runnable.last_run.graph), runnable.last_run.submissions) == (3, 1)


def test_a_deferred_run_of_more_calls_than_the_session_may_hold_goes_in_parts(model, call_limit_of_4):
    chain = SAY | model | StrOutputParser()
    topics = [{"topic": topic} for topic in ("ships", "cranes", "piers", "gulls", "tides", "ropes", "masts")]
    runnable = deferred(chain)
    assert runnable.batch(topics) == chain.batch(topics)
    assert len(runnable.last_run.graph) == 7


# ---- async -------------------------------------------------------------------------------------------------------


def test_ainvoke_abatch_and_astream(model):
    chain = (MAP | model | StrOutputParser()).map() | RunnableLambda(lambda parts: {"topic": parts[-1]}) | SAY | \
        model | StrOutputParser()
    parts = [{"part": doc.page_content} for doc in DOCS[:2]]

    async def runs():
        eager = await chain.ainvoke(parts)
        runnable = deferred(chain)
        assert await runnable.ainvoke(parts) == eager
        assert (len(runnable.last_run.graph), runnable.last_run.submissions) == (3, 1)
        assert await runnable.abatch([parts, parts[:1]]) == await chain.abatch([parts, parts[:1]])
        assert runnable.last_run.submissions == 1
        assert "".join([chunk async for chunk in runnable.astream(parts)]) == eager

    asyncio.run(runs())


def test_async_functions_that_call_the_models(parrot_llm, chat_parrot):
    async def ask(topic: str) -> dict:
        reply = await chat_parrot.ainvoke([SystemMessage(SYSTEM), HumanMessage(f"Tell me about {topic}")])
        texts = await parrot_llm.abatch([f"About {topic}:", f"More about {topic}:"])
        streamed = "".join([chunk async for chunk in parrot_llm.astream(f"Stream about {topic}:")])  # read as it comes
        generated = await parrot_llm.agenerate([f"Generate about {topic}:"])
        return {"reply": reply.content, "texts": texts, "streamed": streamed, "gen": generated.generations[0][0].text}

    async def runs():
        eager = await RunnableLambda(ask).ainvoke("ships")
        runnable = deferred(RunnableLambda(ask))
        assert await runnable.ainvoke("ships") == eager
        assert (len(runnable.last_run.graph), runnable.last_run.submissions) == (4, 1)  # the stream ran at once

    asyncio.run(runs())


# ---- LangGraph ---------------------------------------------------------------------------------------------------


class MapReduceState(TypedDict):
    parts: list[str]
    summaries: Annotated[list, operator.add]
    final: str


def map_reduce_graph(model, reduce_joins: bool):
    """LangGraph's map-reduce: a `Send` per part to a summarize node, then a reduce node."""
    def summarize(state: dict) -> dict:
        return {"summaries": [text_of(model.invoke(MAP.invoke({"part": state["part"]})))]}

    def reduce(state: MapReduceState) -> dict:
        if reduce_joins:  # Python joins the texts: it waits for them
            return {"final": text_of(model.invoke("Combine:\n" + "\n".join(state["summaries"])))}
        return {"final": text_of((SAY | model).invoke({"topic": state["summaries"][-1]}))}

    graph = StateGraph(MapReduceState)
    graph.add_node("summarize", summarize)
    graph.add_node("reduce", reduce)
    graph.add_conditional_edges(START, lambda state: [Send("summarize", {"part": p}) for p in state["parts"]],
                                ["summarize"])
    graph.add_edge("summarize", "reduce")
    graph.add_edge("reduce", END)
    return graph.compile()


def keep_with_colons(kept: str, new: str) -> str:
    return kept + new if ":" in new else kept


class KeptState(TypedDict):
    parts: list[str]
    kept: Annotated[str, keep_with_colons]


def test_langgraph_reducer_of_the_application_reads_real_text(parrot_llm):
    graph = StateGraph(KeptState)
    graph.add_node("say", lambda state: {"kept": parrot_llm.invoke(MAP.invoke({"part": state["part"]}))})
    graph.add_conditional_edges(START, lambda state: [Send("say", {"part": p}) for p in state["parts"]], ["say"])
    graph.add_edge("say", END)
    run = both(graph.compile(), {"parts": [doc.page_content for doc in DOCS], "kept": ""}, calls=4, graphs=1)
    assert run.waits == ["the reducer keep_with_colons reads a value: it waits for it, and the run goes on"]


@pytest.mark.parametrize("reduce_joins, graphs", [(False, 1), (True, 2)], ids=["passes-along", "joins"])
def test_langgraph_send_map_reduce(model, graphs_sent, reduce_joins, graphs):
    state = {"parts": [doc.page_content for doc in DOCS]}
    both(map_reduce_graph(model, reduce_joins), state, calls=5, graphs=graphs)
    maps = [call for graph in graphs_sent[-graphs:] for call in graph][:4]
    heads = {call["template"][0]["text"] for call in maps}
    assert len(heads) == 1  # the map calls share their instruction (and a chat's template head): filled once


def test_langgraph_async(parrot_llm):
    app = map_reduce_graph(parrot_llm, reduce_joins=False)
    state = {"parts": [doc.page_content for doc in DOCS[:3]]}

    async def runs():
        eager = await app.ainvoke(state)
        runnable = deferred(app)
        assert await runnable.ainvoke(state) == eager
        assert (len(runnable.last_run.graph), runnable.last_run.submissions) == (4, 1)

    asyncio.run(runs())


class BranchState(TypedDict):
    topic: str
    said: str
    answer: str


def test_langgraph_conditional_edge_reads_the_value(parrot_llm):
    graph = StateGraph(BranchState)
    graph.add_node("say", lambda state: {"said": parrot_llm.invoke(SAY.invoke({"topic": state["topic"]}))})
    graph.add_node("long", lambda state: {"answer": parrot_llm.invoke(f"Long: {state['said']}")})
    graph.add_node("short", lambda state: {"answer": parrot_llm.invoke(f"Short: {state['said']}")})
    graph.add_edge(START, "say")
    graph.add_conditional_edges("say", lambda state: "long" if len(state["said"]) > 5 else "short")
    graph.add_edge("long", END)
    graph.add_edge("short", END)
    both(graph.compile(), {"topic": "ships"}, calls=2, graphs=2)


def test_langgraph_edge_that_routes_on_the_llms_words(parrot_llm):
    """An edge that returns what the model said, as the name of a route: LangGraph gets the real text."""
    said = parrot_llm.invoke(SAY.invoke({"topic": "ships"}))
    graph = StateGraph(BranchState)
    graph.add_node("say", lambda state: {"said": parrot_llm.invoke(SAY.invoke({"topic": state["topic"]}))})
    graph.add_node("answer", lambda state: {"answer": parrot_llm.invoke(f"Answer: {state['topic']}")})
    graph.add_edge(START, "say")
    graph.add_conditional_edges("say", lambda state: state["said"], {said: "answer", "?": END})
    graph.add_edge("answer", END)
    both(graph.compile(), {"topic": "ships"}, calls=2, graphs=2)


class RouteState(TypedDict):
    said: str
    answer: Annotated[list, operator.add]


def test_langgraph_command_and_send_to_the_node_the_llm_names(parrot_llm):
    """A node that goes where the model says (`Command(goto=...)`), and an edge that sends there: LangGraph gets
    the real node names, the sent state stays deferred."""
    named = parrot_llm.invoke("hello")  # the tiny model says "lolololo": a node of that name
    graph = StateGraph(RouteState)
    graph.add_node("pick", lambda state: Command(goto=parrot_llm.invoke("hello"), update={"said": named}))
    graph.add_node(named, lambda state: {"answer": [parrot_llm.invoke(f"Go on: {state['said']}")]})
    graph.add_edge(START, "pick")
    graph.add_conditional_edges(named, lambda state: [Send(parrot_llm.invoke("lo"), {"said": state["answer"][0]})]
                                if len(state["answer"]) < 2 else END)  # "lo" makes the tiny model say it too
    # "Go on: lolololo", asked twice (the tiny model repeats itself), is one greedy call
    both(graph.compile(), {"said": "", "answer": []}, calls=3, graphs=2)


class ChatState(TypedDict):
    messages: Annotated[list, add_messages]


def test_langgraph_chat_turns(chat_parrot):
    def respond(state: ChatState) -> dict:
        return {"messages": [chat_parrot.invoke(state["messages"])]}

    def follow_up(state: ChatState) -> dict:
        return {"messages": [HumanMessage("And in one word?")]}

    graph = StateGraph(ChatState)
    graph.add_node("respond", respond)
    graph.add_node("again", respond)
    graph.add_node("follow_up", follow_up)
    graph.add_edge(START, "respond")
    graph.add_edge("respond", "follow_up")
    graph.add_edge("follow_up", "again")
    graph.add_edge("again", END)
    both(graph.compile(), {"messages": [SystemMessage(SYSTEM), HumanMessage("What is a crane?")]}, calls=2,
         graphs=1, same=lambda state: [m.content for m in state["messages"]])


def two_step_graph(chat_parrot) -> Any:
    def respond(state: ChatState) -> dict:
        return {"messages": [chat_parrot.invoke(state["messages"])]}

    graph = StateGraph(ChatState)
    graph.add_node("respond", respond)
    graph.add_node("again", respond)
    graph.add_edge(START, "respond")
    graph.add_edge("respond", "again")
    graph.add_edge("again", END)
    return graph.compile()


def texts(value: Any) -> Any:
    """`value` with each message as its text."""
    if isinstance(value, dict):
        return {key: texts(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [texts(item) for item in value]
    return getattr(value, "content", value)


def streamed(chunks: list[Any]) -> list[Any]:
    """A graph's stream as texts: its updates and states, or each node's messages joined (a deferred call's
    message comes whole, an eager one's token by token)."""
    if all(isinstance(chunk, tuple) for chunk in chunks):
        nodes = [metadata["langgraph_node"] for _, metadata in chunks]
        return [(node, "".join(m.content for m, meta in chunks if meta["langgraph_node"] == node))
                for node in dict.fromkeys(nodes)]
    return [texts(chunk) for chunk in chunks]


@pytest.mark.parametrize("mode", ["updates", "values", "messages"])
def test_a_deferred_graphs_stream_has_the_eager_streams_chunks(chat_parrot, mode):
    # a loop over `node, update` (or `message, metadata`) of the stream works deferred as it does eagerly
    graph, state = two_step_graph(chat_parrot), {"messages": [HumanMessage("What is a crane?")]}
    eager = list(graph.stream(state, stream_mode=mode))
    late = list(deferred(graph).stream(state, stream_mode=mode))
    assert streamed(late) == streamed(eager) and len(eager) > 1


def test_a_deferred_chains_events_hold_the_real_text(chat_parrot):
    chain = ChatPromptTemplate.from_messages([("human", "{x}")]) | chat_parrot | StrOutputParser()

    async def events(runnable: Any) -> list[tuple[str, str, Any]]:
        kept = ("on_chat_model_end", "on_parser_end", "on_chain_end")
        return [(event["event"], event["name"], getattr(event["data"]["output"], "content", event["data"]["output"]))
                async for event in runnable.astream_events({"x": "a crane"}, version="v2") if event["event"] in kept]

    eager, late = asyncio.run(events(chain)), asyncio.run(events(deferred(chain)))
    assert late == eager and not any(MARK in str(output) for *_, output in late)


def test_a_deferred_batch_with_return_exceptions_fails_only_the_input_whose_call_failed(chat_parrot):
    chain = ChatPromptTemplate.from_messages([("human", "{x}")]) | chat_parrot | StrOutputParser()
    inputs = [{"x": "harbour " * 9000}, {"x": "a crane"}]  # the first is longer than the model's context
    eager = chain.batch(inputs, return_exceptions=True)
    late = deferred(chain).batch(inputs, return_exceptions=True)
    assert isinstance(eager[0], Exception) and isinstance(late[0], Exception)
    assert type(late[0]) is type(eager[0]) and isinstance(late[0], InvalidRequestError)
    assert late[0].field == eager[0].field == "messages"
    assert late[1] == eager[1]


# ---- functions that call chains -----------------------------------------------------------------------------------


def test_a_function_that_calls_a_chain_and_reads_its_result(model):
    chain = SAY | model | StrOutputParser()

    def check(topic: str) -> dict:
        text = chain.invoke({"topic": topic})
        return {"length": len(text), "has_paris": "Paris" in text, "text": text}

    run = both(RunnableLambda(check), "Paris", calls=1, graphs=1)
    assert run.waits == ["check reads a value: it waits for it, and the run goes on"]


def test_a_message_the_application_makes_of_a_value_holds_its_text(parrot_llm):
    """pydantic would take the value, which is iterable, for a list of content blocks: the message gets the text."""
    chain = SAY | parrot_llm | RunnableLambda(lambda text: {"message": AIMessage(content=text), "doc": Document(text)})
    run = both(chain, {"topic": "ships"}, calls=1, graphs=1)
    assert run.waits == ["AIMessage() reads a value: it waits for it, and the run goes on"]


def test_every_entry_point_of_both_classes_is_recorded(parrot_llm, chat_parrot):
    def use_them_all(topic: str) -> dict:
        prompt = SAY.invoke({"topic": topic})
        return {
            "invoke": parrot_llm.invoke(prompt),
            "batch": parrot_llm.batch([prompt, f"Again, {topic}:"]),
            "generate": parrot_llm.generate([f"Generate, {topic}:"]).generations[0][0].text,
            "generate_prompt": parrot_llm.generate_prompt([prompt]).generations[0][0].text,
            "chat": chat_parrot.invoke(prompt).content,
            "chat_batch": [m.content for m in chat_parrot.batch([f"Hi, {topic}", f"Bye, {topic}"])],
            "chat_generate": chat_parrot.generate([[HumanMessage(topic)]]).generations[0][0].text,
            "stream": "".join(parrot_llm.stream(f"Stream, {topic}:")),  # read chunk by chunk: it runs at once
            "chat_stream": "".join(c.content for c in chat_parrot.stream(f"Stream, {topic}")),
        }

    # invoke, generate_prompt and the batch's first prompt ask the same (greedily): one call
    both(RunnableLambda(use_them_all), "ships", calls=7, graphs=1)


# ---- scoping -------------------------------------------------------------------------------------------------------


def test_a_thread_running_langchain_beside_a_deferred_run_gets_stock_langchain(parrot_llm):
    chain = SAY | parrot_llm | StrOutputParser()
    expected = chain.invoke({"topic": "piers"})
    started, finished, seen = threading.Event(), threading.Event(), {}

    def beside() -> None:
        started.wait(60)
        seen["wrapped"] = hasattr(RunnableSequence.invoke, "__wrapped__")  # the run's hooks are in place
        seen["text"] = chain.invoke({"topic": "piers"})
        finished.set()

    def let_the_other_thread_run(text: Any) -> Any:
        started.set()
        assert finished.wait(60)
        return text

    thread = threading.Thread(target=beside)
    thread.start()
    lazy = deferred(chain | RunnableLambda(let_the_other_thread_run)).invoke({"topic": "ships"})
    thread.join()
    assert seen == {"wrapped": True, "text": expected} and MARK not in lazy
    assert lazy == chain.invoke({"topic": "ships"})


def test_deferred_runs_in_two_threads_at_once_are_apart(parrot_llm):
    chain = (SAY | parrot_llm).map() | RunnableLambda(lambda said: {"topic": said[-1]}) | SAY | parrot_llm
    inputs = [[{"topic": "ships"}, {"topic": "cranes"}], [{"topic": "piers"}]]
    results: dict[int, Any] = {}
    runs = [deferred(chain), deferred(chain)]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, runs[i].invoke(inputs[i]))) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: chain.invoke(inputs[i]) for i in (0, 1)}
    assert [len(run.last_run.graph) for run in runs] == [3, 2]


def test_nothing_stays_patched(parrot_llm):
    fstring = DEFAULT_FORMATTER_MAPPING["f-string"]
    deferred(SAY | parrot_llm).invoke({"topic": "ships"})
    assert not hasattr(RunnableSequence.invoke, "__wrapped__")
    assert not hasattr(RunnableLambda.invoke, "__wrapped__")
    assert DEFAULT_FORMATTER_MAPPING["f-string"] is fstring


def test_an_llm_cache_gets_real_text(parrot_server):
    from parrot_lc import ParrotLLM

    llm = ParrotLLM(base_url=parrot_server, max_tokens=4, temperature=0, cache=InMemoryCache())
    chain = SAY | llm | RunnableLambda(lambda text: {"topic": text}) | SAY | llm
    runnable = deferred(chain)
    lazy = runnable.invoke({"topic": "ships"})  # first: the cache is empty
    assert lazy == chain.invoke({"topic": "ships"}) and runnable.last_run.submissions == 0  # they ran at once
    assert any("LLM cache" in wait for wait in runnable.last_run.waits)
    assert len(llm.cache._cache) == 2 and not any(MARK in g[0].text for g in llm.cache._cache.values())


# ---- chat templates -------------------------------------------------------------------------------------------------


def test_a_chat_system_prompt_is_one_shared_piece(chat_parrot, graphs_sent):
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "Summarize: {part}")])
    chain = (prompt | chat_parrot | StrOutputParser()).map() | RunnableLambda(lambda s: {"part": s[0]}) | prompt | \
        chat_parrot | StrOutputParser()
    both(chain, [{"part": doc.page_content} for doc in DOCS], calls=5, graphs=1)
    heads = [call["template"][0]["text"] for call in graphs_sent[-1]]
    assert len(set(heads[:4])) == 1 and all(SYSTEM in head for head in heads)  # the maps share one piece


def test_a_chat_template_that_edits_contents_runs_chats_at_once(chat_parrot, local_server, monkeypatch):
    trimming = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    monkeypatch.setattr(local_server.manager.tokenizer, "chat_template", trimming)
    chain = SAY | chat_parrot | StrOutputParser() | RunnableLambda(lambda text: {"topic": f" {text} "}) | SAY | \
        chat_parrot | StrOutputParser()
    run = both(chain, {"topic": "ships"}, calls=0, graphs=0)
    assert any("chat template does not insert message contents as they are" in wait for wait in run.waits)


# ---- tokens ---------------------------------------------------------------------------------------------------------


def test_token_counts_use_the_served_models_tokenizer(model, local_server, monkeypatch):
    def no_gpt2() -> None:
        raise AssertionError("LangChain's GPT-2 tokenizer was asked for")

    monkeypatch.setattr(language_model_base, "get_tokenizer", no_gpt2)
    text = "The harbour of town 3 handled 360 ships."
    expected = local_server.manager.tokenizer(text, add_special_tokens=False).input_ids
    assert model.get_token_ids(text) == expected and model.get_num_tokens(text) == len(expected)


def test_chat_messages_count_as_the_reply_counts_them(chat_parrot):
    messages = [SystemMessage(SYSTEM), HumanMessage("What is a crane?")]
    assert chat_parrot.get_num_tokens_from_messages(messages) == \
        chat_parrot.invoke(messages).usage_metadata["input_tokens"]


def test_token_counts_inside_a_deferred_run_count_the_real_text(parrot_llm):
    chain = SAY | parrot_llm | RunnableLambda(lambda text: {"count": parrot_llm.get_num_tokens(text), "text": text})
    both(chain, {"topic": "ships"}, calls=1, graphs=1)


# ---- the pieces ------------------------------------------------------------------------------------------------------


class Values:
    """A value source for DeferredText without a server: counts the values it is asked for."""

    def __init__(self) -> None:
        self.read: list[int] = []

    def value(self, index: int) -> str:
        self.read.append(index)
        return "Paris, France"

    def marker(self, index: int) -> str:
        return f"{MARK}t.{index}{MARK}"


def test_deferred_text_reads_as_text_or_refuses_loudly():
    values = Values()
    text = DeferredText(values, ("In ", 0, "."))
    assert isinstance(text, str) and not hasattr(text, "content") and values.read == []  # no wait for those
    assert text.marked() == f"In {MARK}t.0{MARK}." and values.read == []
    assert (len(text), "Paris" in text, text == "In Paris, France.", f"[{text}]", text + "!", "> " + text) == \
        (17, True, True, "[In Paris, France.]", "In Paris, France.!", "> In Paris, France.")
    assert (text.split(", "), text[3:8], list(text)[:2], str(text), hash(text)) == \
        (["In Paris", "France."], "Paris", ["I", "n"], "In Paris, France.", hash("In Paris, France."))
    assert pickle.loads(pickle.dumps(text)) == "In Paris, France." and values.read == [0]  # fetched once
    for needs_a_str in (lambda: "".join([text]), lambda: json.loads(text), lambda: "Paris" in "x".join([text])):
        with pytest.raises(TypeError):
            needs_a_str()


def test_calls_are_cut_where_their_shared_prefix_saves_most():
    instruction = "Summarize this part of the report: "
    parts = [instruction + p for p in ("The harbour A", "The harbour B", "Cranes", "Ships")]
    assert shared_prefix_lengths(parts) == [len(instruction)] * 4  # not where two parts begin alike too
    assert shared_prefix_lengths(["Sum it: x"], ["Sum it: y"]) == [len("Sum it: ")]  # as calls sent before
    assert shared_prefix_lengths(["alone"]) == [0]
