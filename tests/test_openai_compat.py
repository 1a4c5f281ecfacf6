"""Unmodified OpenAI clients (the `openai` package) talk to the server: completions and chat, streamed or
not, with usage; requests that share a system prompt share its prefix context."""

import openai
import pytest


@pytest.fixture
def oai(parrot_server):
    return openai.OpenAI(base_url=f"{parrot_server}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]


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


def test_bad_sampling_is_a_4xx_the_client_raises(oai):
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="tiny", prompt="x", temperature=-1)
