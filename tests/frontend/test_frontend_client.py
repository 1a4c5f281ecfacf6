"""The frontend end to end: semantic functions and variables, completions and chat replies, through ParrotClient /
AsyncParrotClient, against a real server (uvicorn on a loopback port, the `tiny` model), compared with the
OpenAI-compatible endpoint."""

import asyncio
import re

import httpx
import pytest

from parrot_lc.frontend import (
    AsyncParrotClient,
    AuthError,
    CallFailedError,
    GraphError,
    InvalidRequestError,
    NotFoundError,
    Output,
    ParrotClient,
    ParrotConnectionError,
    ParrotError,
    SemanticFunction,
    ServerFailure,
    VariableTimeoutError,
    semantic_function,
)
from parrot_lc.settings import EngineSettings, ServerSettings

GREEDY = {"max_tokens": 6, "temperature": 0.0}
MAP_PREFIX = "Summarize the following part of a long report in one short sentence, keeping its key facts. Part: "

answer = SemanticFunction.from_template("Question: {{input:question}}\nAnswer:{{output:answer}}", **GREEDY)
summarize = SemanticFunction.from_template(MAP_PREFIX + "{{input:part}}\nSummary:{{output:summary}}", **GREEDY)
combine = SemanticFunction.from_template(
    "Combine these summaries into one:\n" + "".join(f"{{{{input:s{i}}}}}\n" for i in range(8)) + "{{output:all}}",
    **GREEDY,
)


@semantic_function(**GREEDY)
def continue_story(story: str, more: Output):
    """Continue the story: {{input:story}}{{output:more}}"""


@semantic_function(temperature=0.0)
def title_and_line(topic: str, title: Output(max_tokens=4), line: Output(max_tokens=6)):
    """Topic: {{input:topic}}
    Title:{{output:title}}
    First line:{{output:line}}"""


@pytest.fixture
def sent() -> list[tuple[str, str]]:
    """(method, path) of every request the client sends."""
    return []


@pytest.fixture
def client(parrot_server, sent):
    hooks = {"request": [lambda request: sent.append((request.method, request.url.path))]}
    with ParrotClient(parrot_server, timeout=60, event_hooks=hooks) as client:
        yield client


def complete(base_url: str, prompt: str, max_tokens: int = GREEDY["max_tokens"]) -> str:
    """What the OpenAI-compatible endpoint generates for the prompt, greedily."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_a_call_returns_what_the_engine_generates_for_the_rendered_prompt(client, parrot_server):
    with client.session():
        value = answer(question="What do parrots eat?").get()
    assert value == complete(parrot_server, "Question: What do parrots eat?\nAnswer:")


def test_a_chain_of_4_calls_is_one_submission_and_one_fetch(client, sent, parrot_server):
    with client.session() as session:
        with session.graph():
            part = "Once upon a time"
            for _ in range(4):
                part = continue_story(part)
        value = part.get()
        assert session.status()["calls"]["done"] == 4
    assert [p for m, p in sent if p.endswith("/calls")] == [f"/api/sessions/{session.session_id}/calls"]
    assert [m for m, p in sent if "/variables/" in p] == ["GET"]  # one fetch: the middle values stay on the server
    text = "Once upon a time"
    for _ in range(4):
        text = complete(parrot_server, "Continue the story: " + text)
    assert value == text


def test_map_reduce_of_8_calls_and_a_reduce_is_one_request(client, sent, parrot_server):
    parts = [f"Section {i} reports that sales in region {i} grew by {i * 3} percent." for i in range(8)]
    with client.session() as session:
        with session.graph():
            final = combine(*[summarize(p) for p in parts])
        assert sum(p.endswith("/calls") for _, p in sent) == 1
        value = final.get()
    summaries = [complete(parrot_server, MAP_PREFIX + p + "\nSummary:") for p in parts]
    assert value == complete(parrot_server, "Combine these summaries into one:\n" + "".join(s + "\n" for s in summaries))


def test_sync_and_async_clients_give_the_same_results(client, parrot_server):
    with client.session() as session:
        with session.graph():
            title, line = title_and_line("parrots")
            story = continue_story(line)
        expected = (title.get(), line.get(), story.get())

    async def run() -> tuple[str, ...]:
        async with AsyncParrotClient(parrot_server, timeout=60) as aclient, aclient.session():
            title, line = title_and_line("parrots")  # no graph block: submitted by a task, as one request
            story = continue_story(line)
            return tuple(await asyncio.gather(title.aget("throughput"), line.aget(), story.aget()))

    assert asyncio.run(run()) == expected
    assert expected[2] == complete(parrot_server, "Continue the story: " + expected[1])


def test_a_fetched_output_tells_how_its_call_generated_it_as_a_completion_choice_does(client, parrot_server):
    """Its finish reason, stop reason and token usage, as the choice of the same prompt's completion tells them; a
    value the client set tells none."""
    prompt, sampled = "Question: What do parrots eat?\nAnswer:", {"max_tokens": 16, "temperature": 1.0, "seed": 3}

    def completion(**fields) -> dict:
        body = {"model": "tiny", "prompt": prompt, **sampled, **fields}
        return httpx.post(f"{parrot_server}/v1/completions", json=body, timeout=60).json()

    text = completion()["choices"][0]["text"]
    stop = re.search(r"[A-Za-z]{3}", text[2:]).group(0)  # inside the text: it ends there
    cases = [{"stop": [stop]}, {"max_tokens": 4}]
    asks = [SemanticFunction.from_template("Question: {{input:question}}\nAnswer:{{output:answer}}",
                                           **{**sampled, **case}) for case in cases]
    with client.session() as session:
        question = session.variable(value="What do parrots eat?")
        with session.graph():
            outputs = [ask(question) for ask in asks]
        session.get_values(outputs)
    for output, case in zip(outputs, cases):
        reply = completion(**case)
        [choice] = reply["choices"]
        assert (output.value, output.finish_reason, output.stop_reason) == (
            choice["text"], choice["finish_reason"], choice["stop_reason"])
        usage = {key: reply["usage"][key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
        assert {key: output.usage[key] for key in usage} == usage
    assert [output.finish_reason for output in outputs] == ["stop", "length"]
    assert (question.finish_reason, question.stop_reason, question.usage) == (None, None, None)


def test_a_failed_producing_call_raises_call_failed_error_with_the_servers_message(client):
    with client.session():
        first = answer("word " * 9000)  # longer than the model's context
        second = continue_story(first)
        with pytest.raises(CallFailedError, match="model's context") as info:
            first.get(timeout=30)
        assert (info.value.status, info.value.code) == (424, "context_length_exceeded")
        with pytest.raises(CallFailedError, match="failed") as info:
            second.get(timeout=30)
        assert info.value.code == "context_length_exceeded"  # its input's failure's


def test_a_fetch_past_its_timeout_raises_variable_timeout_error(client):
    with client.session() as session:
        out = answer(session.variable("never set"))
        with pytest.raises(VariableTimeoutError, match="no value after 0.2 s") as info:
            out.get(timeout=0.2)
        assert isinstance(info.value, TimeoutError)


def map_reduce_expected(base_url: str, parts: list[str]) -> str:
    summaries = [complete(base_url, MAP_PREFIX + p + "\nSummary:") for p in parts]
    return complete(base_url, "Combine these summaries into one:\n" + "".join(s + "\n" for s in summaries))


def test_a_graph_larger_than_the_sessions_call_limit_is_submitted_in_parts(client, sent, parrot_server,
                                                                           call_limit_of_4):
    parts = [f"Section {i} reports that sales in region {i} grew by {i * 3} percent." for i in range(8)]
    with client.session() as session:
        with session.graph():
            final = combine(*[summarize(p) for p in parts])  # 9 calls
        value = final.get()
        assert session.status()["calls"]["done"] == 9
    assert sum(m == "POST" and p.endswith("/calls") for m, p in sent) >= 3  # at most 4 calls a part
    assert value == map_reduce_expected(parrot_server, parts)


def test_an_async_graph_larger_than_the_sessions_call_limit_is_submitted_in_parts(parrot_server, call_limit_of_4):
    parts = [f"Part {i}: the parrot population grew by {i} birds." for i in range(8)]

    async def run() -> str:
        async with AsyncParrotClient(parrot_server, timeout=60) as aclient, aclient.session() as session:
            async with session.graph():
                final = combine(*[summarize(p) for p in parts])
            return await final.aget()

    assert asyncio.run(run()) == map_reduce_expected(parrot_server, parts)


def test_a_graph_whose_submission_in_parts_is_cancelled_fails_its_unsubmitted_calls(parrot_server, call_limit_of_4):
    async def run() -> None:
        async with AsyncParrotClient(parrot_server, timeout=60) as aclient, aclient.session() as session:
            held = session.variable("held")  # never set: the first part's calls never end, so no room comes
            made: dict[str, list] = {}

            async def submit() -> None:
                async with session.graph():
                    made["first"] = [summarize(held) for _ in range(4)]
                    made["later"] = [summarize(f"Part {i}.") for i in range(4)]

            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(submit(), 1.0)  # cancels the wait for room
            for value in made["later"]:  # not submitted: they fail at once rather than wait forever
                with pytest.raises(ParrotError, match="submission stopped"):
                    await asyncio.wait_for(value.aget(), 5)
            assert all(value._producer.call_id is not None for value in made["first"])

    asyncio.run(run())


def test_a_graph_makes_all_its_variables_in_one_request(client, sent):
    with client.session() as session:
        with session.graph():
            summaries = [summarize(f"Part {i} of the report.") for i in range(6)]
        [value.get() for value in summaries]
    made = [p for m, p in sent if m == "POST" and "variables" in p]
    assert made == [f"/api/sessions/{session.session_id}/variables:batchCreate"]  # 6 inputs and 6 outputs


def test_a_graph_whose_inputs_together_pass_the_body_limit_still_runs():
    """Its variables are made in one request while they fit the server's limit on a body; past it, one each."""
    from parrot_lc.server.local import LocalServer

    engine = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
    with LocalServer(engine, ServerSettings(port=0, max_request_bytes=32 * 1024)) as server:
        with ParrotClient(server.base_url, timeout=60) as client, client.session() as session:
            with session.graph():
                parts = [summarize(f"Part {i}: " + "sales grew. " * 800) for i in range(4)]  # about 9.6 KB each
            assert all(isinstance(p.get(), str) for p in parts)


def test_unknown_sessions_and_variables_raise_not_found(client):
    with pytest.raises(NotFoundError, match="unknown session"):
        client.session("no-such-session", "some-token").status()
    with client.session() as session:
        with pytest.raises(NotFoundError, match="unknown variable"):
            session.variable(var_id="no-such-variable").get(timeout=1)


def test_a_wrong_session_token_raises_auth_error(client):
    with client.session() as session:
        with pytest.raises(AuthError) as info:
            client.session(session.session_id, "not-its-token").status()
        assert info.value.status == 403 and info.value.field == "session_token"


def test_a_graph_the_server_rejects_raises_graph_error(client):
    with client.session() as session:
        produced = answer("Who?")
        again = session.variable(var_id=produced.var_id)  # a second handle: this client cannot tell
        with pytest.raises(GraphError, match="produced twice") as info:
            answer("Why?", answer=again)
        assert info.value.status == 422
        with pytest.raises(GraphError):  # the call was never submitted: its output says so
            again.get()


# ---- completions and chat replies: the OpenAI-compatible API ------------------------------------------------


def test_completions_and_chat_replies_whole_and_streamed_sync_and_async(client, parrot_server):
    prompt, messages = "Question: What do parrots eat?\nAnswer:", [{"role": "user", "content": "Hi"}]
    whole = client.complete(prompt, **GREEDY)
    assert whole.text == complete(parrot_server, prompt) and whole.model == "tiny"
    assert whole.finish_reason == "length" and whole.usage["completion_tokens"] == 6
    pieces = list(client.stream_complete(prompt, **GREEDY))
    counted = ("prompt_tokens", "completion_tokens", "total_tokens")  # not cached_tokens: the prompt is cached now
    assert "".join(p.text for p in pieces) == whole.text
    assert [pieces[-1].usage[k] for k in counted] == [whole.usage[k] for k in counted]
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["length"]
    reply = client.chat(messages, **GREEDY)
    assert reply.text and reply.usage["completion_tokens"] == 6
    assert "".join(p.text for p in client.stream_chat(messages, **GREEDY)) == reply.text

    async def run() -> tuple[str, ...]:
        async with AsyncParrotClient(parrot_server, timeout=60) as aclient:
            completed, replied = await asyncio.gather(aclient.complete(prompt, **GREEDY),
                                                      aclient.chat(messages, **GREEDY))
            streamed = [p.text async for p in aclient.stream_complete(prompt, **GREEDY)]
            return completed.text, replied.text, "".join(streamed)

    assert asyncio.run(run()) == (whole.text, reply.text, whole.text)


def test_a_replys_usage_counts_the_prompt_tokens_whose_kv_the_server_had(client):
    messages = [{"role": "system", "content": "You answer questions about parrots, briefly. " * 4},
                {"role": "user", "content": "Hi"}]
    first = client.chat(messages, **GREEDY).usage
    again = [p.usage for p in client.stream_chat(messages, **GREEDY)][-1]
    assert 16 <= again["cached_tokens"] < again["prompt_tokens"] == first["prompt_tokens"]


def test_a_value_the_schema_refuses_is_an_invalid_request_error_naming_the_field(client):
    with pytest.raises(InvalidRequestError) as info:
        client.complete("Hi", temperature=5)
    assert (info.value.status, info.value.type, info.value.field) == (400, "ValidationError", "temperature")


def test_completion_errors_are_typed_whole_streamed_or_unreachable(client):
    with pytest.raises(InvalidRequestError, match="non-empty") as info:
        client.complete("Hi", stop=[""])
    assert info.value.status == 400
    with pytest.raises(InvalidRequestError, match="context is"):
        list(client.stream_chat([{"role": "user", "content": "word " * 9000}]))
    with pytest.raises(ParrotConnectionError, match="cannot reach the Parrot server at http://127.0.0.1:9"):
        ParrotClient("http://127.0.0.1:9/v1", max_retries=0).complete("Hi")
    failing = httpx.MockTransport(lambda request: httpx.Response(503, json={"error": {"message": "draining"}}))
    with pytest.raises(ServerFailure, match="draining"):
        ParrotClient("http://parrot.test", transport=failing).complete("Hi")


def test_the_served_models_tokenizer_sync_and_async(client, local_server):
    tokenizer = local_server.manager.tokenizer
    text, messages = "The parrot said hello.", [{"role": "user", "content": "Hi"}]
    assert client.tokenize(text) == tokenizer(text).input_ids
    assert client.tokenize(text, add_special_tokens=False) == tokenizer(text, add_special_tokens=False).input_ids
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rendered = client.tokenize(messages=messages, add_special_tokens=False)
    assert client.detokenize(rendered) == chat
    assert len(client.tokenize(messages=messages)) == client.chat(messages, **GREEDY).usage["prompt_tokens"]
    with pytest.raises(TypeError, match="a prompt or messages"):
        client.tokenize()

    async def run() -> tuple[list[int], str]:
        async with AsyncParrotClient(client.base_url, timeout=60) as aclient:
            return await aclient.tokenize(text), await aclient.detokenize(rendered)

    assert asyncio.run(run()) == (tokenizer(text).input_ids, chat)
