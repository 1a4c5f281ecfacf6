"""What an OpenAI client reads of a request the server refuses: a 4xx in the documented shape, whose `type` names
the client's fault, never the server's."""

import pytest

from conftest import assert_refused


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
    error = assert_refused(client.post(route, json={"max_tokens": 1, **body}), 422, field)
    assert error["message"].startswith(f"{field}: ")
