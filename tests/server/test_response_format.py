"""Structured output over HTTP: OpenAI's `response_format` (json_object, json_schema) on /v1/chat/completions and
/v1/completions through the `openai` package, and the Parrot API's sampling `constraint` on a call's output
(a Semantic Variable held to a regex, a choice or a schema); a bad one is a 400 naming its part."""

import asyncio
import dataclasses
import json
import re

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from conftest import assert_refused
from parrot_lc.engine import Constraint, EngineStats, RequestOutput, SamplingParams
from parrot_lc.engine.loader import TINY_DIR
from parrot_lc.frontend import Output, ParrotClient, semantic_function
from parrot_lc.server.executor import attempt_sampling
from parrot_lc.server.graph import Call
from parrot_lc.server.remote_engine import RemoteEngine

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7},
                            "maxItems": 2}},
    "required": ["city", "unit", "days"],
}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "The weather, as JSON"}], "max_tokens": 200}


@pytest.fixture
def oai(parrot_server):
    return openai.OpenAI(base_url=f"{parrot_server}/v1", api_key="unused", max_retries=0)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}


def test_a_chat_with_a_json_schema_response_format_answers_valid_json(oai):
    response = oai.chat.completions.create(**CHAT, temperature=1.0, seed=3, n=2,
                                           response_format=json_schema_format(WEATHER))
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), WEATHER)


def test_a_streamed_chat_with_a_json_object_response_format_joins_to_an_object(oai):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    chunks = oai.chat.completions.create(**CHAT, temperature=1.0, seed=1, stream=True,
                                         response_format=json_schema_format(schema))
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) in (
        {"ok": True}, {"ok": False})


def test_json_object_mode_answers_an_object(oai):
    # A seed with which the random weights close the object within max_tokens (most wander inside strings).
    response = oai.chat.completions.create(**CHAT, temperature=1.0, seed=6, response_format={"type": "json_object"})
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_a_completion_with_a_response_format_answers_valid_json(oai):
    response = oai.completions.create(model="tiny", prompt="Weather:", max_tokens=200, temperature=1.0, seed=5,
                                      extra_body={"response_format": json_schema_format(WEATHER)})
    jsonschema.validate(json.loads(response.choices[0].text), WEATHER)


def test_a_text_response_format_is_plain_sampling(oai):
    kwargs = dict(model="tiny", messages=CHAT["messages"], max_tokens=6, temperature=0.0)
    plain = oai.chat.completions.create(**kwargs).choices[0].message.content
    assert oai.chat.completions.create(**kwargs, response_format={"type": "text"}).choices[0].message.content == plain


@pytest.mark.parametrize("response_format, field", [
    ({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "objekt"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "w", "schema": {"properties": 3}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "w"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "xml"}, "response_format.type"),
])
def test_a_bad_response_format_gets_400_naming_its_part(oai, response_format, field):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(**CHAT, extra_body={"response_format": response_format})
    assert_refused(refused.value.response, 400, field)


def test_a_completion_with_a_bad_schema_gets_400_too(oai):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model="tiny", prompt="x", max_tokens=2,
                               extra_body={"response_format": json_schema_format({"type": "objekt"})})
    assert_refused(refused.value.response, 400, "response_format.json_schema.schema")


class Session:
    """The raw Parrot API: one session, calls of one template each."""

    def __init__(self, client) -> None:
        body = client.post("/api/sessions").json()
        self.client, self.id, self.headers = client, body["session_id"], {"X-Session-Token": body["session_token"]}

    def submit(self, template: list[dict]):
        return self.client.post(f"/api/sessions/{self.id}/calls", json={"calls": [{"template": template}]},
                                headers=self.headers)

    def value(self, var_id: str) -> str:
        response = self.client.get(f"/api/sessions/{self.id}/variables/{var_id}", params={"timeout": 60},
                                   headers=self.headers)
        return response.json()["value"]

    def output(self, prompt: str, constraint: dict) -> str:
        var_id = self.client.post(f"/api/sessions/{self.id}/variables", json={}, headers=self.headers).json()["var_id"]
        sampling = {"max_tokens": 120, "temperature": 1.0, "seed": 2, "constraint": constraint}
        assert self.submit([{"text": prompt}, {"output": var_id, "sampling": sampling}]).status_code == 201
        return self.value(var_id)


@pytest.mark.parametrize("constraint, matches", [
    ({"regex": r"[A-Z][a-z]{2,8}, [0-9]{4}"}, lambda text: re.fullmatch(r"[A-Z][a-z]{2,8}, [0-9]{4}", text)),
    ({"choice": ["approve", "reject"]}, lambda text: text in ("approve", "reject")),
    ({"json_schema": WEATHER}, lambda text: jsonschema.validate(json.loads(text), WEATHER) is None),
])
def test_a_semantic_variable_is_constrained_by_its_outputs_sampling(client, constraint, matches):
    assert matches(Session(client).output("The answer:", constraint))


@pytest.mark.parametrize("constraint, field", [
    ({"regex": "(unclosed"}, "constraint.regex"),
    ({"choice": []}, "constraint.choice"),
    ({"json_schema": {"type": "objekt"}}, "constraint.json_schema"),
    ({"regex": "a", "choice": ["a"]}, "constraint"),
    ({}, "constraint"),
])
def test_a_bad_sampling_constraint_gets_400_naming_it(client, constraint, field):
    session = Session(client)
    var_id = client.post(f"/api/sessions/{session.id}/variables", json={}, headers=session.headers).json()["var_id"]
    response = session.submit([{"text": "x"}, {"output": var_id, "sampling": {"constraint": constraint}}])
    assert_refused(response, 400, f"calls.0.template.1.sampling.{field}")


TRUE_OR_FALSE = {"choice": ["true", "false"]}


@semantic_function(temperature=1.0, seed=4)
def verdict(claim: str, answer: Output(max_tokens=8, constraint=TRUE_OR_FALSE)):
    """Claim: {{input:claim}}
    True or false? {{output:answer}}"""


def test_the_frontend_passes_an_outputs_constraint_through(parrot_server):
    with ParrotClient(parrot_server, timeout=60) as client, client.session():
        assert verdict(claim="Parrots can talk.").get() in ("true", "false")


def test_a_resumed_constrained_output_asks_its_grammar_to_take_the_tokens_generated_before():
    call = Call("c1", "s1", [])
    call.progress.took([], RequestOutput(0, "ctx", [11, 12], "ab"), lambda ids: "")
    sampling = SamplingParams(max_tokens=20, constraint=Constraint("regex", "[a-z]+"))
    assert attempt_sampling(sampling, call) == dataclasses.replace(sampling, max_tokens=18, constraint_prefix=(11, 12))
    plain = SamplingParams(max_tokens=20)
    assert attempt_sampling(plain, call).constraint_prefix == ()


def test_a_constraint_reaches_an_engine_in_another_process_with_its_tokens_before(engine_app_urls):
    """The manager sends an engine behind HTTP (`parrot-lc engine`) the constraint in the sampling's wire form."""
    [url] = engine_app_urls("key", 1)
    engine = RemoteEngine(url, EngineStats(*[0] * 10), authorization="Bearer key")
    before = AutoTokenizer.from_pretrained(str(TINY_DIR))("ab", add_special_tokens=False).input_ids
    sampling = SamplingParams(max_tokens=20, seed=1, constraint=Constraint("regex", "[a-z]{3}-[0-9]{2}"),
                              constraint_prefix=tuple(before))

    async def generate() -> str:
        try:
            return "".join([e.text async for e in engine.generate(sampling, "c", token_ids=[5, 6, 7, *before])])
        finally:
            engine.close()

    assert re.fullmatch("[a-z]{3}-[0-9]{2}", "ab" + asyncio.run(generate()))
