"""What agents and evaluation harnesses ask of OpenAI-compatible servers (as vLLM and SGLang serve it):
log-probabilities (chat's and completions' shapes, streamed too, of an echoed prompt too: lm-evaluation-harness's
log-likelihood requests), prompts as token ids and lists of prompts, n choices forked from one prefill, /tokenize
and /detokenize."""

import httpx
import openai
import pytest
import torch

from conftest import assert_refused
from parrot_lc.engine import SamplingParams
from parrot_lc.engine.logprobs import TokenLogprob
from parrot_lc.server.openai_choices import TokenTexts, chat_logprobs
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings, ServerSettings

TOLERANCE = 1e-4  # float32, the same model: only the batching's summation order differs


@pytest.fixture
def oai(parrot_server):
    return openai.OpenAI(base_url=f"{parrot_server}/v1", api_key="unused", max_retries=0)


def reference_logprobs(engine, token_ids: list[int]) -> list[torch.Tensor]:
    """The log-softmax of the engine's next-token logits after each prefix of `token_ids` (the first one alone
    on): (V,) each, computed a token at a time, apart from any batching of the server's."""
    engine.fill(token_ids[:1], "reference")
    logprobs = []
    for token in token_ids[1:]:
        logprobs.append(engine.context_logits("reference").float().log_softmax(-1))
        engine.fill([token], "reference")
    logprobs.append(engine.context_logits("reference").float().log_softmax(-1))
    engine.free_context("reference")
    return logprobs


def greedy_path(engine, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """The greedy continuation of `prompt` and the log-probabilities (V,) each of its tokens was picked from."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(reference_logprobs(engine, tokens)[-1].argmax()))
    return tokens[len(prompt):], reference_logprobs(engine, tokens)[len(prompt) - 1 : -1]


# ---- the engine ----------------------------------------------------------------------------------------------


def test_the_engine_computes_prompt_logprobs_only_when_asked_chunked_and_cached_alike(make_engine):
    engine = make_engine(max_num_batched_tokens=8)  # a 30-token prompt in four chunks
    prompt = list(range(40, 70))
    expected = reference_logprobs(engine, prompt)
    for context in ("first", "again"):  # the second prompt's blocks are in the block cache: computed anyway
        request = engine.submit_generate(SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3), context,
                                         token_ids=prompt)
        first = engine.run_until_done([request])[request.request_id][0]
        assert [e.token_id for e in first.prompt_logprobs] == prompt and first.prompt_logprobs[0].logprob is None
        for entry, logprobs in zip(first.prompt_logprobs[1:], expected):
            assert abs(entry.logprob - logprobs[entry.token_id].item()) <= TOLERANCE
            assert [t for t, _ in entry.top] == logprobs.topk(3).indices.tolist()
    plain = engine.submit_generate(SamplingParams(max_tokens=2, temperature=0), "plain", token_ids=prompt)
    assert all(e.prompt_logprobs is None and not e.logprobs for e in engine.run_until_done([plain])[plain.request_id])


def test_a_request_of_max_tokens_0_ends_with_its_prompts_logprobs(tiny):
    request = tiny.submit_generate(SamplingParams(max_tokens=0, prompt_logprobs=0), "c", token_ids=[5, 6, 7, 8])
    [event] = tiny.run_until_done([request])[request.request_id]
    assert event.finished and event.finish_reason == "length" and event.token_ids == []
    assert [e.token_id for e in event.prompt_logprobs] == [5, 6, 7, 8] and event.prompt_logprobs[1].top == ()


def test_sampled_tokens_logprobs_are_the_log_softmax_of_their_logits(tiny):
    prompt = list(range(100, 120))
    tokens, expected = greedy_path(tiny, prompt, 5)
    request = tiny.submit_generate(SamplingParams(max_tokens=5, temperature=0, logprobs=4, ignore_eos=True), "g",
                                   token_ids=prompt)
    entries = [e for event in tiny.run_until_done([request])[request.request_id] for e in event.logprobs]
    assert [e.token_id for e in entries] == tokens
    for entry, logprobs in zip(entries, expected):
        assert abs(entry.logprob - logprobs.max().item()) <= TOLERANCE and entry.top[0][0] == entry.token_id
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run through the device tool)")
def test_logprobs_with_cuda_graphs_and_overlapped_steps_equal_the_references(make_engine):
    """Sampled tokens' log-probabilities come back with their tokens a step later, and decode steps replay CUDA
    graphs; a prompt's are gathered chunk by chunk on the device."""
    engine = make_engine(device="cuda", cuda_graphs=True, overlap_steps=True, max_num_batched_tokens=16)
    prompts = [list(range(3 + i, 40 + 5 * i)) for i in range(4)]
    paths = [greedy_path(engine, prompt, 6) for prompt in prompts]
    requests = [engine.submit_generate(SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3,
                                                      prompt_logprobs=2 if i < 2 else None), i, token_ids=prompt)
                for i, prompt in enumerate(prompts)]
    events = engine.run_until_done(requests)
    for request, prompt, (tokens, expected) in zip(requests, prompts, paths):
        entries = [e for event in events[request.request_id] for e in event.logprobs]
        assert [e.token_id for e in entries] == tokens
        assert all(abs(e.logprob - lp[e.token_id].item()) <= 1e-3 for e, lp in zip(entries, expected))
    reference = reference_logprobs(engine, prompts[0])
    prompt_entries = events[requests[0].request_id][0].prompt_logprobs
    assert all(abs(e.logprob - lp[e.token_id].item()) <= 1e-3 for e, lp in zip(prompt_entries[1:], reference))


# ---- /v1/completions and /v1/chat/completions -------------------------------------------------------------------


def test_completion_logprobs_follow_the_engine_and_the_top_ones_hold_the_greedy_token(oai, tiny):
    prompt = "The tide comes in at"
    response = oai.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    tokens, expected = greedy_path(tiny, tiny.tokenizer(prompt).input_ids, 4)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == [tiny.tokenizer.decode([t]) for t in tokens]
    assert "".join(logprobs.tokens) == response.choices[0].text
    for token, value, top, reference in zip(tokens, logprobs.token_logprobs, logprobs.top_logprobs, expected):
        assert abs(value - reference[token].item()) <= TOLERANCE
        assert list(top.values()) == sorted(top.values(), reverse=True) and len(top) == 3
        assert top[tiny.tokenizer.decode([token])] == value == max(top.values())  # lm-eval's is_greedy check
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(4)]


SPLIT = "猫 and 🐱 are"  # each of its two characters takes several byte-level tokens: their texts alone are U+FFFD


def test_text_offsets_index_the_choices_text_where_tokens_split_characters(oai):
    choice = oai.completions.create(model="tiny", prompt=SPLIT, max_tokens=1, temperature=0, echo=True,
                                    logprobs=0).choices[0]
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    assert "\ufffd" in tokens[0] and offsets[:tokens.index(" and") + 1] == [0, 0, 0, 1]  # 猫's three tokens at 0
    for token, offset in zip(tokens, offsets):
        if "\ufffd" not in token:
            assert choice.text[offset:offset + len(token)] == token


def test_chat_logprob_bytes_are_each_tokens_own_bytes_which_join_into_the_text(tiny):
    ids = tiny.tokenizer(SPLIT, add_special_tokens=False).input_ids
    content = chat_logprobs([TokenLogprob(token_id, -1.0) for token_id in ids], TokenTexts(tiny.tokenizer))["content"]
    assert any(entry["token"] == "\ufffd" for entry in content)
    assert b"".join(bytes(entry["bytes"]) for entry in content).decode() == SPLIT

def test_chat_logprobs_follow_the_engine_in_openais_chat_shape(oai, client, tiny):
    messages = [{"role": "user", "content": "Name a harbour"}]
    response = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    prompt = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert response.usage.prompt_tokens == len(prompt)
    tokens, expected = greedy_path(tiny, prompt, 3)
    content = response.choices[0].logprobs.content
    for entry, token, reference in zip(content, tokens, expected):
        assert entry.token == tiny.tokenizer.decode([token]) == bytes(entry.bytes).decode(errors="replace")
        assert abs(entry.logprob - reference[token].item()) <= TOLERANCE
        assert [t.token for t in entry.top_logprobs][0] == entry.token and len(entry.top_logprobs) == 2
    assert len(content) == 3 and oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=3, temperature=0).choices[0].logprobs is None


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_gives_the_prompts_logprobs_as_lm_eval_asks_for_them(oai, tiny, max_tokens):
    """lm-evaluation-harness's `local-completions` log-likelihood request: token-id prompts in a batch, `echo`,
    `logprobs: 1`, and `max_tokens` 0 (older versions) or 1 (newer, which drop the generated token)."""
    prompts = [tiny.tokenizer("Harbour master: the tide").input_ids, tiny.tokenizer("Low water at noon").input_ids]
    response = oai.completions.create(model="tiny", prompt=prompts, echo=True, logprobs=1, max_tokens=max_tokens,
                                      temperature=0, seed=1234)
    assert [c.index for c in response.choices] == [0, 1]
    for choice, prompt in zip(response.choices, prompts):
        logprobs, expected = choice.logprobs, reference_logprobs(tiny, prompt)
        assert logprobs.tokens[: len(prompt)] == [tiny.tokenizer.decode([t]) for t in prompt]
        assert len(logprobs.tokens) == len(prompt) + max_tokens
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        for token, value, reference in zip(prompt[1:], logprobs.token_logprobs[1:], expected):
            assert abs(value - reference[token].item()) <= TOLERANCE
        assert choice.text.startswith(tiny.tokenizer.decode(prompt)) and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 2 * max_tokens
    assert response.usage.prompt_tokens == sum(map(len, prompts))


def test_a_token_id_prompt_answers_as_its_text_does(oai, tiny):
    text = "Boats leave at dawn"
    kwargs = dict(model="tiny", max_tokens=5, temperature=0, logprobs=2, echo=True)
    by_text = oai.completions.create(prompt=text, **kwargs).choices[0]
    by_ids = oai.completions.create(prompt=tiny.tokenizer(text).input_ids, **kwargs).choices[0]
    assert by_ids.text == by_text.text and by_ids.logprobs.tokens == by_text.logprobs.tokens
    assert by_ids.logprobs.token_logprobs[1:] == pytest.approx(by_text.logprobs.token_logprobs[1:], abs=TOLERANCE)


def test_a_list_of_prompts_gets_n_choices_each_in_order(oai):
    prompts = ["The lighthouse keeper", "A storm over the bay", "Fishing nets"]
    alone = [oai.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in prompts]
    response = oai.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in response.choices] == list(range(6))
    assert [c.text for c in response.choices] == [text for text in alone for _ in range(2)]
    assert response.usage.completion_tokens == 6 * 4


def test_n_choices_fork_one_prefill_of_their_prompt(oai, local_server):
    """The Parrot way to sample several answers: the prompt is filled once and each choice forks it."""
    stats = local_server.manager.engines[0].engine.stats
    prompt = "The ferry timetable for the winter season, " * 4  # no other test sends it: nothing cached
    before = stats()
    response = oai.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, n=4)
    after = stats()
    length = response.usage.prompt_tokens
    assert len({c.text for c in response.choices}) == 1 and response.usage.completion_tokens == 12
    # The prompt but its last token once (the prefix context), then each fork's last prompt token (the tokens it
    # feeds back while it generates are decode tokens).
    assert after.prefill_tokens - before.prefill_tokens == (length - 1) + 4
    assert after.reused_tokens - before.reused_tokens == 4 * (length - 1)


def test_seeded_choices_differ_and_each_is_its_seeds(oai):
    kwargs = dict(model="tiny", prompt="Gulls over the quay", max_tokens=6, temperature=1.0)
    texts = [c.text for c in oai.completions.create(n=3, seed=5, **kwargs).choices]
    assert len(set(texts)) == 3
    assert texts == [c.text for c in oai.completions.create(n=3, seed=5, **kwargs).choices]
    assert texts == [oai.completions.create(seed=5 + i, **kwargs).choices[0].text for i in range(3)]


def test_a_streamed_completion_carries_each_choices_index_and_logprobs(oai):
    kwargs = dict(model="tiny", prompt=["Anchors", "Sails and masts"], max_tokens=5, temperature=0, n=2, logprobs=2,
                  echo=True)
    whole = oai.completions.create(**kwargs)
    chunks = list(oai.completions.create(stream=True, **kwargs))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine for t in c.logprobs.tokens] == choice.logprobs.tokens
        assert [o for c in mine for o in c.logprobs.text_offset] == choice.logprobs.text_offset
        assert mine[-1].finish_reason == "length"


def test_a_streamed_chat_carries_its_tokens_logprobs(oai):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0,
                  logprobs=True, top_logprobs=1, n=2)
    whole = oai.chat.completions.create(**kwargs)
    chunks = [c.choices[0] for c in oai.chat.completions.create(stream=True, **kwargs) if c.choices]
    for choice in whole.choices:
        mine = [c for c in chunks if c.index == choice.index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        streamed = [e for c in mine if c.logprobs is not None for e in c.logprobs.content]
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in choice.logprobs.content]


@pytest.mark.parametrize("body, status, field", [
    ({"n": 129}, 400, "n"), ({"best_of": 3, "n": 2}, 400, "best_of"), ({"logprobs": 21}, 400, "logprobs"),
    ({"max_tokens": 0}, 400, "max_tokens"), ({"prompt": [5, 1024]}, 400, "prompt.1"),
    ({"prompt": [[5], [6, -1]]}, 400, "prompt.1.1"), ({"prompt": []}, 400, "prompt"),
])
def test_completion_requests_past_the_limits_are_refused_naming_the_field(client, body, status, field):
    assert_refused(client.post("/v1/completions", json={"model": "tiny", "prompt": "x", **body}), status, field)


@pytest.mark.parametrize("body, status, field", [
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"), ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"n": 200}, 400, "n"),
])
def test_chat_requests_past_the_limits_are_refused_naming_the_field(client, body, status, field):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **body}
    assert_refused(client.post("/v1/chat/completions", json=request), status, field)


# ---- /tokenize and /detokenize -----------------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip_with_the_models_tokenizer(client, tiny):
    text = "Harbour fees: 12€ a night"
    tokenized = client.post("/tokenize", json={"model": "tiny", "prompt": text}).json()
    assert tokenized == {"tokens": tiny.tokenizer(text).input_ids, "count": len(tokenized["tokens"]),
                         "max_model_len": tiny.config.max_position_embeddings}
    assert client.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": text}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Fees?"}]
    rendered = tiny.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()["tokens"] \
        == tiny.tokenizer(rendered).input_ids


def test_tokenizer_info_names_the_special_tokens_and_the_context(client, tiny):
    """What lm-evaluation-harness's remote tokenizer (`tokenizer_backend=remote`) reads, as vLLM serves it."""
    assert client.get("/tokenizer_info").json() == {
        "tokenizer_class": type(tiny.tokenizer).__name__, "bos_token": tiny.tokenizer.bos_token,
        "eos_token": tiny.tokenizer.eos_token, "pad_token": tiny.tokenizer.pad_token,
        "model_max_length": tiny.config.max_position_embeddings}


@pytest.mark.parametrize("path, body, status, field", [
    ("/detokenize", {"tokens": [5, 99999]}, 400, "tokens.1"), ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"), ("/tokenize", {"model": "gpt-4o", "prompt": "x"}, 404, "model"),
])
def test_bad_tokenizer_requests_are_4xx_naming_the_field(client, path, body, status, field):
    assert_refused(client.post(path, json=body), status, field)


# ---- a server of its own: an API key and a small queue -------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server():
    engine = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
    with LocalServer(engine, ServerSettings(port=0, api_key="k", max_queued_calls_per_session=4)) as server:
        yield server


def test_the_tokenizer_routes_need_the_api_key(keyed_server):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [5]})):
        assert_refused(httpx.post(f"{keyed_server.base_url}{path}", json=body), 401, "authorization")
        answer = httpx.post(f"{keyed_server.base_url}{path}", json=body, headers={"Authorization": "Bearer k"})
        assert answer.status_code == 200


def test_each_choice_counts_as_a_call_in_the_queue_limits(keyed_server):
    oai = openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key="k", max_retries=0)
    assert len(oai.completions.create(model="tiny", prompt="x", max_tokens=1, n=4).choices) == 4
    with pytest.raises(openai.BadRequestError):  # 5 calls: more than the request's session may queue
        oai.completions.create(model="tiny", prompt=["x", "y"], max_tokens=1, n=3)
