"""ParrotLLM in place of LangChain's OpenAI (the completions LLM of `langchain_openai`): the arguments a user of that
class sets (`model_kwargs`, `n`, `best_of`, `logprobs`, `batch_size`, `logit_bias`) work with its meaning, eager,
streamed, batched and deferred, and what the server cannot do is refused, naming the field. Against the tiny model
on loopback."""

from __future__ import annotations

import json

import httpx
import pytest
from langchain_core.output_parsers import StrOutputParser
from pydantic import ValidationError

from parrot_lc.frontend.errors import InvalidRequestError
from parrot_lc.integrations.langchain import ParrotLLM, deferred

PROMPTS = ["The parrot said", "Quantum zebras of Paris", "1 2 3 4"]


@pytest.fixture
def sent() -> list[dict]:
    """The bodies of the completion requests that `recorded` models send."""
    return []


@pytest.fixture
def recorded(parrot_server, sent, graphs_sent):
    """`recorded(**arguments)`: ParrotLLM on the test server, 4 tokens a call unless told; the bodies of its
    completion requests (sync and async) land in `sent`, its graphs in `graphs_sent`."""
    def record(request: httpx.Request) -> None:
        if request.url.path == "/v1/completions":
            sent.append(json.loads(request.content))
        elif request.url.path.endswith("/calls") and request.method == "POST":
            graphs_sent.append(json.loads(request.content)["calls"])

    async def arecord(request: httpx.Request) -> None:
        record(request)

    def make(**arguments) -> ParrotLLM:
        return ParrotLLM(**{"base_url": parrot_server, "max_tokens": 4,
                            "sync_client_kwargs": {"event_hooks": {"request": [record]}},
                            "async_client_kwargs": {"event_hooks": {"request": [arecord]}}, **arguments})

    return make


def texts(result) -> list[list[str]]:
    return [[generation.text for generation in generations] for generations in result.generations]


# ---- model_kwargs ---------------------------------------------------------------------------------------


def test_model_kwargs_are_sent_in_every_completion_request_invoked_and_streamed(recorded, sent):
    llm = recorded(temperature=0, model_kwargs={"top_k": 20, "min_tokens": 2})
    llm.invoke(PROMPTS[0])
    list(llm.stream(PROMPTS[0]))
    assert [(body["top_k"], body["min_tokens"]) for body in sent] == [(20, 2), (20, 2)]


def test_model_kwargs_sampling_fields_reach_a_batch_graph(recorded, graphs_sent):
    """top_k=1 at temperature 1 is greedy: in a batch (a graph) as in a completion."""
    greedy = [recorded(temperature=0).invoke(prompt) for prompt in PROMPTS]
    top_1 = recorded(temperature=1.0, seed=3, model_kwargs={"top_k": 1})
    assert top_1.batch(PROMPTS) == greedy
    [calls] = graphs_sent
    assert len(calls) == len(PROMPTS)


@pytest.mark.parametrize("model_kwargs, why", [
    ({"temperature": 0.5}, r"\['temperature'\] should be given as arguments of their own"),
    ({"n": 2, "logprobs": 1}, r"\['logprobs', 'n'\] should be given as arguments of their own"),
    ({"best_of": 2}, r"\['best_of'\] should be given as arguments of their own"),
    ({"prompt": "p", "stream": True}, r"model_kwargs cannot set \['prompt', 'stream'\]: every request sets them"),
    ({"suffix": "!"}, r"model_kwargs: suffix is not taken: the served models have no fill-in-the-middle"),
])
def test_model_kwargs_refuse_arguments_of_their_own_and_fields_it_cannot_send(model_kwargs, why):
    with pytest.raises(ValidationError, match=why):
        ParrotLLM(base_url="http://127.0.0.1:9", model_kwargs=model_kwargs)


def test_echo_in_model_kwargs_gives_the_prompt_before_the_text_invoked_and_batched(recorded, sent):
    """`echo` is a request field that a graph call does not carry: the batch goes as a completion request."""
    echoing = recorded(temperature=0, model_kwargs={"echo": True})
    plain = [recorded(temperature=0).invoke(prompt) for prompt in PROMPTS[:2]]
    sent.clear()
    assert echoing.batch(PROMPTS[:2]) == [prompt + text for prompt, text in zip(PROMPTS, plain)]
    assert [body["prompt"] for body in sent] == [PROMPTS[:2]]


# ---- n and best_of ------------------------------------------------------------------------------------


def test_n_gives_a_prompt_n_generations_from_one_request_and_invoke_the_first(recorded, sent):
    llm = recorded(temperature=1.0, seed=5, n=3)
    [generations] = texts(llm.generate([PROMPTS[1]]))
    assert len(sent) == 1 and sent[0]["n"] == 3
    assert len(generations) == 3 and len(set(generations)) > 1
    assert llm.invoke(PROMPTS[1]) == generations[0]
    assert len(recorded(temperature=0).generate([PROMPTS[1]], n=2).generations[0]) == 2  # a call's n


@pytest.mark.asyncio
async def test_a_batch_with_n_is_one_graph_of_n_calls_a_prompt_as_each_prompt_alone(recorded, graphs_sent, sent):
    llm = recorded(temperature=1.0, seed=5, n=2)
    alone = [texts(llm.generate([prompt]))[0] for prompt in PROMPTS]
    assert all(len(set(choices)) == 2 for choices in alone)  # seeds 5 and 6
    sent.clear()
    assert texts(llm.generate(PROMPTS)) == alone  # the i-th call of a prompt samples with seed + i, as a request's
    assert texts(await llm.agenerate(PROMPTS)) == alone
    assert [len(calls) for calls in graphs_sent] == [2 * len(PROMPTS)] * 2 and not sent


def test_n_above_one_is_refused_for_a_stream_which_gives_one_generation(recorded):
    with pytest.raises(ValidationError, match="n must be 1 when streaming"):
        recorded(n=2, streaming=True)
    with pytest.raises(ValueError, match="n must be 1 when streaming"):
        list(recorded(n=2).stream(PROMPTS[0]))
    with pytest.raises(ValueError, match="n must be 1 when streaming"):
        list(recorded().stream(PROMPTS[0], n=2))


def test_best_of_equal_to_n_is_taken_and_more_is_refused_naming_it(recorded):
    assert len(recorded(temperature=0, n=2, best_of=2).generate([PROMPTS[0]]).generations[0]) == 2
    with pytest.raises(ValidationError, match="best_of=3 is not taken with n=2: the server returns every choice"):
        recorded(n=2, best_of=3)
    with pytest.raises(InvalidRequestError, match="best_of=2 is not taken with n=1") as refused:
        recorded(max_retries=0, base_url="http://127.0.0.1:9").invoke(PROMPTS[0], best_of=2)  # before any request
    assert refused.value.field == "best_of"


# ---- logprobs -----------------------------------------------------------------------------------------


def test_logprobs_give_each_generation_openais_completion_logprobs(recorded, sent):
    [[generation]] = recorded(temperature=0, logprobs=2).generate([PROMPTS[0]]).generations
    logprobs = generation.generation_info["logprobs"]
    assert sent[0]["logprobs"] == 2
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(logprobs["tokens"]) == generation.text and len(logprobs["token_logprobs"]) == 4
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])  # greedy: the token is one of the top 2
    assert logprobs["text_offset"][0] == 0


def test_a_generation_not_asked_for_logprobs_has_them_none_whole_or_streamed(recorded):
    """As LangChain's OpenAI gives them: the key is there, its value None."""
    for llm in (recorded(temperature=0), recorded(temperature=0, streaming=True)):
        [[generation]] = llm.generate([PROMPTS[0]]).generations
        assert "logprobs" in generation.generation_info and generation.generation_info["logprobs"] is None


@pytest.mark.asyncio
async def test_streamed_chunks_carry_their_logprobs_which_join_to_the_whole_completions(recorded):
    eager = recorded(temperature=0, logprobs=1).generate([PROMPTS[0]]).generations[0][0].generation_info["logprobs"]
    streaming = recorded(temperature=0, logprobs=1, streaming=True)  # generate joins the chunks of _stream
    for result in (streaming.generate([PROMPTS[0]]), await streaming.agenerate([PROMPTS[0]])):
        assert result.generations[0][0].generation_info["logprobs"] == eager


@pytest.mark.asyncio
async def test_a_batch_with_logprobs_goes_as_completion_requests_of_batch_size_prompts(recorded, sent, graphs_sent):
    """A graph call's output is text only: the batch is sent as LangChain's OpenAI sends it, batch_size prompts a
    request, each prompt's generations with their log-probabilities."""
    llm = recorded(temperature=0, logprobs=0, batch_size=2)
    alone = [llm.generate([prompt]).generations[0][0] for prompt in PROMPTS]
    sent.clear()
    for result in (llm.generate(PROMPTS), await llm.agenerate(PROMPTS)):
        batched = [generations[0] for generations in result.generations]
        assert [g.text for g in batched] == [g.text for g in alone]
        for one, other in zip(batched, alone):  # computed in another batch: equal to float32's rounding
            one, other = one.generation_info["logprobs"], other.generation_info["logprobs"]
            assert one["tokens"] == other["tokens"]
            assert one["token_logprobs"] == pytest.approx(other["token_logprobs"], abs=1e-4)
        assert result.llm_output["token_usage"]["completion_tokens"] == 4 * len(PROMPTS)  # summed over requests
    assert [body["prompt"] for body in sent] == [PROMPTS[:2], PROMPTS[2]] * 2 and not graphs_sent


@pytest.mark.parametrize("arguments, why", [(dict(logprobs=1), "calls with log-probabilities"),
                                             (dict(n=2), "calls of several replies (n)")])
def test_a_deferred_call_with_logprobs_or_n_runs_at_once_with_the_eager_result(recorded, arguments, why):
    chain = recorded(temperature=1.0, seed=5, **arguments) | StrOutputParser()
    runnable = deferred(chain)
    assert runnable.invoke(PROMPTS[0]) == chain.invoke(PROMPTS[0])
    assert f"ParrotLLM {why} run at once, on real text" in runnable.last_run.waits


# ---- batch_size and logit_bias -----------------------------------------------------------------------------


def test_batch_size_is_taken_and_a_batch_is_still_one_graph(recorded, graphs_sent, sent):
    recorded(temperature=0, batch_size=1).batch(PROMPTS)
    [calls] = graphs_sent
    assert len(calls) == len(PROMPTS) and not sent


def test_logit_bias_is_taken_as_none_or_empty_only_and_refused_naming_it():
    assert ParrotLLM(base_url="http://127.0.0.1:9", logit_bias={}).logit_bias is None
    with pytest.raises(ValidationError, match=r"logit_bias\n  Value error, logit_bias is not taken: the server does "
                                              r"not bias tokens' logits"):
        ParrotLLM(base_url="http://127.0.0.1:9", logit_bias={"50256": -100})
