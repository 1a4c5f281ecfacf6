"""vLLM's `stop_reason` on every choice of /v1/completions and /v1/chat/completions, next to `finish_reason`: the
stop string that ended the choice, or the token of `stop_token_ids` that did, or null (EOS, length). Whole, and
streamed on each choice's last chunk (null on the others); through the `openai` package, which keeps the field.
It comes from engines behind HTTP and from OpenAI-compatible engines too."""

import asyncio

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from parrot_lc.engine import Constraint, EngineStats, RequestOutput, SamplingParams
from parrot_lc.engine.loader import TINY_DIR
from parrot_lc.server.local import LocalServer
from parrot_lc.server.remote_engine import RemoteEngine
from parrot_lc.settings import EngineSettings, ServerSettings

ROUTES = ["completions", "chat"]
SAID = "alpha beta gamma"  # the only reply that `guided_choice: [SAID]` allows


@pytest.fixture
def oai(parrot_server):
    return openai.OpenAI(base_url=f"{parrot_server}/v1", api_key="unused", max_retries=0)


def create(oai, route: str, prompts: list[str], **fields):
    """A request on `route` (a completion of `prompts`, or a chat of its one prompt); vLLM's fields in extra_body."""
    extra = {key: fields.pop(key) for key in ("guided_choice", "stop_token_ids", "ignore_eos") if key in fields}
    if route == "chat":
        [prompt] = prompts
        return oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                           extra_body=extra, **fields)
    return oai.completions.create(model="tiny", prompt=prompts, extra_body=extra, **fields)


def whole(oai, route: str, prompts: list[str], **fields) -> list[tuple[str, str, str | int | None]]:
    """Each choice's text, finish reason and stop reason, in order."""
    choices = create(oai, route, prompts, **fields).choices
    return [(c.message.content if route == "chat" else c.text, c.finish_reason, c.stop_reason) for c in choices]


def streamed(oai, route: str, prompts: list[str], **fields) -> list[tuple[str, str, str | int | None]]:
    """The same, joined from the stream, whose chunks have a stop reason only with their choice's finish reason."""
    texts, ends = {}, {}
    for chunk in create(oai, route, prompts, stream=True, **fields):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + ((c.delta.content or "") if route == "chat" else c.text)
            if c.finish_reason is None:
                assert c.stop_reason is None
            else:
                assert c.index not in ends  # one last chunk a choice
                ends[c.index] = (c.finish_reason, c.stop_reason)
    return [(texts[index], *ends[index]) for index in sorted(texts)]


@pytest.mark.parametrize("route", ROUTES)
def test_a_stop_string_that_ends_a_choice_is_its_stop_reason(oai, route):
    prompts = ["One", "Two"] if route == "completions" else ["One"]  # several prompts: a choice each, n each
    request = dict(n=2, max_tokens=60, stop=["zzz", "beta"], guided_choice=[SAID])
    expected = [("alpha ", "stop", "beta")] * 2 * len(prompts)
    assert whole(oai, route, prompts, **request) == expected
    assert streamed(oai, route, prompts, **request) == expected


def first_greedy_token(oai, route: str) -> int:
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    [(text, _, _)] = whole(oai, route, ["Count: one two"], max_tokens=1, temperature=0, ignore_eos=True)
    (token,) = tokenizer(text, add_special_tokens=False).input_ids
    return token


@pytest.mark.parametrize("route", ROUTES)
def test_a_stop_token_that_ends_a_choice_is_its_stop_reason_as_an_id(oai, route):
    stop = first_greedy_token(oai, route)
    request = dict(max_tokens=6, temperature=0, ignore_eos=True, stop_token_ids=[0, stop])  # not the list's first
    assert whole(oai, route, ["Count: one two"], **request) == [("", "stop", stop)]
    assert streamed(oai, route, ["Count: one two"], **request) == [("", "stop", stop)]


@pytest.mark.parametrize("route", ROUTES)
def test_a_choice_ended_by_eos_or_length_has_no_stop_reason(oai, route):
    eos = AutoTokenizer.from_pretrained(TINY_DIR).eos_token_id
    # The end of the guided reply is EOS, which counts as EOS even among the stop tokens (as in vLLM).
    ended = dict(max_tokens=60, guided_choice=[SAID], stop_token_ids=[eos])
    cut = dict(max_tokens=2, temperature=0, ignore_eos=True)
    for fetch in (whole, streamed):
        assert fetch(oai, route, ["One"], **ended) == [(SAID, "stop", None)]
        [(_, finish_reason, stop_reason)] = fetch(oai, route, ["One"], **cut)
        assert (finish_reason, stop_reason) == ("length", None)


def test_the_stop_reason_crosses_an_engines_http_link(engine_app_urls):
    """An engine behind HTTP (`parrot-lc engine`) sends its manager what ended a request."""
    [url] = engine_app_urls("key", 1)
    engine = RemoteEngine(url, EngineStats(*[0] * 10), authorization="Bearer key")
    sampling = SamplingParams(max_tokens=60, stop=("beta",), constraint=Constraint("regex", SAID))

    async def last_event() -> RequestOutput:
        try:
            return [event async for event in engine.generate(sampling, "c", token_ids=[5, 6, 7])][-1]
        finally:
            engine.close()

    event = asyncio.run(last_event())
    assert (event.finish_reason, event.stop_reason) == ("stop", "beta")


def test_the_stop_reason_of_an_openai_compatible_engine_comes_through(parrot_server):
    body = {"model": "tiny", "prompt": "Count: one two", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        text = client.post(f"{parrot_server}/v1/completions", json=body).json()["choices"][0]["text"]
        front_settings = ServerSettings(port=0, engines=0, openai_engine=parrot_server)
        with LocalServer(EngineSettings(model="tiny", device="cpu", dtype="float32"), front_settings) as front:
            stop = text[1:4]
            [choice] = client.post(f"{front.base_url}/v1/completions", json={**body, "stop": [stop]}).json()["choices"]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (text[:text.index(stop)], "stop", stop)
