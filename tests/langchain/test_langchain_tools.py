"""ChatParrot's tools and structured output: `bind_tools` for every kind of tool LangChain has, forced calls that
come back as `AIMessage.tool_calls` (streamed as `tool_call_chunks`), tool results sent with the next turn,
`with_structured_output` by each method and schema kind, and the same inside a deferred run (run at once, on real
text: its output is what an eager run gives); a structured reply cut by `max_tokens` raises, as ChatOpenAI's
does. Against the tiny model on loopback, at temperature 1 where a constraint makes any sample valid."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.output_parsers import JsonOutputParser, StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableBranch, RunnableLambda, RunnablePassthrough
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from parrot_lc import ChatParrot
from parrot_lc.integrations.langchain import LengthFinishReasonError, deferred


@tool
def get_weather(unit: Literal["celsius", "fahrenheit"], rain: bool) -> str:
    """The weather in Paris."""
    return "sunny"


def get_time() -> str:
    """The time now."""
    return "noon"


class Forecast(BaseModel):
    """A forecast."""

    unit: Literal["celsius", "fahrenheit"] = Field(description="the unit")
    rain: bool


class ForecastDict(TypedDict):
    """A forecast."""

    unit: Literal["celsius", "fahrenheit"]
    rain: bool


FORECAST_SCHEMA = Forecast.model_json_schema()


@pytest.fixture
def sent() -> list[dict]:
    """The bodies of the chat requests that `chat` sends."""
    return []


@pytest.fixture
def graphs() -> list[list[dict]]:
    """The calls of the graphs that `chat` submits."""
    return []


@pytest.fixture
def chat(parrot_server, sent, graphs) -> ChatParrot:
    def record(request):
        if request.url.path == "/v1/chat/completions":
            sent.append(json.loads(request.content))
        elif request.url.path.endswith("/calls") and request.method == "POST":
            graphs.append(json.loads(request.content)["calls"])

    return ChatParrot(base_url=parrot_server, max_tokens=300, temperature=1, seed=1,
                      sync_client_kwargs={"event_hooks": {"request": [record]}})


def test_bind_tools_sends_each_kind_of_tool_as_an_openai_function(chat, sent):
    chat.bind_tools([get_weather, get_time, Forecast, ForecastDict, {"type": "function", "function": {
        "name": "get_date", "parameters": {"type": "object", "properties": {}}}}], tool_choice="get_time").invoke("Hi")
    [body] = sent
    assert [t["function"]["name"] for t in body["tools"]] == ["get_weather", "get_time", "Forecast", "ForecastDict",
                                                             "get_date"]
    assert body["tools"][0]["function"]["parameters"]["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize("choice, sent_as", [("any", "required"), (True, "required"), ("required", "required"),
                                             ("auto", "auto"), ("none", "none")])
def test_tool_choice_is_sent_as_openai_names_it(chat, sent, choice, sent_as):
    chat.bind_tools([get_weather], tool_choice=choice).invoke("Hi", max_tokens=2)
    assert sent[0]["tool_choice"] == sent_as


def test_a_forced_call_comes_back_as_a_tool_call_with_usage(chat):
    for seed in range(3):  # one call a reply: a random model might go on adding calls up to max_tokens
        model = chat.bind_tools([get_weather, get_time], tool_choice="any", parallel_tool_calls=False)
        reply = model.invoke("Weather?", seed=seed)
        assert reply.response_metadata["finish_reason"] == "tool_calls" and reply.usage_metadata["output_tokens"] > 0
        [call] = reply.tool_calls
        assert call["type"] == "tool_call" and call["id"].startswith("call_") and not reply.invalid_tool_calls
        if call["name"] == "get_weather":
            Forecast.model_validate(call["args"])
        else:
            assert call["name"] == "get_time" and call["args"] == {}


def test_messages_with_tools_count_as_the_reply_with_those_tools_counts_them(chat):
    messages = [HumanMessage("Weather?")]
    counted = chat.get_num_tokens_from_messages(messages, tools=[get_weather, get_time])
    reply = chat.bind_tools([get_weather, get_time]).invoke(messages, max_tokens=1)
    assert counted == reply.usage_metadata["input_tokens"] > chat.get_num_tokens_from_messages(messages)


def test_a_named_choice_calls_that_tool(chat):
    reply = chat.bind_tools([get_weather, get_time], tool_choice="get_weather").invoke("Weather?")
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and get_weather.invoke(call["args"]) == "sunny"


def test_streamed_tool_call_chunks_join_into_the_invoked_call(chat):
    model = chat.bind_tools([get_weather], tool_choice="get_weather")
    whole = model.invoke("Weather?")
    chunks = list(model.stream("Weather?"))
    assert chunks[0].tool_call_chunks[0]["name"] == "get_weather" and len(chunks) > 3
    joined = sum(chunks[1:], chunks[0])
    assert [(c["name"], c["args"]) for c in joined.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]
    assert joined.response_metadata["finish_reason"] == "tool_calls" and joined.usage_metadata["output_tokens"] > 0


@pytest.mark.asyncio
async def test_async_calls_and_streams_read_tool_calls_too(chat):
    model = chat.bind_tools([get_weather], tool_choice="get_weather")
    whole = await model.ainvoke("Weather?")
    chunks = [chunk async for chunk in model.astream("Weather?")]
    assert sum(chunks[1:], chunks[0]).tool_calls[0]["args"] == whole.tool_calls[0]["args"]


def test_tool_calls_and_results_go_back_with_the_next_turn(chat, sent):
    history = [HumanMessage("Weather?"),
               AIMessage("", tool_calls=[{"name": "get_weather", "args": {"unit": "celsius", "rain": False},
                                          "id": "call_7", "type": "tool_call"}]),
               ToolMessage("sunny", tool_call_id="call_7")]
    chat.bind_tools([get_weather]).invoke(history, max_tokens=2)
    assert sent[0]["messages"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_7", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"unit": "celsius", "rain": false}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_7"}]


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
@pytest.mark.parametrize("schema, check", [
    (Forecast, lambda out: isinstance(out, Forecast)),
    (ForecastDict, lambda out: Forecast.model_validate(out) is not None),
    (FORECAST_SCHEMA, lambda out: Forecast.model_validate(out) is not None),
], ids=["pydantic", "typeddict", "json_schema"])
def test_structured_output_follows_the_schema(chat, method, schema, check):
    structured = chat.with_structured_output(schema, method=method)
    assert check(structured.invoke("A forecast, please."))
    assert check(list(structured.stream("A forecast, please."))[-1])


def test_a_pydantic_class_as_response_format_sends_its_schema_and_gives_the_parsed_object(chat, sent):
    """ChatOpenAI's `invoke(..., response_format=Person)`: the parsed object in `additional_kwargs["parsed"]`."""
    reply = chat.bind(response_format=Forecast).invoke("A forecast, please.")
    assert sent[-1]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "Forecast", "schema": convert_to_json_schema(Forecast), "strict": True}}
    assert reply.additional_kwargs["parsed"] == Forecast.model_validate_json(reply.content)


@pytest.mark.asyncio
async def test_a_pydantic_response_format_is_parsed_in_async_calls_too(chat):
    reply = await chat.ainvoke("A forecast, please.", response_format=Forecast)
    assert isinstance(reply.additional_kwargs["parsed"], Forecast)


def test_a_pydantic_response_format_cut_by_max_tokens_raises(chat):
    with pytest.raises(LengthFinishReasonError):
        chat.invoke("A forecast, please.", response_format=Forecast, max_tokens=3)


def test_a_deferred_call_with_a_pydantic_response_format_runs_at_once_and_parses(chat, graphs):
    ask = ChatPromptTemplate.from_messages([("human", "A forecast for {city}, please.")])
    chain = ask | chat.model_copy(update={"temperature": 0}).bind(response_format=Forecast)
    eager = chain.invoke({"city": "Oslo"})
    runnable = deferred(chain)
    reply = runnable.invoke({"city": "Oslo"})
    assert reply.additional_kwargs["parsed"] == eager.additional_kwargs["parsed"] and not graphs


def test_json_mode_gives_a_json_object(chat):
    """With a seed whose sample closes its object within max_tokens (JSON mode allows any whitespace: most samples
    of the random model ramble on until they are cut, which raises)."""
    chat = chat.model_copy(update={"seed": 6})
    out = chat.with_structured_output(FORECAST_SCHEMA, method="json_mode").invoke("A forecast as JSON.")
    assert isinstance(out, dict)


def test_include_raw_gives_the_reply_its_parse_and_no_error(chat):
    out = chat.with_structured_output(Forecast, method="function_calling", include_raw=True).invoke("Forecast?")
    assert isinstance(out["raw"], AIMessage) and isinstance(out["parsed"], Forecast) and out["parsing_error"] is None


def test_a_parse_that_fails_is_reported_with_include_raw(chat):
    """JSON mode constrains the reply to a JSON object, not to the schema's fields."""
    class Strict(BaseModel):
        never_generated_field: int

    out = chat.with_structured_output(Strict, method="json_mode", include_raw=True).invoke("{}", max_tokens=1)
    assert out["parsed"] is None and out["parsing_error"] is not None


def structured_chain(chat: ChatParrot, method: str):
    """A plain call whose reply a structured call reads."""
    plain = chat.model_copy(update={"max_tokens": 5})
    ask = ChatPromptTemplate.from_messages([("human", "Describe the sky over {city}.")])
    judge = ChatPromptTemplate.from_messages([("human", "The sky: {sky}\nGive a forecast.")])
    return (ask | plain | StrOutputParser() | RunnableLambda(lambda sky: {"sky": sky})
            | judge | chat.with_structured_output(Forecast, method=method))


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_a_deferred_structured_output_chain_equals_the_eager_one(chat, graphs, method):
    """A response format is recorded as a constrained output of the graph, which the parser reads; a call with
    tools runs at once, on the real text of the call before it."""
    chat = chat.model_copy(update={"temperature": 0})
    eager = structured_chain(chat, method).invoke({"city": "Paris"})
    runnable = deferred(structured_chain(chat, method))
    assert runnable.invoke({"city": "Paris"}) == eager and isinstance(eager, Forecast)
    assert runnable.last_run.submissions == 1
    [calls] = graphs
    if method == "json_schema":
        assert len(calls) == 2 and calls[1]["template"][-1]["sampling"]["constraint"] == {
            "json_schema": convert_to_json_schema(Forecast)}
    else:
        assert len(calls) == 1 and "ChatParrot calls with tools run at once, on real text" in runnable.last_run.waits


# ---- a structured reply cut by max_tokens ----------------------------------------------------------------------

CUT = "Could not parse response content as the length limit was reached"  # ChatOpenAI's message (the openai package's)


@pytest.fixture
def cut(chat) -> ChatParrot:
    """`chat` with room for 3 tokens: no structured reply fits."""
    return chat.model_copy(update={"max_tokens": 3})


def run(runnable, how: str):
    if how == "invoke":
        return runnable.invoke("A forecast, please.")
    if how == "stream":
        return list(runnable.stream("A forecast, please."))

    async def collect():
        if how == "ainvoke":
            return await runnable.ainvoke("A forecast, please.")
        return [chunk async for chunk in runnable.astream("A forecast, please.")]

    return asyncio.run(collect())


@pytest.mark.parametrize("how", ["invoke", "stream", "ainvoke", "astream"])
@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_a_structured_reply_cut_by_max_tokens_raises_rather_than_being_parsed_in_part(cut, method, how):
    """LangChain's JSON parsers would complete the cut JSON text into an object without a word."""
    with pytest.raises(LengthFinishReasonError, match=CUT) as raised:
        run(cut.with_structured_output(Forecast, method=method), how)
    assert isinstance(raised.value, OutputParserException)  # what code that catches a failed parse catches
    assert "'completion_tokens': " in str(raised.value)  # OpenAI's usage, whatever the method, as its error says it
    if method != "function_calling":
        assert raised.value.llm_output.startswith("{") and not complete_json(raised.value.llm_output)


def test_a_json_response_format_cut_raises_at_the_model_so_include_raw_raises_too_as_with_chatopenai(cut):
    with pytest.raises(LengthFinishReasonError, match=CUT):
        cut.with_structured_output(Forecast, method="json_schema", include_raw=True).invoke("A forecast, please.")
    with pytest.raises(LengthFinishReasonError, match=CUT):
        cut.bind(response_format={"type": "json_object"}).invoke("A forecast as JSON.")


def test_a_reply_without_a_json_response_format_cut_by_max_tokens_is_no_error(cut):
    for model in (cut, cut.bind(response_format={"type": "text"})):
        assert model.invoke("Hi").response_metadata["finish_reason"] == "length"


def test_a_forced_call_cut_by_max_tokens_is_include_raws_parsing_error(cut):
    """Where ChatOpenAI gives `parsed` None and no error."""
    out = cut.with_structured_output(Forecast, method="function_calling", include_raw=True).invoke("Forecast?")
    assert out["raw"].response_metadata["finish_reason"] == "length" and out["parsed"] is None
    assert isinstance(out["parsing_error"], LengthFinishReasonError)


def test_a_deferred_structured_call_cut_by_max_tokens_raises_as_the_eager_one(cut, graphs):
    """The deferred call's reply carries its finish reason ("length") once it is known, as the eager one's does: that
    tells, not its constrained JSON, which does not end."""
    runnable = deferred(cut.with_structured_output(Forecast, method="json_schema"))
    with pytest.raises(LengthFinishReasonError, match=CUT) as raised:
        runnable.invoke("A forecast, please.")
    assert "the reply ends before its JSON does" not in str(raised.value)
    [[call]] = graphs  # recorded, with its output constrained, not made at once
    assert call["template"][-1]["sampling"]["constraint"] == {"json_schema": convert_to_json_schema(Forecast)}



@pytest.mark.parametrize("parser", [JsonOutputParser(), StrOutputParser(), RunnablePassthrough()],
                         ids=["json_parser", "str_parser", "no_parser"])
def test_a_deferred_json_response_format_cut_by_max_tokens_raises_as_the_eager_call(cut, parser):
    """Read by a parser, or only at the run's end: the eager call raised at the model, the run must not answer."""
    ask = ChatPromptTemplate.from_messages([("human", "A forecast for {city} as JSON.")])
    chain = ask | cut.bind(response_format={"type": "json_object"}) | parser
    with pytest.raises(LengthFinishReasonError, match=CUT):
        chain.invoke({"city": "Oslo"})
    with pytest.raises(LengthFinishReasonError, match=CUT) as raised:
        deferred(chain).invoke({"city": "Oslo"})
    assert raised.value.llm_output.startswith("{") and not complete_json(raised.value.llm_output)


def test_a_deferred_batch_returns_a_cut_json_reply_as_its_items_error(cut):
    chain = RunnableBranch((lambda text: "JSON" in text, cut.bind(response_format={"type": "json_object"})), cut)
    inputs = ["Hi", "A forecast as JSON."]
    eager = (chain | StrOutputParser()).batch(inputs, return_exceptions=True)
    assert isinstance(eager[0], str) and isinstance(eager[1], LengthFinishReasonError)
    run = deferred(chain | StrOutputParser()).batch(inputs, return_exceptions=True)
    assert isinstance(run[0], str) and isinstance(run[1], LengthFinishReasonError)


def complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def test_a_model_bound_to_no_tools_chats_without_tools(chat, sent):
    """The server refuses `tools: []` as OpenAI does; an agent of no tools binds an empty list and must still chat."""
    reply = chat.bind_tools([]).invoke("Hi")
    assert reply.content and not reply.tool_calls and "tools" not in sent[-1]
