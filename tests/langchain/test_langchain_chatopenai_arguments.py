"""ChatParrot in place of LangChain's ChatOpenAI: the constructor arguments that LangChain's documentation gives
ChatOpenAI work with ChatOpenAI's meaning (`stream_usage`, `n`, `logprobs`, `model_kwargs`...), and what cannot be
sent is refused, saying why, never accepted and ignored. Against the tiny model on loopback."""

from __future__ import annotations

import contextlib
import json
import re

import httpx
import pytest
from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser
from pydantic import ValidationError
from transformers import AutoTokenizer

from parrot_lc.engine.loader import TINY_DIR
from parrot_lc.frontend.errors import InvalidRequestError, NotFoundError
from parrot_lc.integrations.langchain import ChatParrot, LengthFinishReasonError, deferred


@pytest.fixture
def sent() -> list[httpx.Request]:
    """The chat requests that `recorded` models send."""
    return []


@pytest.fixture
def recorded(parrot_server, sent):
    """`recorded(**arguments)`: ChatParrot on the test server with these arguments, its chat requests in `sent`."""
    def record(request: httpx.Request) -> None:
        if request.url.path == "/v1/chat/completions":
            sent.append(request)

    def make(**arguments) -> ChatParrot:
        return ChatParrot(base_url=parrot_server, sync_client_kwargs={"event_hooks": {"request": [record]}},
                          **arguments)

    return make


def test_chatopenais_common_arguments_go_into_the_request_as_chatopenai_sends_them(recorded, sent):
    """The arguments of LangChain's ChatOpenAI documentation, as a user swapping the class passes them."""
    chat = recorded(model_name="tiny", temperature=0.7, max_completion_tokens=3, timeout=30, max_retries=1,
                    api_key="sk-anything", n=2, stop=["\n\n"], seed=7, logprobs=True, top_logprobs=2,
                    frequency_penalty=0.5, presence_penalty=0.25, top_p=0.9, streaming=False, stream_usage=True)
    reply = chat.invoke("Hi")
    [request] = sent
    body = json.loads(request.content)
    assert {k: v for k, v in body.items() if k != "messages"} == {
        "model": "tiny", "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "seed": 7, "presence_penalty": 0.25,
        "frequency_penalty": 0.5, "stop": ["\n\n"], "n": 2, "logprobs": True, "top_logprobs": 2}
    assert request.headers["authorization"] == "Bearer sk-anything"
    assert reply.response_metadata["model_name"] == "tiny" and reply.response_metadata["logprobs"]["content"]


def test_model_name_is_chatopenais_name_for_model(parrot_server):
    assert ChatParrot(base_url=parrot_server, model_name="tiny").model == "tiny"
    with pytest.raises(NotFoundError, match="'gpt-4o' is not served here"):
        ChatParrot(base_url=parrot_server, model_name="gpt-4o").invoke("Hi")


def test_chatopenais_older_names_of_key_url_and_timeout_are_taken(parrot_server):
    chat = ChatParrot(openai_api_base=parrot_server + "/v1", openai_api_key="sk-old", request_timeout=9)
    assert (chat.base_url, chat.api_key.get_secret_value(), chat.timeout) == (parrot_server + "/v1", "sk-old", 9)
    assert chat.invoke("Hi", max_tokens=2).content is not None


def test_a_stop_given_as_one_string_is_one_stop_sequence(parrot_server):
    sampled = dict(base_url=parrot_server, model="tiny", max_tokens=16, temperature=1.0, seed=3)
    text = ChatParrot(**sampled).invoke("Hi").content
    stop = re.search(r"[A-Za-z]{3}", text[2:]).group(0)
    expected = text[: text.index(stop)]
    assert ChatParrot(**sampled, stop=stop).stop == [stop]
    assert ChatParrot(**sampled, stop=stop).invoke("Hi").content == expected
    assert ChatParrot(**sampled).invoke("Hi", stop=stop).content == expected


def test_n_gives_generate_n_replies_of_one_request_and_invoke_the_first(recorded, sent):
    chat = recorded(model="tiny", max_tokens=4, temperature=1.0, seed=5, n=3)
    [replies] = chat.generate([[HumanMessage("Hi")]]).generations
    assert len(sent) == 1 and len(replies) == 3 and len({r.text for r in replies}) > 1
    assert [r.message.usage_metadata["output_tokens"] for r in replies] == [12] * 3  # the request's, as ChatOpenAI
    assert chat.invoke("Hi").content == replies[0].text
    assert len(recorded(model="tiny", max_tokens=4).generate([[HumanMessage("Hi")]], n=2).generations[0]) == 2


def test_n_above_one_is_refused_for_a_stream_which_gives_one_reply(parrot_server):
    with pytest.raises(ValidationError, match="n must be 1 when streaming"):
        ChatParrot(base_url=parrot_server, n=2, streaming=True)
    chat = ChatParrot(base_url=parrot_server, model="tiny", max_tokens=2, n=2)
    with pytest.raises(ValueError, match="n must be 1 when streaming"):
        list(chat.stream("Hi"))
    with pytest.raises(ValueError, match="n must be 1 when streaming"):
        list(ChatParrot(base_url=parrot_server, model="tiny", max_tokens=2).stream("Hi", n=2))


def test_a_deferred_call_of_several_replies_runs_at_once_with_the_eager_result(parrot_server):
    chat = ChatParrot(base_url=parrot_server, model="tiny", max_tokens=4, temperature=1.0, seed=5, n=2)
    chain = chat | StrOutputParser()
    runnable = deferred(chain)
    assert runnable.invoke("Hi") == chain.invoke("Hi")
    assert "ChatParrot calls of several replies (n) run at once, on real text" in runnable.last_run.waits


def test_logprobs_and_top_logprobs_arguments_give_what_a_bound_call_gives(parrot_server):
    arguments = dict(base_url=parrot_server, model="tiny", max_tokens=3, temperature=0)
    bound = ChatParrot(**arguments).bind(logprobs=True, top_logprobs=2).invoke("Hi")
    reply = ChatParrot(**arguments, logprobs=True, top_logprobs=2).invoke("Hi")
    assert reply.response_metadata["logprobs"] == bound.response_metadata["logprobs"]
    assert all(len(token["top_logprobs"]) == 2 for token in reply.response_metadata["logprobs"]["content"])


@pytest.mark.asyncio
@pytest.mark.parametrize("asynchronous", [False, True], ids=["stream", "astream"])
async def test_stream_usage_false_streams_no_usage_and_a_call_may_ask_for_it(parrot_server, asynchronous):
    """ChatOpenAI's `stream_usage`: whether a stream's chunks carry `usage_metadata` (invoke's reply always does)."""
    arguments = dict(base_url=parrot_server, model="tiny", max_tokens=3, temperature=0)

    async def usages(chat: ChatParrot, **call) -> list:
        chunks = ([c async for c in chat.astream("Hi", **call)] if asynchronous else list(chat.stream("Hi", **call)))
        return [c.usage_metadata for c in chunks if c.usage_metadata]

    quiet = ChatParrot(**arguments, stream_usage=False)
    assert await usages(quiet) == [] and quiet.invoke("Hi").usage_metadata["output_tokens"] == 3
    [usage] = await usages(quiet, stream_usage=True)
    assert usage["output_tokens"] == 3
    assert await usages(ChatParrot(**arguments)) == [usage]  # on by default
    assert await usages(ChatParrot(**arguments), stream_usage=False) == []


def test_model_kwargs_are_sent_with_every_chat_under_the_calls_own_options(recorded, sent):
    chat = recorded(model="tiny", max_tokens=2, model_kwargs={"response_format": {"type": "text"},
                                                              "tool_choice": "none"})
    chat.invoke("Hi")
    with contextlib.suppress(LengthFinishReasonError):  # the random model's JSON may not close: the request counts
        chat.invoke("Hi", response_format={"type": "json_object"}, max_tokens=2)
    first, second = (json.loads(request.content) for request in sent)
    assert first["response_format"] == {"type": "text"} and first["tool_choice"] == "none"
    assert second["response_format"] == {"type": "json_object"} and second["tool_choice"] == "none"


@pytest.mark.parametrize("model_kwargs, why", [
    ({"temperature": 0.5}, r"\['temperature'\] should be given as arguments of their own"),
    ({"max_completion_tokens": 5}, r"\['max_completion_tokens'\] should be given as arguments of their own"),
    ({"user": "u-1", "logit_bias": {}}, r"\['logit_bias', 'user'\]: no request fields that ChatParrot sends"),
])
def test_model_kwargs_refuse_arguments_of_their_own_and_fields_not_sent(model_kwargs, why):
    """As ChatOpenAI refuses its own arguments in model_kwargs; the fields that ChatParrot does not send would be
    dropped."""
    with pytest.raises(ValidationError, match=why):
        ChatParrot(base_url="http://127.0.0.1:9", model_kwargs=model_kwargs)



# ---- ChatOpenAI's connection arguments, extra_body and the arguments it cannot honour ---------------------------


@pytest.fixture
def exchanges() -> list[httpx.Response]:
    """Every response that `on_the_wire` models get (each with its request), sync and async alike."""
    return []


@pytest.fixture
def on_the_wire(parrot_server, exchanges):
    """`on_the_wire(**arguments)`: ChatParrot on the test server (tiny, greedy, 3 tokens unless the arguments say
    otherwise), every exchange in `exchanges`."""
    async def anote(response: httpx.Response) -> None:
        exchanges.append(response)

    def make(**arguments) -> ChatParrot:
        defaults = dict(base_url=parrot_server, model="tiny", max_tokens=3, temperature=0)
        return ChatParrot(**{**defaults, **arguments},
                          sync_client_kwargs={"event_hooks": {"response": [exchanges.append]}},
                          async_client_kwargs={"event_hooks": {"response": [anote]}})

    return make


def _chat_bodies(exchanges: list[httpx.Response]) -> list[dict]:
    return [json.loads(r.request.content) for r in exchanges if r.request.url.path == "/v1/chat/completions"]


def _graph_samplings(exchanges: list[httpx.Response]) -> list[dict]:
    """The sampling of every output of the graph calls submitted."""
    calls = [call for r in exchanges if r.request.method == "POST" and r.request.url.path.endswith("/calls")
             for call in json.loads(r.request.content)["calls"]]
    return [piece["sampling"] for call in calls for piece in call["template"] if piece.get("output")]


@pytest.mark.asyncio
async def test_default_headers_reach_the_server_with_every_request_eager_deferred_and_async(on_the_wire, exchanges):
    chain = on_the_wire(default_headers={"X-Request-Id": "trial-7", "X-Gateway-Route": "parrot"}) | StrOutputParser()
    chain.invoke("Hi")
    deferred(chain).invoke("Hi")
    await chain.ainvoke("Hi")
    assert len(_chat_bodies(exchanges)) == 2 and _graph_samplings(exchanges)  # eager, async, and a graph call
    assert all(response.request.headers["x-gateway-route"] == "parrot" for response in exchanges)
    # The server answers with the request id it received (a fresh one for a request without).
    assert {response.headers["x-request-id"] for response in exchanges} == {"trial-7"}


def test_a_model_with_other_headers_than_the_deferred_runs_first_sends_its_own(on_the_wire, exchanges):
    """A deferred run's graph calls go out with its first model's headers, so a second model that sends other
    headers runs its calls at once, with its own, and the run gives the eager result."""
    first = on_the_wire(default_headers={"X-Tenant": "a"})
    second = on_the_wire(default_headers={"X-Tenant": "b"})
    chain = first | StrOutputParser() | (lambda text: f"Go on: {text}") | second | StrOutputParser()
    eager = chain.invoke("Hi")
    exchanges.clear()
    assert deferred(chain).invoke("Hi") == eager
    tenants = {(r.request.url.path, r.request.headers["x-tenant"]) for r in exchanges}
    assert ("/v1/chat/completions", "b") in tenants  # the second model's call, at once with its own header
    assert all(tenant == "a" for path, tenant in tenants if path != "/v1/chat/completions")


def test_default_query_is_added_to_every_request_url_eager_and_deferred(on_the_wire, exchanges):
    chain = on_the_wire(default_query={"api-version": "2024-06-01"}) | StrOutputParser()
    assert deferred(chain).invoke("Hi") == chain.invoke("Hi")
    assert _chat_bodies(exchanges) and _graph_samplings(exchanges)
    assert all(response.request.url.params["api-version"] == "2024-06-01" for response in exchanges)


@pytest.mark.parametrize("name", ["organization", "openai_organization"])
def test_organization_is_sent_as_the_openai_organization_header(on_the_wire, exchanges, name):
    on_the_wire(**{name: "org-42"}).invoke("Hi")
    assert exchanges and all(r.request.headers["openai-organization"] == "org-42" for r in exchanges)


def test_extra_body_sampling_fields_reach_the_request_and_the_deferred_call_alike(on_the_wire, exchanges):
    """vLLM's sampling fields in `extra_body`: top_k=1 at temperature 1 gives the greedy reply, eager and deferred
    (the same seed without it does not)."""
    sampled = dict(max_tokens=8, temperature=1.0, seed=3)
    greedy = on_the_wire(max_tokens=8, repetition_penalty=1.1).invoke("Hi").content
    assert on_the_wire(**sampled, repetition_penalty=1.1).invoke("Hi").content != greedy
    chain = on_the_wire(**sampled, extra_body={"top_k": 1, "repetition_penalty": 1.1}) | StrOutputParser()
    runnable = deferred(chain)
    assert runnable.invoke("Hi") == chain.invoke("Hi") == greedy
    assert not runnable.last_run.waits  # recorded, not run at once
    assert {k: _chat_bodies(exchanges)[-1][k] for k in ("top_k", "repetition_penalty")} == {
        "top_k": 1, "repetition_penalty": 1.1}
    [sampling] = _graph_samplings(exchanges)
    assert (sampling["top_k"], sampling["repetition_penalty"]) == (1, 1.1)


def test_extra_body_min_tokens_and_stop_token_ids_reach_the_deferred_call_as_the_eager_request(on_the_wire, exchanges):
    """vLLM's min_tokens and stop_token_ids, which a graph call's sampling has too: the greedy reply's first token
    as a stop token ends it at once, unless min_tokens holds it off; deferred and eager alike."""
    first = on_the_wire(max_tokens=1).invoke("Hi").content
    (stop,) = AutoTokenizer.from_pretrained(TINY_DIR)(first, add_special_tokens=False).input_ids
    assert on_the_wire(max_tokens=6, extra_body={"stop_token_ids": [stop]}).invoke("Hi").content == ""
    chain = on_the_wire(max_tokens=6, extra_body={"stop_token_ids": [stop], "min_tokens": 2}) | StrOutputParser()
    runnable = deferred(chain)
    assert runnable.invoke("Hi") == chain.invoke("Hi") != ""
    assert not runnable.last_run.waits  # recorded, not run at once
    [sampling] = _graph_samplings(exchanges)
    assert (sampling["stop_token_ids"], sampling["min_tokens"]) == ([stop], 2)


@pytest.mark.parametrize("mode", ["eager", "deferred"])
def test_an_extra_body_field_that_cannot_be_sent_fails_naming_it(on_the_wire, mode):
    """The server refuses a field that it does not implement (`logit_bias`) naming it; a deferred call, which
    could only drop it, raises the same error before sending anything."""
    chain = on_the_wire(extra_body={"logit_bias": {"42": 5}}) | StrOutputParser()
    with pytest.raises(InvalidRequestError) as refused:
        (deferred(chain) if mode == "deferred" else chain).invoke("Hi")
    assert refused.value.field == "logit_bias" and "logit_bias" in str(refused.value)


@pytest.mark.parametrize("arguments, why", [
    (dict(temperature=0.5, extra_body={"temperature": 0.7}), r"extra_body: \['temperature'\] set by other arguments"),
    (dict(model_kwargs={"tool_choice": "none"}, extra_body={"tool_choice": "auto"}), r"\['tool_choice'\] set by other"),
    (dict(extra_body={"messages": []}), r"extra_body cannot set \['messages'\]"),
])
def test_an_extra_body_field_given_another_way_too_is_refused(arguments, why):
    with pytest.raises(ValidationError, match=why):
        ChatParrot(base_url="http://127.0.0.1:9", **arguments)


def test_a_call_option_that_extra_body_sets_too_is_refused(on_the_wire):
    with pytest.raises(ValueError, match=r"\['top_p'\] set both in extra_body and by the call"):
        on_the_wire(extra_body={"top_p": 0.5}).invoke("Hi", top_p=0.9)


@pytest.mark.parametrize("name, value", [
    ("reasoning_effort", "low"), ("http_client", httpx.Client()), ("http_async_client", httpx.AsyncClient())])
def test_arguments_that_chatparrot_cannot_honour_are_refused_naming_them_and_none_is_taken(name, value):
    with pytest.raises(ValidationError, match=rf"{name}\n  Value error, {name}\b.* is not taken"):
        ChatParrot(base_url="http://127.0.0.1:9", **{name: value})
    assert getattr(ChatParrot(base_url="http://127.0.0.1:9", **{name: None}), name) is None
