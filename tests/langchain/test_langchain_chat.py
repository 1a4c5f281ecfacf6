"""ChatParrot beyond LangChain's standard suite (test_langchain_standard.py): callbacks while streaming, stop
sequences, usage and metadata, batches, message conversion and errors."""

from __future__ import annotations

import asyncio
import json
import pickle
import re
import subprocess
import sys
from typing import Any

import httpx
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.exceptions import (
    ContextOverflowError, ModelAuthenticationError, ModelConnectionError, ModelNotFoundError,
)
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import ValidationError

from parrot_lc.frontend.errors import AuthError, InvalidRequestError, NotFoundError, ParrotConnectionError, ParrotError
from parrot_lc.integrations.langchain import ChatParrot, deferred
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings, ServerSettings


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts = 0
        self.tokens: list[str] = []
        self.ends = 0

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.starts += 1

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ends += 1


@pytest.fixture
def chat(parrot_server: str) -> ChatParrot:
    return ChatParrot(base_url=parrot_server, model="tiny", max_tokens=6, temperature=0)


def test_invoke_reports_usage_finish_reason_and_model(chat):
    reply = chat.invoke([SystemMessage("You are terse."), HumanMessage("Hi")])
    assert isinstance(reply, AIMessage) and reply.content
    assert reply.usage_metadata["output_tokens"] == 6 and reply.usage_metadata["input_tokens"] > 0
    assert reply.usage_metadata["total_tokens"] == reply.usage_metadata["input_tokens"] + 6
    assert reply.response_metadata["finish_reason"] == "length"
    assert reply.response_metadata["model_name"] == "tiny"


def test_generate_sums_the_chats_token_usage_in_llm_output_as_chatopenai_does(chat):
    """LangChain's base class leaves `generate(...).llm_output` empty; ChatOpenAI's sums the replies' usage."""
    result = chat.generate([[HumanMessage("Hi")], [HumanMessage("Hello there")]])
    usages = [generations[0].message.usage_metadata for generations in result.generations]
    assert result.llm_output["model_name"] == "tiny"
    assert result.llm_output["token_usage"]["prompt_tokens"] == sum(u["input_tokens"] for u in usages)
    assert result.llm_output["token_usage"]["completion_tokens"] == sum(u["output_tokens"] for u in usages)
    assert result.llm_output["token_usage"]["total_tokens"] == sum(u["total_tokens"] for u in usages)


def test_usage_counts_the_prompt_tokens_read_from_the_servers_cache(chat):
    """As ChatOpenAI reports OpenAI's cached tokens: `input_token_details.cache_read`, whole and streamed."""
    messages = [SystemMessage("You answer questions about parrots, briefly. " * 4), HumanMessage("Hi")]
    chat.invoke(messages)
    usage = chat.invoke(messages).usage_metadata
    assert 16 <= usage["input_token_details"]["cache_read"] < usage["input_tokens"]
    streamed = [c.usage_metadata for c in chat.stream(messages) if c.usage_metadata]
    assert streamed[-1]["input_token_details"] == usage["input_token_details"]


def test_token_usage_in_response_metadata_has_openais_shape_as_chatopenais_does(chat):
    """ChatOpenAI's `response_metadata["token_usage"]` is OpenAI's `usage` object: its cached tokens nested in
    `prompt_tokens_details`; `generate`'s `llm_output` sums them, nested too."""
    messages = [SystemMessage("You answer questions about whales, briefly. " * 4), HumanMessage("Hi")]
    chat.invoke(messages)
    reply = chat.invoke(messages)
    usage = reply.response_metadata["token_usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert usage["prompt_tokens_details"]["cached_tokens"] == reply.usage_metadata["input_token_details"]["cache_read"]
    summed = chat.generate([messages, messages]).llm_output["token_usage"]
    assert summed["prompt_tokens_details"]["cached_tokens"] == 2 * usage["prompt_tokens_details"]["cached_tokens"]
    assert summed["prompt_tokens"] == 2 * usage["prompt_tokens"]


def test_a_new_system_prompt_reads_nothing_from_the_cache(chat):
    """Its prefix context is filled for this call: computed, not read from a cache."""
    usage = chat.invoke([SystemMessage("You name the stars over the harbour, one a line. " * 8),
                         HumanMessage("Hi")]).usage_metadata
    assert usage["input_tokens"] > 64 and usage["input_token_details"]["cache_read"] == 0


def test_without_a_model_name_the_server_answers_with_the_one_it_serves(parrot_server):
    """The server refuses names of models it does not serve: a class given no `model` names none."""
    reply = ChatParrot(base_url=parrot_server, max_tokens=2, temperature=0).invoke("Hi")
    assert reply.response_metadata["model_name"] == "tiny"


def test_stream_fires_a_callback_per_token_and_ends_with_usage(chat):
    recorder = TokenRecorder()
    chunks = list(chat.stream("Tell me a story", config={"callbacks": [recorder]}))
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.content == chat.invoke("Tell me a story").content
    # As many pieces as the reader takes apart (graph.TextStream joins what waits): the callbacks see each one.
    assert recorder.tokens == [c.content for c in chunks]
    assert (recorder.starts, recorder.ends) == (1, 1)
    assert chunks[-1].chunk_position == "last" and full.usage_metadata["output_tokens"] == 6
    assert full.response_metadata["finish_reason"] == "length"


def test_streaming_field_sends_invoke_tokens_to_the_callbacks(parrot_server, chat):
    recorder = TokenRecorder()
    streaming = ChatParrot(base_url=parrot_server, model="tiny", max_tokens=6, temperature=0, streaming=True)
    reply = streaming.invoke("Tell me a story", config={"callbacks": [recorder]})
    assert reply.content == chat.invoke("Tell me a story").content == "".join(recorder.tokens)
    assert reply.usage_metadata["output_tokens"] == 6


@pytest.mark.asyncio
async def test_async_stream_and_batch(chat):
    recorder = TokenRecorder()
    expected = (await chat.ainvoke("Tell me a story")).content
    chunks = [c async for c in chat.astream("Tell me a story", config={"callbacks": [recorder]})]
    assert "".join(c.content for c in chunks) == expected == "".join(recorder.tokens)
    replies = await chat.abatch(["Tell me a story", "Hi"])
    assert replies[0].content == expected and all(r.usage_metadata for r in replies)


def test_stop_sequences_from_the_call_and_the_field(parrot_server):
    sampled = dict(base_url=parrot_server, model="tiny", max_tokens=16, temperature=1.0, seed=3)
    text = ChatParrot(**sampled).invoke("Hi").content
    stop = re.search(r"[A-Za-z]{3}", text[2:]).group(0)
    expected = text[: text.index(stop)]
    reply = ChatParrot(**sampled).invoke("Hi", stop=[stop])
    assert reply.content == expected and reply.response_metadata["finish_reason"] == "stop"
    assert ChatParrot(**sampled, stop=[stop]).invoke("Hi").content == expected
    both = ChatParrot(**sampled, stop=["never generated"])  # the call's stop sequences join the field's
    assert "".join(c.content for c in both.stream("Hi", stop=[stop])) == expected


def test_max_completion_tokens_is_max_tokens_by_openais_newer_name(parrot_server, chat):
    newer = ChatParrot(base_url=parrot_server, model="tiny", max_completion_tokens=3, temperature=0)
    assert newer.max_tokens == 3 and newer.invoke("Hi").usage_metadata["output_tokens"] == 3
    assert chat.invoke("Hi", max_completion_tokens=2).usage_metadata["output_tokens"] == 2


def test_arguments_and_call_options_it_does_not_take_are_refused_naming_them():
    """Not dropped without a word (ChatOpenAI sends a call's options to the server, which answers all of them)."""
    with pytest.raises(ValidationError, match="model_kwargs"):
        ChatParrot(base_url="http://127.0.0.1:9", model_kwargs={"top_k": 5})
    chat = ChatParrot(base_url="http://127.0.0.1:9", max_retries=0)  # refused before any request
    with pytest.raises(ValueError, match=r"\['logit_bias', 'user'\]"):
        chat.invoke("Hi", logit_bias={}, user="me")
    with pytest.raises(ValueError, match=r"\['user'\]"):
        list(chat.bind(user="me").stream("Hi"))


def test_log_probabilities_come_back_in_the_response_metadata_as_chatopenais_do(chat):
    """LangChain's how-to: `.bind(logprobs=True)`, then `response_metadata["logprobs"]["content"]`."""
    model = chat.bind(logprobs=True, top_logprobs=2)
    reply = model.invoke("Hi")
    content = reply.response_metadata["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == reply.content and len(content) == 6
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    chunks = list(model.stream("Hi"))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed = streamed + chunk
    assert streamed.response_metadata["logprobs"] == reply.response_metadata["logprobs"]
    assert deferred(model).invoke("Hi").response_metadata["logprobs"] == reply.response_metadata["logprobs"]


def test_messages_become_openai_messages_with_the_key():
    seen: list[dict] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append({"auth": request.headers.get("authorization"), **json.loads(request.content)})
        return httpx.Response(200, json={"model": "m", "choices": [{"message": {"role": "assistant", "content": "ok"},
                                                                    "finish_reason": "stop"}]})

    chat = ChatParrot(base_url="http://parrot.test", api_key="k3y",
                      sync_client_kwargs={"transport": httpx.MockTransport(server)})
    messages = [SystemMessage("sys"), HumanMessage([{"type": "text", "text": "a"}, "b"]),
                AIMessage("c", tool_calls=[{"name": "f", "args": {}, "id": "1"}]), ToolMessage("d", tool_call_id="1")]
    assert chat.invoke(messages).content == "ok"
    assert seen[0]["auth"] == "Bearer k3y" and seen[0]["max_tokens"] == 256 and "temperature" not in seen[0]
    assert seen[0]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "ab"},
                                   {"role": "assistant", "content": "c", "tool_calls": [
                                       {"type": "function", "id": "1", "function": {"name": "f", "arguments": "{}"}}]},
                                   {"role": "tool", "content": "d", "tool_call_id": "1"}]


def test_images_are_refused_before_any_request():
    chat = ChatParrot(base_url="http://127.0.0.1:9", max_retries=0)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([HumanMessage([{"type": "text", "text": "what is this?"}, image])])


def test_server_errors_raise_with_the_servers_message(chat):
    with pytest.raises(InvalidRequestError, match="context is"):
        chat.invoke("word " * 9000)


@pytest.mark.parametrize("run", ["invoke", "stream", "ainvoke", "astream", "deferred"])
def test_a_prompt_too_long_raises_langchains_context_overflow_error_as_chatopenai_does(chat, run):
    """Code written for ChatOpenAI catches langchain-core's ContextOverflowError; it is the frontend's error too."""
    prompt = "word " * 9000
    runs = {"invoke": lambda: chat.invoke(prompt), "stream": lambda: list(chat.stream(prompt)),
            "ainvoke": lambda: asyncio.run(chat.ainvoke(prompt)),
            "astream": lambda: asyncio.run(_collected(chat.astream(prompt))),
            "deferred": lambda: deferred(chat).invoke(prompt)}
    with pytest.raises(ContextOverflowError, match="context is") as raised:
        runs[run]()
    assert isinstance(raised.value, ParrotError) and raised.value.code == "context_length_exceeded"


async def _collected(chunks: Any) -> list[Any]:
    return [chunk async for chunk in chunks]


def test_a_langchain_error_pickled_here_loads_in_another_process(chat):
    """As a process pool or a checkpointer moves it: its class is found there by name, made on first use."""
    with pytest.raises(ContextOverflowError) as raised:
        chat.invoke("word " * 9000)
    loads = ("import pickle, sys; from langchain_core.exceptions import ContextOverflowError; "
             "e = pickle.loads(sys.stdin.buffer.read()); print(isinstance(e, ContextOverflowError), e.field, e.code)")
    loaded = subprocess.run([sys.executable, "-c", loads], input=pickle.dumps(raised.value), capture_output=True,
                            check=True)
    assert loaded.stdout.decode().split() == ["True", "messages", "context_length_exceeded"]


def test_call_options_are_sent_as_the_fields_convert_them(chat):
    """The server takes JSON's types strictly; a call's `max_tokens=3.0` is 3, as the constructor makes it."""
    reply = chat.invoke("Hi", max_tokens=3.0, temperature="0")
    assert reply.usage_metadata["output_tokens"] == 3


def test_an_unknown_model_or_unreachable_server_raises_langchains_error_of_that_condition(parrot_server):
    with pytest.raises(ModelNotFoundError, match="gpt-4o") as raised:
        ChatParrot(base_url=parrot_server, model="gpt-4o", max_retries=0).invoke("Hi")
    assert isinstance(raised.value, NotFoundError) and raised.value.field == "model"
    with pytest.raises(ModelConnectionError, match="cannot reach") as raised:
        ChatParrot(base_url="http://127.0.0.1:9", max_retries=0).invoke("Hi")
    assert isinstance(raised.value, ParrotConnectionError) and raised.value.is_retryable


def test_a_wrong_api_key_raises_langchains_authentication_error():
    with LocalServer(EngineSettings(model="tiny"), ServerSettings(port=0, api_key="right")) as server:
        with pytest.raises(ModelAuthenticationError) as raised:
            ChatParrot(base_url=server.base_url, api_key="wrong", max_retries=0).invoke("Hi")
    assert isinstance(raised.value, AuthError) and raised.value.status == 401


def test_async_calls_of_one_event_loop_share_one_connection_pool(parrot_server):
    """At hundreds of concurrent `astream`s a client made per call costs each a TLS context and a connection;
    the calls of one event loop share a client, and another loop (whose connections the first cannot use) gets
    its own."""
    chat = ChatParrot(base_url=parrot_server, max_tokens=2, temperature=0)

    async def clients_of_two_calls() -> list:
        seen = []
        for _ in range(2):
            await chat.ainvoke("Hi")
            async for _ in chat.astream("Hi"):
                pass
            seen.append(await chat._async_client())
        return seen

    first_loop = asyncio.run(clients_of_two_calls())
    second_loop = asyncio.run(clients_of_two_calls())
    assert first_loop[0] is first_loop[1] and second_loop[0] is second_loop[1]
    assert second_loop[0] is not first_loop[0]
