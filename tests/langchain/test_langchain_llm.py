"""ParrotLLM, the LangChain text LLM: invoke, stream, batch and their async forms against the tiny model on
loopback; stop sequences, token usage, callbacks; batches as one graph that shares the prompts' prefix; the
in-process mode; errors. (langchain-tests has no standard suite for text LLMs.)"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from pydantic import ValidationError

from parrot_lc.frontend.errors import InvalidRequestError, NotFoundError, ParrotConnectionError
from parrot_lc.integrations import langchain as langchain_integration
from parrot_lc.integrations.langchain import ChatParrot, ParrotLLM, deferred
from parrot_lc.settings import SettingsError

PROMPT = "The parrot said"
PREFIX = "You are a careful assistant. Summarize the following report in one sentence, keeping the numbers. " * 3


class Recorder(BaseCallbackHandler):
    """Records the LLM callbacks LangChain fires."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.tokens: list[str] = []
        self.ends: list[Any] = []
        self.errors: list[BaseException] = []

    def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
        self.prompts.extend(prompts)

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ends.append(response)

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.errors.append(error)


@pytest.fixture
def llm(parrot_server: str) -> ParrotLLM:
    return ParrotLLM(base_url=parrot_server, max_tokens=6, temperature=0)


def reports(tag: str) -> list[str]:
    """Six prompts sharing a long prefix, ending differently (so that greedy outputs differ)."""
    words = ["apple", "river", "Hello", "quantum", "zebra", "Paris"]
    return [f"{PREFIX}{tag} {i}: {word}" for i, word in enumerate(words)]


def stop_inside(text: str) -> str:
    """A stop sequence that occurs inside the text, not at its start."""
    return re.search(r"[A-Za-z]{3}", text[2:]).group(0)


# ---- one prompt ---------------------------------------------------------------------------------------


def test_invoke_gives_text_with_usage_and_finish_reason(llm):
    result = llm.generate([PROMPT])
    generation = result.generations[0][0]
    assert generation.text and generation.text == llm.invoke(PROMPT)
    assert generation.generation_info["finish_reason"] == "length"
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_yields_the_invoked_text_and_fires_token_callbacks(llm):
    recorder = Recorder()
    chunks = list(llm.stream(PROMPT, config={"callbacks": [recorder]}))
    # How many pieces: as many as the reader takes apart (graph.TextStream joins what waits), so not counted.
    assert "".join(chunks) == llm.invoke(PROMPT)
    assert recorder.prompts == [PROMPT] and "".join(recorder.tokens) == "".join(chunks)
    [end] = recorder.ends
    info = end.generations[0][0].generation_info
    assert info["finish_reason"] == "length" and info["token_usage"]["completion_tokens"] == 6


def test_streaming_field_streams_invoke_through_the_callbacks(parrot_server, llm):
    recorder = Recorder()
    streaming = ParrotLLM(base_url=parrot_server, max_tokens=6, temperature=0, streaming=True)
    result = streaming.generate([PROMPT], callbacks=[recorder])
    text = result.generations[0][0].text
    assert text == llm.invoke(PROMPT) and "".join(recorder.tokens) == text and recorder.tokens
    assert result.llm_output["token_usage"]["completion_tokens"] == 6
    assert result.generations[0][0].generation_info["finish_reason"] == "length"


@pytest.mark.asyncio
async def test_async_invoke_and_stream_match_the_sync_ones(llm):
    expected = llm.invoke(PROMPT)
    assert await llm.ainvoke(PROMPT) == expected
    recorder = Recorder()
    chunks = [chunk async for chunk in llm.astream(PROMPT, config={"callbacks": [recorder]})]
    assert "".join(chunks) == expected and "".join(recorder.tokens) == expected and len(recorder.ends) == 1
    result = await llm.agenerate([PROMPT])
    assert result.llm_output["token_usage"]["completion_tokens"] == 6


def test_stop_sequences_from_the_call_and_the_field(parrot_server):
    sampled = dict(base_url=parrot_server, max_tokens=16, temperature=1.0, seed=3)  # seeded: reproducible
    text = ParrotLLM(**sampled).invoke(PROMPT)
    stop = stop_inside(text)
    expected = text[: text.index(stop)]

    result = ParrotLLM(**sampled).generate([PROMPT], stop=[stop])
    assert result.generations[0][0].text == expected
    assert result.generations[0][0].generation_info["finish_reason"] == "stop"
    with_field = ParrotLLM(**sampled, stop=[stop])
    assert with_field.invoke(PROMPT) == expected
    assert "".join(with_field.stream(PROMPT)) == expected
    assert with_field.batch([PROMPT, PROMPT + "!"])[0] == expected  # the graph path too
    # the call's stop sequences are used together with the field's
    assert ParrotLLM(**sampled, stop=["never generated"]).invoke(PROMPT, stop=[stop]) == expected


# ---- batches: one graph, the common prefix shared ------------------------------------------------------


def test_batch_is_one_graph_that_shares_the_prefix_and_equals_invoking_each(parrot_server, local_server):
    paths: list[str] = []
    hooks = {"event_hooks": {"request": [lambda request: paths.append(f"{request.method} {request.url.path}")]}}
    llm = ParrotLLM(base_url=parrot_server, max_tokens=6, temperature=0, sync_client_kwargs=hooks)
    prompts = reports("Report")
    tokenizer, stats = local_server.manager.tokenizer, local_server.manager.engines[0].engine.stats
    prefix_tokens = len(tokenizer(PREFIX).input_ids)
    prompt_tokens = sum(len(tokenizer(p).input_ids) for p in prompts)

    recorder = Recorder()
    before = stats()
    batched = llm.batch(prompts, config={"callbacks": [recorder]})
    after = stats()

    submits = [p for p in paths if p.endswith("/calls")]
    assert len(submits) == 1 and not any("/v1/completions" in p for p in paths)  # one graph, no per-prompt requests
    assert [p for p in paths if "/api/" in p][-1].startswith("DELETE /api/sessions/")  # the session closed
    assert after.reused_tokens - before.reused_tokens >= 5 * prefix_tokens
    assert after.prefill_tokens - before.prefill_tokens < prompt_tokens - 4 * prefix_tokens  # prefix ~filled once
    assert recorder.prompts == prompts and len(recorder.ends) == len(prompts)

    alone = [llm.invoke(p) for p in prompts]
    assert batched == alone and len(set(alone)) > 1


def test_a_batchs_generations_carry_the_finish_reasons_and_usage_of_invoking_each_prompt(parrot_server):
    """A batch run as a graph gives each generation the `generation_info` that invoking its prompt alone gives
    (finish reason, no log-probabilities, the model), and the token usage of the prompts' completions summed."""
    sampled = ParrotLLM(base_url=parrot_server, max_tokens=16, temperature=1.0, seed=3)
    prompts = ["Hello", PROMPT]
    first, second = (sampled.invoke(prompt) for prompt in prompts)
    # A stop sequence that ends the first prompt's text, not the second's.
    stop = next(first[i:i + 3] for i in range(len(first) - 2) if first[i:i + 3] not in second)
    alone = [sampled.generate([prompt], stop=[stop]) for prompt in prompts]
    infos = [result.generations[0][0].generation_info for result in alone]
    assert [info["finish_reason"] for info in infos] == ["stop", "length"]
    usages = [result.llm_output["token_usage"] for result in alone]
    for batched in (sampled.generate(prompts, stop=[stop]), asyncio.run(sampled.agenerate(prompts, stop=[stop]))):
        assert [generations[0].generation_info for generations in batched.generations] == infos
        usage = batched.llm_output["token_usage"]
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert usage[key] == sum(each[key] for each in usages), key


@pytest.mark.asyncio
async def test_abatch_is_one_graph_that_shares_the_prefix_and_equals_invoking_each(parrot_server, local_server):
    llm = ParrotLLM(base_url=parrot_server, max_tokens=6, temperature=0)
    prompts = reports("Memo")
    stats = local_server.manager.engines[0].engine.stats
    prefix_tokens = len(local_server.manager.tokenizer(PREFIX).input_ids)
    before = stats()
    batched = await llm.abatch(prompts)
    assert stats().reused_tokens - before.reused_tokens >= 5 * prefix_tokens
    alone = await asyncio.gather(*(llm.ainvoke(p) for p in prompts))
    assert batched == list(alone) and len(set(alone)) > 1

def test_extra_body_sampling_fields_reach_a_batch_graph_as_a_single_completion(parrot_server):
    """vLLM's top_k in `extra_body`: top_k=1 at temperature 1 is greedy, alone and in a batch (a graph); a field a
    graph call cannot carry is never dropped: a batch goes as a completion request, whose server refuses a field it
    does not implement, naming it, and a deferred call raises naming it."""
    sampled = dict(base_url=parrot_server, max_tokens=6, temperature=1.0, seed=3)
    prompts = [PROMPT, PROMPT + " loudly"]
    greedy = [ParrotLLM(base_url=parrot_server, max_tokens=6, temperature=0).invoke(p) for p in prompts]
    assert [ParrotLLM(**sampled).invoke(p) for p in prompts] != greedy
    top_1 = ParrotLLM(**sampled, extra_body={"top_k": 1})
    assert top_1.batch(prompts) == [top_1.invoke(p) for p in prompts] == greedy
    for run in (lambda llm: llm.batch(prompts), lambda llm: deferred(llm).invoke(PROMPT)):
        with pytest.raises(InvalidRequestError, match="suffix") as refused:
            run(ParrotLLM(**sampled, extra_body={"suffix": "!"}))
        assert refused.value.field == "suffix"



# ---- in-process mode ----------------------------------------------------------------------------------


def test_in_process_model_needs_no_base_url(monkeypatch):
    monkeypatch.delenv("PARROT_BASE_URL", raising=False)
    llm = ParrotLLM(model="tiny", max_tokens=4, temperature=0)
    result = llm.generate(["Hello"])
    assert result.generations[0][0].text and result.llm_output["token_usage"]["completion_tokens"] == 4
    from parrot_lc.frontend.inprocess import local_server

    shared = local_server("tiny").base_url  # one server per model, shared by every instance
    assert llm.parrot_client().base_url == shared == ChatParrot(model="tiny").parrot_client().base_url
    assert ParrotLLM(model="tiny", max_tokens=4, temperature=0).batch(["Hello", "Hello you"])[0] == llm.invoke("Hello")


@pytest.mark.parametrize("cls", [ParrotLLM, ChatParrot])
def test_an_in_process_server_refused_by_a_parrot_variable_raises_the_settings_error(cls, monkeypatch, tmp_path):
    monkeypatch.setenv("PARROT_API_KEY", "")
    with pytest.raises(SettingsError, match="PARROT_API_KEY"):  # not pydantic's ValidationError, nor wrapped
        cls(model=str(tmp_path / "model"), max_tokens=4).invoke("Hello")


# ---- errors and the wire format -------------------------------------------------------------------------


def test_server_errors_raise_with_the_servers_message(llm):
    too_long = "word " * 9000
    with pytest.raises(InvalidRequestError, match="context is"):
        llm.invoke(too_long)
    with pytest.raises(InvalidRequestError, match="context is"):
        list(llm.stream(too_long))
    with pytest.raises(InvalidRequestError, match="non-empty") as caught:
        llm.invoke(PROMPT, stop=[""])
    assert caught.value.status == 400


def test_the_classes_reach_the_server_only_through_the_frontend():
    """No module of the integration speaks HTTP or imports the server: the frontend is the one client."""
    for path in Path(langchain_integration.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [name for name in imported if name.split(".")[0] in ("httpx", "json")
                    or name.startswith(("parrot_lc.server", "parrot_lc.engine"))], path.name


def test_unreachable_server_raises_a_connection_error():
    with pytest.raises(ParrotConnectionError, match="cannot reach the Parrot server at http://127.0.0.1:9"):
        ParrotLLM(base_url="http://127.0.0.1:9", max_retries=0).invoke(PROMPT)


def test_arguments_and_call_options_it_does_not_take_are_refused_naming_them():
    with pytest.raises(ValidationError, match="tiktoken_model_name"):
        ParrotLLM(base_url="http://127.0.0.1:9", tiktoken_model_name="gpt2")
    llm = ParrotLLM(base_url="http://127.0.0.1:9", max_retries=0)  # refused before any request
    with pytest.raises(ValueError, match=r"\['top_logprobs'\]"):
        llm.invoke(PROMPT, top_logprobs=1)
    with pytest.raises(ValueError, match=r"\['top_logprobs'\]"):
        llm.batch([PROMPT, PROMPT + "!"], top_logprobs=1)  # a batch is one graph


def test_a_model_the_server_does_not_serve_is_refused_alike_invoked_batched_and_deferred(parrot_server):
    # a graph call runs on the served model whatever it names: it must not answer under another model's name
    llm = ParrotLLM(base_url=parrot_server, model="gpt-4o", max_tokens=2)
    served = ParrotLLM(base_url=parrot_server, max_tokens=2)
    for run in (lambda: llm.invoke(PROMPT), lambda: llm.batch([PROMPT, PROMPT + "!"]),
                lambda: asyncio.run(llm.abatch([PROMPT, PROMPT + "!"])),
                lambda: served.batch([PROMPT, PROMPT + "!"], model="gpt-4o"),
                lambda: deferred(llm).invoke(PROMPT)):
        with pytest.raises(NotFoundError, match="gpt-4o") as refused:
            run()
        assert refused.value.field == "model"


@pytest.mark.parametrize("option", [{"temperature": 9}, {"max_tokens": 0}, {"top_p": 0}, {"seed": -1}])
def test_a_call_option_the_field_would_refuse_is_refused_alike_invoked_batched_and_deferred(option):
    # a graph call's own bounds are wider (temperature up to 100): a batch or a deferred run must not take more
    llm = ParrotLLM(base_url="http://127.0.0.1:9", max_retries=0)  # refused before any request
    [name] = option
    for run in (lambda: llm.invoke(PROMPT, **option), lambda: llm.batch([PROMPT, PROMPT + "!"], **option),
                lambda: deferred(llm.bind(**option)).invoke(PROMPT)):
        with pytest.raises(InvalidRequestError, match=name) as refused:
            run()
        assert refused.value.field == name


def test_an_empty_prompt_is_refused_alike_invoked_batched_and_deferred_naming_the_prompt(parrot_server):
    llm = ParrotLLM(base_url=parrot_server, max_tokens=2, temperature=0)
    for run in (lambda: llm.invoke(""), lambda: llm.batch(["", PROMPT]), lambda: deferred(llm).invoke("")):
        with pytest.raises(InvalidRequestError, match="the prompt is empty") as refused:
            run()
        assert refused.value.field == "prompt"


def test_a_prompt_longer_than_the_context_is_refused_alike_invoked_batched_and_deferred(llm):
    """A graph call's prompt is counted when it runs: its failure is raised as the eager request's refusal."""
    too_long = "word " * 9000
    for run in (lambda: llm.invoke(too_long), lambda: llm.batch([PROMPT, too_long]),
                lambda: asyncio.run(llm.abatch([PROMPT, too_long])), lambda: deferred(llm).invoke(too_long)):
        with pytest.raises(InvalidRequestError, match="the model's context is") as refused:
            run()
        assert (refused.value.field, refused.value.code) == ("prompt", "context_length_exceeded")


def test_requests_carry_the_key_and_the_sampling_fields():
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if json.loads(request.content)["prompt"] == "bad":
            return httpx.Response(400, json={"error": {"message": "temperature: too hot", "type": "ValidationError",
                                                       "field": "temperature"}})
        return httpx.Response(200, json={"model": "m", "choices": [{"text": "ok", "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    llm = ParrotLLM(base_url="http://parrot.test/v1/", api_key="k3y", model="m", max_tokens=3, temperature=0.5,
                    top_p=0.9, seed=1, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1,
                    min_p=0.05, stop=["a"], sync_client_kwargs={"transport": httpx.MockTransport(server)})
    assert llm.invoke("p", stop=["b"]) == "ok"
    assert str(seen[0].url) == "http://parrot.test/v1/completions"
    assert seen[0].headers["authorization"] == "Bearer k3y"
    assert json.loads(seen[0].content) == {"prompt": "p", "model": "m", "max_tokens": 3, "temperature": 0.5,
                                           "top_p": 0.9, "seed": 1, "presence_penalty": 0.5,
                                           "frequency_penalty": 0.25, "repetition_penalty": 1.1, "min_p": 0.05,
                                           "stop": ["a", "b"]}
    with pytest.raises(InvalidRequestError, match="too hot") as caught:
        llm.invoke("bad")
    assert (caught.value.status, caught.value.field) == (400, "temperature")


@pytest.mark.asyncio
async def test_event_streams_are_parsed_and_a_cut_stream_raises():
    events = [{"model": "m", "choices": [{"text": "a", "finish_reason": None}]},
              {"model": "m", "choices": [{"text": "", "finish_reason": "stop"}]},
              {"model": "m", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}]
    complete = True

    def server(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream_options"] == {"include_usage": True}
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + ("data: [DONE]\n\n" if complete else "")
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    transport = {"transport": httpx.MockTransport(server)}
    llm = ParrotLLM(base_url="http://parrot.test", streaming=True, sync_client_kwargs=transport,
                    async_client_kwargs=transport)
    assert list(llm.stream("p")) == ["a", ""]
    assert [chunk async for chunk in llm.astream("p")] == ["a", ""]
    result = llm.generate(["p"])
    assert result.llm_output["token_usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    assert result.generations[0][0].generation_info == {"finish_reason": "stop", "logprobs": None, "model_name": "m"}
    complete = False
    with pytest.raises(ParrotConnectionError, match="ended before"):
        llm.invoke("p")
    with pytest.raises(ParrotConnectionError, match="ended before"):
        await llm.ainvoke("p")
