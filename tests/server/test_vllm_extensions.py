"""vLLM's extension fields of the OpenAI-compatible routes, sent as vLLM's docs show (the `openai` package's
`extra_body`): those the engine implements change the output as in vLLM (guided decoding, min_tokens,
stop_token_ids); those it does not are refused naming the field unless their value asks for nothing, never
silently ignored."""

import json
import re

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from conftest import assert_refused
from parrot_lc.engine.loader import TINY_DIR

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["s", "m", "l"]}},
          "required": ["ok", "size"]}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Answer"}], "max_tokens": 100}


@pytest.fixture
def oai(parrot_server):
    return openai.OpenAI(base_url=f"{parrot_server}/v1", api_key="unused", max_retries=0)


def chat_text(oai, **extra_body) -> str:
    return oai.chat.completions.create(**CHAT, seed=1, extra_body=extra_body).choices[0].message.content


def test_guided_json_answers_json_valid_for_the_schema(oai):
    response = oai.chat.completions.create(**CHAT, seed=0, n=2, extra_body={"guided_json": SCHEMA})
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_guided_json_takes_the_schema_as_json_text_on_completions_too(oai):
    response = oai.completions.create(model="tiny", prompt="JSON:", max_tokens=100, seed=1,
                                      extra_body={"guided_json": json.dumps(SCHEMA)})
    jsonschema.validate(json.loads(response.choices[0].text), SCHEMA)


def test_guided_choice_answers_one_of_the_choices(oai):
    assert chat_text(oai, guided_choice=["red", "green", "blue"]) in ("red", "green", "blue")


def test_guided_regex_answers_a_match(oai):
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", chat_text(oai, guided_regex=r"[0-9]{3}-[a-z]{2}"))


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
      "guided_json": SCHEMA}, "guided_json"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
])
def test_two_constraints_at_once_get_400_naming_the_second(oai, body, field):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(**CHAT, extra_body=body)
    assert refused.value.param == field
    assert_refused(refused.value.response, 400, field)


@pytest.mark.parametrize("field, value", [
    ("guided_regex", "(unclosed"), ("guided_json", "{not json"), ("guided_json", "[1]"),
    ("guided_json", {"type": "objekt"}), ("guided_choice", []),
])
def test_a_guided_field_that_is_no_grammar_gets_400_naming_it(oai, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={field: value})
    assert_refused(refused.value.response, 400, field)


@pytest.mark.parametrize("field, value", [
    ("guided_grammar", "root ::= \"a\""), ("guided_decoding_backend", "outlines"), ("guided_whitespace_pattern", " "),
    ("use_beam_search", True), ("length_penalty", 0.5), ("prompt_logprobs", 1), ("truncate_prompt_tokens", 8),
    ("allowed_token_ids", [5, 6]), ("bad_words", ["the"]), ("skip_special_tokens", False),
    ("include_stop_str_in_output", True), ("chat_template", "{{ messages }}"),
    ("chat_template_kwargs", {"enable_thinking": False}), ("add_generation_prompt", False),
    ("continue_final_message", True), ("best_of", 2),
])
def test_a_vllm_field_that_the_server_does_not_implement_gets_400_naming_it(oai, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(**CHAT, extra_body={field: value})
    assert_refused(refused.value.response, 400, field)


def test_a_completion_refuses_them_too(oai):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"use_beam_search": True})
    assert_refused(refused.value.response, 400, "use_beam_search")


def test_vllm_fields_with_their_neutral_values_and_harmless_ones_are_accepted(oai):
    neutral = {"guided_decoding_backend": None, "guided_grammar": None, "use_beam_search": False,
               "length_penalty": 1.0, "best_of": 1, "skip_special_tokens": True,
               "spaces_between_special_tokens": True, "include_stop_str_in_output": False, "chat_template": None,
               "chat_template_kwargs": {}, "add_generation_prompt": True, "continue_final_message": False,
               "min_tokens": 0, "guided_json": None, "priority": 0, "request_id": "r-1"}
    response = oai.chat.completions.create(**{**CHAT, "max_tokens": 3}, temperature=0.0, extra_body=neutral)
    plain = oai.chat.completions.create(**{**CHAT, "max_tokens": 3}, temperature=0.0)
    assert response.choices[0].message.content == plain.choices[0].message.content


def greedy_completion(oai, max_tokens=6, **extra_body):
    return oai.completions.create(model="tiny", prompt="def main(self): return", max_tokens=max_tokens,
                                  temperature=0.0, extra_body={"ignore_eos": True, **extra_body}).choices[0]


def test_min_tokens_holds_off_stop_strings_until_that_many_tokens(oai):
    text = greedy_completion(oai).text
    stopped = greedy_completion(oai, stop=[text[1:4]])
    held = greedy_completion(oai, stop=[text[1:4]], min_tokens=6)
    assert (stopped.text, stopped.finish_reason) == (text[:1], "stop")
    assert (held.text, held.finish_reason) == (text, "length")


def test_stop_token_ids_end_the_output_without_their_text(oai):
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    first = greedy_completion(oai, max_tokens=1).text
    (stop,) = tokenizer(first, add_special_tokens=False).input_ids
    choice = greedy_completion(oai, ignore_eos=False, stop_token_ids=[stop])
    assert (choice.text, choice.finish_reason) == ("", "stop")


@pytest.mark.parametrize("body", [{"min_tokens": 7}, {"min_tokens": 2, "guided_regex": "a+"}])
def test_min_tokens_past_max_tokens_or_with_a_constraint_gets_400_naming_it(oai, body):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model="tiny", prompt="x", max_tokens=6, extra_body=body)
    assert_refused(refused.value.response, 400, "min_tokens")
