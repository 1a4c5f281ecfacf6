"""Tool calling on /v1/chat/completions: calls read out of each model family's format, whole and streamed; the
tools, earlier calls and tool results rendered by the chat template (or in Hermes' format where it has none);
forced calls (`required`, a named function) constrained so that a valid call always comes back; bad tool fields
refused by name. Server behaviour through the `openai` package against the tiny model on loopback."""

from __future__ import annotations

import json
import random

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from conftest import assert_refused
from parrot_lc.engine.loader import TINY_DIR
from parrot_lc.server.errors import ServerError
from parrot_lc.server.tool_calls import (
    FORCED,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    TOOLS_PROMPT,
    ChatTemplate,
    ToolCallStream,
    ToolFormat,
    ToolReader,
    ToolRequest,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                                                    "rain": {"type": "boolean"}}, "required": ["unit", "rain"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]
NAMES = frozenset({"get_weather", "get_time"})
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# A call, its result and the model's answer: the turns that follow a call.
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"unit": "celsius", "rain": false}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]

# Replies in each format, and the content and calls read out of them.
REPLIES = [
    (HERMES, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius", "rain": true}}\n'
             '</tool_call>\n<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>',
     "Let me look.", [("get_weather", '{"unit": "celsius", "rain": true}'), ("get_time", "{}")]),
    (LLAMA3_JSON, '{"name": "get_weather", "parameters": {"unit": "fahrenheit", "rain": false}}; '
                  '{"name": "get_time", "parameters": {}}',
     None, [("get_weather", '{"unit": "fahrenheit", "rain": false}'), ("get_time", "{}")]),
    (LLAMA3_JSON, '<|python_tag|>{"name": "get_time", "parameters": {}}', None, [("get_time", "{}")]),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": '
              '{"unit": "celsius", "rain": false}}]',
     None, [("get_time", "{}"), ("get_weather", '{"unit": "celsius", "rain": false}')]),
    (MISTRAL, '[{"name": "get_time", "arguments": {"zone": "a \\"}\\" b"}}]', None,
     [("get_time", '{"zone": "a \\"}\\" b"}')]),  # the special token skipped; braces and quotes in a string
    (FORCED, '[ {"name": "get_time", "arguments": { } } ]', None, [("get_time", "{ }")]),
    (FORCED, '{"name": "get_time", "arguments": {}}', None, [("get_time", "{}")]),
]

# Replies that call no tool: all content.
NO_CALLS = [
    (HERMES, "It is sunny in Paris."),
    (HERMES, 'I would write <tool_call>{"name": "send_email", "arguments": {}}</tool_call>'),  # no such tool
    (HERMES, "Half a marker: <tool_ca"),
    (LLAMA3_JSON, 'The JSON is {"name": "get_time"}'),  # Llama 3's calls make the whole reply
    (MISTRAL, "[1, 2, 3]"),
]


def read_whole(reader: ToolReader, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = reader.whole(text)
    return content, [(call.name, call.arguments) for call in calls]


def read_streamed(reader: ToolReader, pieces: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The content and calls that a client joins from the stream's deltas (OpenAI's rules: a call's first delta
    has its id and name, the next ones add to its arguments)."""
    stream, content, calls = ToolCallStream(reader), "", {}
    deltas = [stream.feed(piece) for piece in pieces] + [stream.feed("", final=True)]
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["index"] not in calls and call["id"].startswith("call_")
                calls[call["index"]] = [call["function"]["name"], ""]
            calls[call["index"]][1] += call["function"]["arguments"]
    return (content or None) if calls else content, [tuple(call) for call in calls.values()]


def pieces_of(text: str, seed: int) -> list[str]:
    """`text` cut at random places, as tokens come."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // 3))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("fmt, text, content, calls", REPLIES, ids=lambda v: getattr(v, "name", None))
def test_calls_are_read_out_of_each_format(fmt, text, content, calls):
    assert read_whole(ToolReader(NAMES, True, fmt), text) == (content, calls)


@pytest.mark.parametrize("fmt, text", NO_CALLS, ids=lambda v: getattr(v, "name", None))
def test_a_reply_that_calls_no_tool_is_all_content(fmt, text):
    assert read_whole(ToolReader(NAMES, True, fmt), text) == (text, [])


@pytest.mark.parametrize("fmt, text", [(fmt, text) for fmt, text, _, _ in REPLIES] + NO_CALLS,
                         ids=lambda v: getattr(v, "name", None))
def test_streamed_deltas_join_into_the_whole_reply(fmt, text):
    reader = ToolReader(NAMES, True, fmt)
    for seed in range(5):
        assert read_streamed(reader, pieces_of(text, seed)) == read_whole(reader, text)
    assert read_streamed(reader, list(text)) == read_whole(reader, text)  # a character a delta


SLIPS = [
    '<tool_call>{"name": "get_time", "arguments": {"zone": </tool_call>',  # a small model's slip
    '<tool_call>{"name": "get_time", "arguments": {"zone": "UT',  # cut off by max_tokens
    '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"} "x"}</tool_call>',  # an object, then more
    '{"name": "get_time", "parameters": [1, 2]}',  # JSON, but no object
]


@pytest.mark.parametrize("text", SLIPS)
def test_a_whole_reply_whose_call_has_no_json_arguments_is_all_content(text):
    # returned as a call, it would be refused when the client sends it back in the next turn
    fmt = LLAMA3_JSON if text.startswith("{") else HERMES
    assert read_whole(ToolReader(NAMES, True, fmt), text) == (text, [])


@pytest.mark.parametrize("text", SLIPS)
def test_a_streamed_reply_whose_call_has_no_json_arguments_is_all_content_too(text):
    reader = ToolReader(NAMES, True, LLAMA3_JSON if text.startswith("{") else HERMES)
    for pieces in [pieces_of(text, 0), pieces_of(text, 1), list(text)]:
        assert read_streamed(reader, pieces) == (text, [])


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "one-call"])
def test_a_streamed_reply_drops_the_calls_that_the_whole_reply_drops(parallel):
    text = ('Let me look.\n<tool_call>{"name": "get_time", "arguments": {"zone": UTC}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"unit": "celsius", "rain": true}}</tool_call>')
    reader = ToolReader(NAMES, parallel, HERMES)
    whole = read_whole(reader, text)
    assert whole == (("Let me look.", [("get_weather", '{"unit": "celsius", "rain": true}')]) if parallel else
                     (text, []))
    for pieces in [pieces_of(text, 0), list(text)]:
        assert read_streamed(reader, pieces) == whole


def test_a_call_is_held_back_until_its_arguments_end():
    stream = ToolCallStream(ToolReader(NAMES, True, HERMES))
    text = '<tool_call>{"name": "get_weather", "arguments": {"unit": "celsius", "rain": true}'
    assert [stream.feed(c) for c in text] == [{}] * len(text)  # the arguments may still go on: not an object
    [call] = stream.feed("}")["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"unit": "celsius", "rain": true}'}
    assert stream.feed("</tool_call>") == {} and stream.feed("", final=True) == {}


def test_a_named_choice_reads_the_reply_as_the_functions_arguments():
    reader = ToolReader(NAMES, True, HERMES, function="get_weather")
    text = '{"unit": "celsius",\n "rain": true}'
    assert read_whole(reader, text) == (None, [("get_weather", text)])
    assert read_streamed(reader, pieces_of(text, 0)) == read_whole(reader, text)


def test_without_parallel_calls_only_the_first_call_is_kept():
    fmt, text, _, calls = REPLIES[0]
    assert read_whole(ToolReader(NAMES, False, fmt), text)[1] == calls[:1]


def test_the_call_format_follows_the_chat_template():
    assert ToolFormat.of("{{ '<|start_header_id|>' }}{% if tools %}{{ '\"parameters\"' }}{% endif %}") is LLAMA3_JSON
    assert ToolFormat.of("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}") is MISTRAL
    assert ToolFormat.of("{% for tool in tools %}<tools>{{ tool | tojson }}</tools>{% endfor %}<tool_call>") is HERMES
    assert ToolFormat.of("") is HERMES  # no tool format: tools are rendered in Hermes' format


# A chat template with a tool format, after Qwen2.5's: tools in the system turn, calls in <tool_call> tags.
QWEN_LIKE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>{"name": {{ call.function.name | tojson }}, "arguments": \
{{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def qwen_like_template() -> ChatTemplate:
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    tokenizer.chat_template = QWEN_LIKE
    return ChatTemplate.of(tokenizer)


def test_a_template_with_a_tool_format_renders_the_tools_and_the_calls_itself(qwen_like_template):
    assert qwen_like_template.renders_tools and qwen_like_template.format is HERMES
    prompt, head = qwen_like_template.render(HISTORY, ToolRequest.of(TOOLS, "auto"))
    assert json.dumps(WEATHER) in prompt and TOOLS_PROMPT.splitlines()[0] not in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"unit": "celsius", "rain": false}}</tool_call>' in prompt
    assert '<tool_response>{"temperature": 21}</tool_response>' in prompt
    assert head == ""  # no system message: the template's tools turn is not a head the request names


def test_a_template_without_a_tool_format_gets_the_tools_in_hermes_format():
    template = ChatTemplate.of(AutoTokenizer.from_pretrained(TINY_DIR))
    assert not template.renders_tools
    messages = [{"role": "system", "content": "You are terse."}, *HISTORY]
    prompt, head = template.render(messages, ToolRequest.of(TOOLS, "auto"))
    system = "You are terse.\n\n" + TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in TOOLS))
    assert head == f"<|im_start|>system\n{system}<|im_end|>\n" and prompt.startswith(head)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius", '
            '"rain": false}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temperature": 21}\n'
            '</tool_response><|im_end|>\n<|im_start|>assistant\n') in prompt


def test_a_model_without_a_chat_template_refuses_chats_naming_the_messages():
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    tokenizer.chat_template = None  # a base model's checkpoint
    with pytest.raises(ServerError, match="has no chat template") as refused:
        ChatTemplate.of(tokenizer).render([{"role": "user", "content": "Hi"}])
    assert refused.value.status == 400 and refused.value.field == "messages"

def test_tool_choice_none_leaves_the_tools_out_of_the_prompt():
    template = ChatTemplate.of(AutoTokenizer.from_pretrained(TINY_DIR))
    assert template.render(ASK, ToolRequest.of(TOOLS, "none")) == template.render(ASK)


# ---- the server, through the openai package ------------------------------------------------------------


@pytest.fixture
def oai(parrot_server):
    return openai.OpenAI(base_url=f"{parrot_server}/v1", api_key="unused", max_retries=0)


def schema_of(name: str) -> dict:
    return next(tool["function"]["parameters"] for tool in TOOLS if tool["function"]["name"] == name)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_a_forced_call_is_always_valid_at_temperature_1(oai, choice):
    for seed in range(4):
        reply = oai.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                            parallel_tool_calls=False, temperature=1, seed=seed, max_tokens=400)
        [answer] = reply.choices
        assert answer.finish_reason == "tool_calls" and answer.message.content is None
        [call] = answer.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert isinstance(choice, str) or call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))


def test_a_streamed_call_joins_into_the_whole_replys_call(oai):
    request = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=1, seed=7, max_tokens=400,
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = oai.chat.completions.create(**request).choices[0].message.tool_calls
    chunks = list(oai.chat.completions.create(**request, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    first, *rest = [d for delta in deltas for d in delta.tool_calls or []]
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather") and first.id
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest) and len(rest) > 1
    assert "".join(d.function.arguments for d in [first, *rest]) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_streamed_reply_whose_call_has_no_json_arguments_comes_as_content_as_the_whole_one(oai):
    slip = '<tool_call>{"name": "get_time", "arguments": {"zone": UTC}}</tool_call>'
    # The model made to write the slip (vLLM's guided_choice); the tools are offered, not forced.
    request = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200, extra_body={"guided_choice": [slip]})
    [answer] = oai.chat.completions.create(**request).choices
    assert (answer.message.content, answer.message.tool_calls, answer.finish_reason) == (slip, None, "stop")
    chunks = list(oai.chat.completions.create(**request, stream=True))
    assert all(chunk.choices[0].delta.tool_calls is None for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == slip
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_results_in_the_next_turn_are_rendered_into_the_prompt(oai, client):
    tokens = client.post("/tokenize", json={"messages": HISTORY, "tools": TOOLS}).json()["tokens"]
    prompt = client.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>' in prompt
    assert '"name": "get_weather", "arguments": {"unit": "celsius", "rain": false}' in prompt
    reply = oai.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS, max_tokens=3, temperature=0)
    assert reply.usage.prompt_tokens == len(tokens)


def test_tool_choice_none_answers_with_text(oai):
    reply = oai.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=3,
                                        temperature=0)
    plain = oai.chat.completions.create(model="tiny", messages=ASK, max_tokens=3, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("fields, field", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "send_email"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER, CLOCK, WEATHER]}, "tools.2.function.name"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{not json"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"tools": [CLOCK, {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools.1.function.parameters"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
], ids=["required-without-tools", "auto-without-tools", "unknown-function", "defined-twice", "arguments-not-json",
        "forced-schema-unusable", "forced-and-response-format"])
def test_bad_tool_fields_get_400_naming_them(client, fields, field):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 2, **fields}
    assert_refused(client.post("/v1/chat/completions", json=body), 400, field)


@pytest.mark.parametrize("fields, field", [
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
])
def test_malformed_tool_fields_get_400_naming_them(client, fields, field):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 2, **fields}
    assert_refused(client.post("/v1/chat/completions", json=body), 400, field)
