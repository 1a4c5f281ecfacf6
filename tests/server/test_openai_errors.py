"""What an OpenAI client reads of a request the server refuses: a 4xx in the documented shape, whose `type` names
the client's fault, never the server's, and whose `param` and `code` the `openai` package's exceptions carry."""

import openai
import pytest

from conftest import ERROR_KEYS, assert_refused, hide_kv_capacity
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def oai(parrot_server):
    return openai.OpenAI(base_url=f"{parrot_server}/v1", api_key="unused", max_retries=0)


def test_a_prompt_longer_than_the_context_is_a_bad_request_naming_the_messages(client):
    response = client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hello " * 9000}], "max_tokens": 1})
    assert assert_refused(response, 400, "messages")["type"] == "BadRequestError"


def test_an_empty_list_of_prompts_is_a_bad_request_naming_the_prompt(client):
    response = client.post("/v1/completions", json={"prompt": [], "max_tokens": 1})
    assert assert_refused(response, 400, "prompt")["type"] == "BadRequestError"


@pytest.mark.parametrize("route, body, field", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [1.5]}, "prompt"),
])
def test_a_value_of_no_type_that_a_field_takes_names_the_field_not_a_type(client, route, body, field):
    """pydantic's location of such an error holds the member of the field's union it tried ("stop.str")."""
    error = assert_refused(client.post(route, json={"max_tokens": 1, **body}), 400, field)
    assert error["message"].startswith(f"{field}: ")


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": HI, "n": True}, "n"),
    ("/v1/chat/completions", {"messages": HI, "temperature": False}, "temperature"),
    ("/v1/chat/completions", {"messages": HI, "seed": True}, "seed"),
])
def test_a_boolean_where_a_number_goes_is_refused_naming_the_field(client, route, body, field):
    """As OpenAI refuses it: `max_tokens: true` is no request for 1 token."""
    assert assert_refused(client.post(route, json={"max_tokens": 1, **body}), 400, field)["code"] in ("int_type",
                                                                                                      "float_type")


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "Hi", "echo": 1}, "echo"),
    ("/v1/chat/completions", {"messages": HI, "ignore_eos": "true"}, "ignore_eos"),
    ("/v1/chat/completions", {"messages": HI, "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
])
def test_a_value_that_is_no_boolean_where_a_boolean_goes_is_refused_naming_the_field(client, route, body, field):
    assert assert_refused(client.post(route, json={"max_tokens": 1, **body}), 400, field)["code"] == "bool_type"


def test_an_integer_is_taken_where_a_number_goes(oai):
    reply = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=1, temperature=0, top_p=1)
    assert reply.usage.completion_tokens == 1


def test_an_empty_list_of_tools_is_refused_naming_it_as_openai_refuses_it(client):
    body = {"model": "tiny", "messages": HI, "max_tokens": 1, "tools": []}
    assert assert_refused(client.post("/v1/chat/completions", json=body), 400, "tools")["code"] == "too_short"


def test_a_tool_message_without_the_id_of_the_call_it_answers_is_refused_naming_it(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "content": "42"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 1}
    assert_refused(client.post("/v1/chat/completions", json=body), 400, "messages.2.tool_call_id")


def test_a_user_message_of_no_content_parts_is_refused_naming_its_content(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": []}], "max_tokens": 1}
    assert_refused(client.post("/v1/chat/completions", json=body), 400, "messages.0.content")


def test_a_refused_value_reaches_the_openai_exception_as_its_param_and_code(oai):
    """`param` is the field, `code` the kind of fault (pydantic's error type for a value out of its range)."""
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="tiny", messages=HI, max_tokens=0)
    assert (refused.value.param, refused.value.code) == ("max_tokens", "greater_than_equal")
    assert refused.value.body["field"] == "max_tokens"  # kept for the clients that read ours


def test_a_value_out_of_range_raises_openais_bad_request_error_naming_the_param(oai):
    """OpenAI's API, vLLM and SGLang answer a request that fails validation with 400: code written for them catches
    `openai.BadRequestError` (a 422 would raise UnprocessableEntityError)."""
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="tiny", messages=HI, max_tokens=1, temperature=5)
    assert refused.value.status_code == 400 and refused.value.param == "temperature"


def test_a_part_the_server_does_not_implement_is_named_by_param_with_code_not_supported(oai):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [image]}], max_tokens=1)
    assert (refused.value.param, refused.value.code) == ("messages.0.content.0.type", "not_supported")


@pytest.mark.parametrize("messages, max_tokens, param", [
    ([{"role": "user", "content": "hello " * 9000}], 1, "messages"),
    (HI, 8190, "max_tokens"),
])
def test_a_request_that_does_not_fit_the_context_has_openais_context_length_exceeded_code(oai, messages, max_tokens,
                                                                                          param):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens)
    assert (refused.value.param, refused.value.code) == (param, "context_length_exceeded")


def test_a_prompt_longer_than_the_context_says_so_as_chatopenai_recognises_it(oai):
    """LangChain's ChatOpenAI raises its context-overflow error (which LangChain's agents act on) for a 400 whose
    message holds "prompt is too long", one of the phrases it looks for."""
    with pytest.raises(openai.BadRequestError, match="prompt is too long"):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello " * 9000}],
                                    max_tokens=1)


def test_an_unknown_model_has_openais_model_not_found_code(oai):
    with pytest.raises(openai.NotFoundError) as refused:
        oai.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1)
    assert (refused.value.param, refused.value.code) == ("model", "model_not_found")


def test_an_error_without_a_code_of_its_own_has_a_null_code(client):
    """An unknown route: Starlette's 404, naming the path."""
    assert assert_refused(client.get("/v1/nowhere"), 404, "path")["code"] is None


def test_the_error_event_that_ends_a_failed_stream_has_the_shape_of_every_error():
    """A call that fails once its stream has begun (the status, 200, is sent): here a prompt that the KV cache
    cannot hold, of an engine that keeps its cache's size to itself (else the request is refused before)."""
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=128 * 2**10)
    with LocalServer(settings) as server:
        hide_kv_capacity(server.manager)
        oai = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        stream = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 600}],
                                             max_tokens=4, stream=True)
        with pytest.raises(openai.APIError, match="KV cache holds") as failed:
            list(stream)
    assert set(failed.value.body) == ERROR_KEYS and failed.value.body["type"] == "BadRequestError"
    assert failed.value.param is None and failed.value.code == "context_length_exceeded"  # what clients act on
