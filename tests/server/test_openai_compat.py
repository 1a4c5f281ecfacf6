"""Unmodified OpenAI clients (the `openai` package) talk to the server: completions and chat, streamed or
not, with usage; requests that share a system prompt share its prefix context."""

import asyncio
import json

import openai
import pytest

from conftest import assert_refused
from parrot_lc.engine.loader import TINY_DIR
from parrot_lc.server.graph import TextStream
from parrot_lc.server.local import LocalServer
from parrot_lc.server.executor import LATENCY_PRIORITY
from parrot_lc.server.openai_routes import DeltaEvents, sse
from parrot_lc.settings import EngineSettings, ServerSettings


@pytest.fixture
def oai(parrot_server):
    return openai.OpenAI(base_url=f"{parrot_server}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]


def test_the_served_model_is_retrieved_by_name_and_another_is_not_found(oai, client):
    assert oai.models.retrieve("tiny").id == "tiny"
    assert_refused(client.get("/v1/models/gpt-4o"), 404, "model")


def test_completion_returns_text_and_usage(oai):
    response = oai.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5 and response.usage.prompt_tokens > 0


def test_streamed_completion_joins_to_the_non_streamed_text(oai):
    kwargs = dict(model="tiny", prompt="Streaming works like", max_tokens=8, temperature=0)
    whole = oai.completions.create(**kwargs).choices[0].text
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_completion_uses_the_chat_template(oai):
    response = oai.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        max_tokens=4, temperature=0,
    )
    assert response.choices[0].message.role == "assistant"
    assert response.usage.completion_tokens == 4


def test_streamed_chat_sends_role_then_content_deltas(oai):
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    chunks = list(oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chats_sharing_a_system_prompt_reuse_its_prefix(oai, local_server):
    system = "You are the support assistant of a bicycle shop. " * 8
    stats = local_server.manager.engines[0].engine.stats
    before = stats().reused_tokens
    for question in ("Do you sell helmets?", "When do you open?", "Can you fix a flat tyre?"):
        oai.chat.completions.create(model="tiny", max_tokens=2, temperature=0,
                                    messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
    assert stats().reused_tokens - before >= 3 * 80  # each chat forked the ~100-token system part


def test_a_chats_new_system_prompt_is_filled_at_the_chats_priority(oai, prefix_fill_priorities):
    """The fill is the first part of a latency-critical chat: filled as a background job, it would be prefilled a
    little a step while other chats decode, and this chat's first token would wait for it."""
    system = "You keep the berth bookings of a small harbour and answer the harbour master. " * 6
    oai.chat.completions.create(model="tiny", max_tokens=2, temperature=0,
                                messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
    assert prefix_fill_priorities == [LATENCY_PRIORITY]


def chat_usage_and_prefill(oai, server: LocalServer, system: str) -> tuple[openai.types.CompletionUsage, int]:
    """A one-token chat's usage, and the prompt tokens that the engine computed (prefilled) for it."""
    stats = server.manager.engines[0].engine.stats
    before = stats().prefill_tokens
    usage = oai.chat.completions.create(model="tiny", max_tokens=1, temperature=0, messages=[
        {"role": "system", "content": system},
        {"role": "user", "content": "Which of these rules apply to the guests who arrive after midnight?"}]).usage
    return usage, stats().prefill_tokens - before


def test_a_new_system_prompt_reports_no_cached_tokens(oai, local_server):
    """OpenAI's cached tokens are those served from a cache: a prefix context filled for this very request is
    computed, not cached."""
    usage, prefilled = chat_usage_and_prefill(oai, local_server, "You count the gulls on the pier at dawn. " * 8)
    assert usage.prompt_tokens_details.cached_tokens == 0 and prefilled == usage.prompt_tokens


def test_a_repeated_prompt_reports_the_full_blocks_an_earlier_request_computed_as_cached(oai, local_server):
    system = "You mend the nets of the fishing fleet and answer the skippers. " * 8
    first, _ = chat_usage_and_prefill(oai, local_server, system)
    again, prefilled = chat_usage_and_prefill(oai, local_server, system)
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = again.prompt_tokens_details.cached_tokens
    assert cached == again.prompt_tokens - prefilled == (again.prompt_tokens - 1) // 16 * 16  # all but its last token's


def test_a_prompt_whose_prefix_context_was_evicted_counts_what_its_fill_read_from_the_block_cache():
    """A new prefix context filled for the request computes only what the block cache lacks (and the block of
    its last token, whose logits a fill computes): the rest is cached."""
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
    with LocalServer(settings, ServerSettings(port=0, max_prefixes_per_engine=1)) as server:
        oai = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        lighthouse = "You keep the lighthouse log and answer the keeper's questions. " * 4
        counts = [chat_usage_and_prefill(oai, server, system)  # the ferry's prefix context evicts the lighthouse's
                  for system in (lighthouse, "You sort the timetable of the island's three ferries. " * 4, lighthouse)]
    assert [usage.prompt_tokens_details.cached_tokens for usage, prefilled in counts] == [
        usage.prompt_tokens - prefilled for usage, prefilled in counts]
    assert counts[0][0].prompt_tokens_details.cached_tokens == 0 < counts[2][0].prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_choices_of_a_new_prompt_report_no_cached_tokens(oai, stream):
    """The n choices fork one prompt filled for this request: computed once, cached for none."""
    options = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    response = oai.chat.completions.create(model="tiny", max_tokens=2, temperature=0, n=3, **options, messages=[
        {"role": "user", "content": f"Count the {'streamed' if stream else 'whole'} boats in the bay, twice over."}])
    usage = list(response)[-1].usage if stream else response.usage
    assert usage.prompt_tokens > 16 and usage.prompt_tokens_details.cached_tokens == 0


def test_bad_sampling_is_a_4xx_the_client_raises(oai):
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="tiny", prompt="x", temperature=-1)


def test_an_unknown_model_gets_404_listing_the_served_names(oai):
    with pytest.raises(openai.NotFoundError) as refused:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    error = assert_refused(refused.value.response, 404, "model")
    assert "'gpt-4o'" in error["message"] and "'tiny'" in error["message"]


def test_a_model_served_from_a_path_answers_to_the_path_and_to_its_last_part():
    settings = EngineSettings(model=str(TINY_DIR), load_format="dummy", device="cpu", dtype="float32",
                              kv_cache_bytes=16 * 2**20)
    with LocalServer(settings) as server:
        oai = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in oai.models.list().data] == [str(TINY_DIR)]
        for name in (str(TINY_DIR), "tiny"):
            response = oai.completions.create(model=name, prompt="x", max_tokens=1)
            assert response.usage.completion_tokens == 1 and response.model == str(TINY_DIR)  # as /v1/models names it
        with pytest.raises(openai.NotFoundError):
            oai.completions.create(model="engine/tiny", prompt="x", max_tokens=1)


def test_a_request_that_names_no_model_gets_the_served_one(client):
    response = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 200 and response.json()["model"] == "tiny"


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.mark.parametrize("field, value", [
    ("echo", True),
    ("logit_bias", {"42": 100}),
    ("audio", {"voice": "alloy", "format": "wav"}),
])
def test_an_unimplemented_openai_field_gets_400_naming_it(oai, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(**CHAT, extra_body={field: value})  # as sent: `echo` is no argument of chat's
    assert_refused(refused.value.response, 400, field)


@pytest.mark.parametrize("field, value", [("best_of", 3), ("suffix", " the end")])
def test_an_unimplemented_completions_field_gets_400_naming_it(oai, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model="tiny", prompt="x", max_tokens=2, **{field: value})
    assert_refused(refused.value.response, 400, field)


def test_the_neutral_values_that_clients_send_anyway_and_harmless_extra_fields_are_accepted(oai):
    """What LangChain's ChatOpenAI and the openai package may send without being asked, and fields that change
    nothing of the answer (as vLLM, the server takes them)."""
    response = oai.chat.completions.create(
        **CHAT, n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, logit_bias={}, user="u-1",
        metadata={"run": "test"}, store=False, parallel_tool_calls=False, stream_options=None,
        extra_body={"tool_choice": "none", "response_format": {"type": "text"}},
    )
    assert response.usage.completion_tokens == 2


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {**CHAT, "temperature": None, "top_p": None, "n": None, "stream": None,
                              "parallel_tool_calls": None, "presence_penalty": None}),
    ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "temperature": None, "n": None,
                         "echo": None, "stream": None}),
])
def test_null_for_a_nullable_field_is_its_default(client, route, body):
    # the `openai` package sends null for an argument passed as None; OpenAI's spec marks these fields nullable
    left_out = {key: value for key, value in body.items() if value is not None}
    answer, expected = (client.post(route, json={**b, "seed": 7}) for b in (body, left_out))
    assert answer.status_code == 200, answer.text
    assert [c.get("text", c.get("message")) for c in answer.json()["choices"]] == [
        c.get("text", c.get("message")) for c in expected.json()["choices"]]


def test_a_completion_that_does_not_say_generates_16_tokens_as_openais_default(client):
    body = {"model": "tiny", "prompt": "Once upon a time", "ignore_eos": True}
    assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 16


def test_a_chat_that_does_not_say_may_take_what_the_context_leaves(client, local_server):
    # as OpenAI and vLLM answer: no server-chosen cap (a prompt 300 tokens short of the context gets all 300)
    def count(messages: list[dict]) -> int:
        return client.post("/tokenize", json={"model": "tiny", "messages": messages}).json()["count"]

    template = count([{"role": "user", "content": ""}])
    tokens = [1000] * (local_server.manager.max_context - template - 300)
    text = client.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "ignore_eos": True}
    prompt = count(body["messages"])
    room = local_server.manager.max_context - prompt
    answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["usage"]["completion_tokens"] == room > 0


def test_stream_options_without_stream_gets_400_naming_it(client):
    body = {**CHAT, "stream_options": {"include_usage": True}}
    assert_refused(client.post("/v1/chat/completions", json=body), 400, "stream_options")


def test_with_include_usage_every_chunk_has_a_null_usage_but_the_last(client):
    body = {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_with_continuous_usage_stats_every_chunk_has_the_usage_so_far(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {**CHAT, "max_tokens": 3, "stream": True, "stream_options": options}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    # How many tokens a chunk carries depends on timing (a loaded server sends several at once): the counts only grow.
    generated = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert all(chunk["usage"]["prompt_tokens"] > 0 for chunk in chunks)
    assert generated == sorted(generated) and generated[-1] == 3


def test_the_model_card_has_vllms_fields(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["root"] == "tiny" and card["parent"] is None and card["max_model_len"] > 0 and card["created"] > 0


def test_an_image_content_part_gets_400_naming_it(oai):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(**{**CHAT, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]})
    assert_refused(refused.value.response, 400, "messages.0.content.1.type")


@pytest.mark.parametrize("text", [5, None, ["a"]])
def test_a_text_content_part_whose_text_is_no_string_is_400_naming_it(client, text):
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    assert_refused(client.post("/v1/chat/completions", json=body), 400, "messages.0.content.0.text")



@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "system", "content": None}, {"role": "assistant", "content": None}])
def test_a_message_without_content_is_400_naming_it_as_openai_answers(client, message):
    body = {**CHAT, "messages": [message, {"role": "user", "content": "Hi"}]}
    assert_refused(client.post("/v1/chat/completions", json=body), 400, "messages.0.content")


def test_an_assistant_message_with_tool_calls_may_have_null_content(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
    body = {**CHAT, "messages": [{"role": "user", "content": "Time?"},
                                 {"role": "assistant", "content": None, "tool_calls": [call]},
                                 {"role": "tool", "tool_call_id": "call_1", "content": "noon"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_text_content_parts_are_their_texts_a_line_apart_as_vllm_joins_them(oai):
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story"}]
    joined = oai.chat.completions.create(**{**CHAT, "temperature": 0, "messages": [{"role": "user", "content": parts}]})
    whole = oai.chat.completions.create(**{**CHAT, "temperature": 0, "messages": [
        {"role": "user", "content": "Tell me\na story"}]})
    assert joined.choices[0].message.content == whole.choices[0].message.content


def test_a_lone_surrogate_in_the_model_name_gets_400_naming_it(client):
    body = b'{"model": "tiny\\ud800", "prompt": "x", "max_tokens": 2}'
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_refused(response, 400, "model")


def test_top_k_of_1_samples_the_most_likely_token(oai):
    """vLLM's `top_k` extension is implemented (the engine samples with it), not ignored."""
    kwargs = dict(model="tiny", prompt="Once upon a time", max_tokens=6)
    greedy = oai.completions.create(**kwargs, temperature=0).choices[0].text
    sampled = [oai.completions.create(**kwargs, temperature=1.0, seed=seed, extra_body={"top_k": 1}).choices[0].text
               for seed in (1, 2)]
    assert sampled == [greedy, greedy]


class CountingTokenizer:
    """A tokenizer that records the texts it tokenizes (everything else goes to the wrapped one)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.texts.append(text)
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_chat_is_tokenized_once_and_its_shared_system_prompt_once_for_all(oai, local_server, monkeypatch):
    counting = CountingTokenizer(local_server.manager.tokenizer)
    monkeypatch.setattr(local_server.manager.prompts, "tokenizer", counting)
    system = "You answer questions about the tide tables of a small harbour. " * 8  # no other test sends it
    questions = ["When is high tide?", "Is the harbour open at night?"]
    for question in questions:
        for stream in (False, True):
            list(oai.chat.completions.create(model="tiny", max_tokens=2, temperature=0, stream=stream,
                                             messages=[{"role": "system", "content": system},
                                                       {"role": "user", "content": question}]))
    # The system part once for all four requests; each request's own part once (the length check, the prefix
    # lookup and the engine call share its ids).
    assert sum(system in text for text in counting.texts) == 1
    assert [sum(question in text for text in counting.texts) for question in questions] == [2, 2]


def test_a_chat_prompt_tokenized_in_two_parts_has_the_whole_prompts_ids(local_server, monkeypatch):
    manager, tokenizer = local_server.manager, local_server.manager.tokenizer
    counting = CountingTokenizer(tokenizer)
    monkeypatch.setattr(manager.prompts, "tokenizer", counting)
    system = [{"role": "system", "content": "Tide tables: high water at 06:12, low at 12:30. Spaces   kept."}]
    head = tokenizer.apply_chat_template(system, tokenize=False)
    for question in ["When is high tide?", " leading space", "é🦜 unicode"]:
        prompt = tokenizer.apply_chat_template(system + [{"role": "user", "content": question}],
                                               tokenize=False, add_generation_prompt=True)
        assert manager.prompts.tokenize(prompt, head) == tokenizer(prompt).input_ids
    assert [text for text in counting.texts if "Tide tables" in text] == [head]  # the head once, from then on cached


def test_delta_events_are_the_whole_payload_encoded():
    def payload(text: str) -> dict:
        return {"id": "chatcmpl-1", "model": "a \"model\" \u0000delta", "choices": [
            {"index": 0, "delta": {"content": text}, "finish_reason": None}]}

    event = DeltaEvents(payload)
    for text in ("plain", "quotes \" and \\ and\nnewlines", "é 中 \u2028", "\u0000delta", ""):
        assert event(text) == sse(payload(text))


def test_a_stream_consumer_that_runs_behind_gets_the_pieces_joined():
    async def run() -> list[str]:
        stream = TextStream()
        received: list[str] = []

        async def consume() -> None:
            async for text in stream:
                received.append(text)
                await asyncio.sleep(0)  # busy while more pieces come

        consumer = asyncio.ensure_future(consume())
        await asyncio.sleep(0)  # the consumer waits
        stream.push("a")
        await asyncio.sleep(0)  # it takes "a" and is busy when the next two come
        stream.push("b")
        stream.push("c")
        stream.close()
        await consumer
        return received

    assert asyncio.run(run()) == ["a", "bc"]


@pytest.mark.parametrize("options", [{"frequency_penalty": 2.0, "presence_penalty": 1.0},
                                     {"extra_body": {"repetition_penalty": 2.0}}], ids=["openai", "vllm"])
def test_penalties_reach_the_engine_and_change_a_repeating_greedy_answer(oai, options):
    def answer(**penalties) -> str:
        return oai.completions.create(model="tiny", prompt="the cat the cat the cat the cat", max_tokens=16,
                                      temperature=0, **penalties).choices[0].text

    assert answer(**options) != answer()


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_p", 1.5),
                                          ("repetition_penalty", 0)])
def test_a_penalty_out_of_range_gets_400_naming_it(client, field, value):
    response = client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert_refused(response, 400, field)
