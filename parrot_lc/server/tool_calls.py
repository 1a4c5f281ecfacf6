"""Tool calling on /v1/chat/completions: the request's tools and tool choice checked, the tools and the chat's
earlier tool calls and results rendered into the prompt, the output constrained where a call is forced, and the
tool calls read out of the model's text, whole or as it streams.

Rendering. A chat template that takes `tools` (Llama 3.x, Qwen2.5, Hermes, Mistral) renders them itself, and the
assistant's earlier calls and the tool results (transformers' `apply_chat_template(tools=...)`, the calls'
arguments as objects). A template without a tool format (SmolLM2's) gets them in Hermes' format, which small
models are often trained on: the tools in the system message (`TOOLS_PROMPT`), each earlier call as
`<tool_call>{"name", "arguments"}</tool_call>` in the assistant's text, and tool results in a user turn as
`<tool_response>...</tool_response>`. With `tool_choice: "none"` the tools are left out (as vLLM does by default).

Reading. The format follows the template (`ToolFormat.of`): Hermes and Qwen2.5, `<tool_call>{json}</tool_call>`
blocks after any text; Llama 3 JSON, `{"name", "parameters"}` objects (`;`-separated) that make the whole reply
(after `<|python_tag|>`); Mistral, a `[TOOL_CALLS]` JSON array of `{"name", "arguments"}`. The engine's text
skips special tokens, so the Llama and Mistral formats also take their JSON at the start of the reply with no
marker. A forced call is constrained, as vLLM does: a named function's output is its arguments' JSON object, and
`required`'s a call `{"name", "arguments"}` over the tools' schemas or (with parallel calls) a JSON array of them.

A call counts once its name is complete and names one of the request's tools; its `arguments` are the model's
JSON text as written. Unless the reply is constrained to calls, a call whose arguments are no JSON object is
dropped, and a reply with no call left is all content. Streamed, the deltas join into the whole reply's message:
text before the calls streams as content; a constrained reply's call streams as it comes (its first delta carries
its id and name and the arguments written so far, the next ones the rest of its arguments' text), any other call
is held back until its arguments are written to their end and goes out whole if they are a JSON object (a call
sent before its arguments are known good could not be taken back); a stream that ends with no call sent sends
what it held back as content.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterator

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from parrot_lc.engine.constraints import Constraint
from parrot_lc.engine.errors import InvalidRequestError
from parrot_lc.engine.request import held_back
from parrot_lc.server.errors import ServerError

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML \
tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""
"""The tools of a chat whose template has no tool format, at the end of its system message (one is added if it
has none): each tool's OpenAI definition as a JSON line, and how to call one (Hermes' format)."""

ARGUMENT_KEYS = ("arguments", "parameters")  # what a call's arguments are called (`parameters`: Llama 3)


# ---- the request's tools ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolRequest:
    """A chat's `tools` (OpenAI's definitions), `tool_choice` (`none`, `auto`, `required`, or `function`: the
    named `function`) and `parallel_tool_calls` (false: at most one call)."""

    tools: list[dict[str, Any]]
    choice: str
    function: str | None = None
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None,
           parallel: bool = True) -> ToolRequest | None:
        """The request's tools checked: names unique, a named choice one of them, a choice that needs tools has
        them (ServerError naming the field). None where the chat has no tools."""
        tools = tools or []
        names = [tool["function"]["name"] for tool in tools]
        repeated = next((i for i, name in enumerate(names) if name in names[:i]), None)
        if repeated is not None:
            raise ServerError(f"tool {names[repeated]!r} is defined twice", f"tools.{repeated}.function.name")
        function = choice["function"]["name"] if isinstance(choice, dict) else None
        mode = "function" if function is not None else choice or ("auto" if tools else "none")
        if not tools:
            if mode != "none":
                raise ServerError("tool_choice needs tools: the request defines none", "tool_choice")
            return None
        if function is not None and function not in names:
            raise ServerError(f"tool_choice names function {function!r}, which is not among the tools "
                              f"({', '.join(names)})", "tool_choice.function.name")
        return cls(tools, mode, function, parallel)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool["function"]["name"] for tool in self.tools)

    @property
    def offered(self) -> bool:
        """Whether the model is shown the tools and its reply read for calls (not with `tool_choice: none`)."""
        return self.choice != "none"

    def schema(self, name: str) -> dict[str, Any]:
        """A function's arguments' JSON schema (an object of no properties where it has none)."""
        tool = next(tool for tool in self.tools if tool["function"]["name"] == name)
        return tool["function"].get("parameters") or {"type": "object", "properties": {}}

    def constraint(self) -> Constraint | None:
        """The output's constraint where a call is forced: a named function's arguments, or for `required` a
        call `{"name", "arguments"}` or an array of calls (not without parallel calls); None otherwise. A single
        call ends the reply once it is complete: small models that write an array tend to repeat its call until
        `max_tokens`. A forced function's parameters that are no JSON schema the engine can hold a reply to are a
        400 naming them."""
        if self.choice not in ("function", "required"):
            return None
        forced = [self.function] if self.choice == "function" else [tool["function"]["name"] for tool in self.tools]
        for name in forced:
            try:
                Constraint("json_schema", json.dumps(self.schema(name))).validate()
            except InvalidRequestError as exc:
                index = [tool["function"]["name"] for tool in self.tools].index(name)
                raise ServerError(f"function {name!r}: {exc}", f"tools.{index}.function.parameters") from exc
        if self.choice == "function":
            return Constraint("json_schema", json.dumps(self.schema(self.function)))
        calls = [{"type": "object", "properties": {"name": {"enum": [name]}, "arguments": self.schema(name)},
                  "required": ["name", "arguments"], "additionalProperties": False} for name in forced]
        array = [{"type": "array", "items": {"anyOf": calls}, "minItems": 1}] if self.parallel else []
        return Constraint("json_schema", json.dumps({"anyOf": calls + array}))

    def reader(self, template: ChatTemplate) -> ToolReader | None:
        """What reads calls out of the replies; None where tools are not offered."""
        if not self.offered:
            return None
        return ToolReader(self.names, self.parallel, FORCED if self.choice == "required" else template.format,
                          self.function)


# ---- rendering ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template, which renders chats with their tools: whether it renders tools itself (it reads a
    `tools` variable), and the format its model calls them in; `exists` is false for a model without one (a base
    model's checkpoint), whose chats are refused."""

    tokenizer: PreTrainedTokenizerBase
    renders_tools: bool
    format: ToolFormat
    exists: bool = True

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
        try:
            template = tokenizer.get_chat_template(tools=[])
        except ValueError:  # no chat template
            return cls(tokenizer, False, ToolFormat.of(""), exists=False)
        return cls(tokenizer, "tools" in template, ToolFormat.of(template))

    def render(self, messages: list[dict[str, Any]], tools: ToolRequest | None = None,
               add_generation_prompt: bool = True) -> tuple[str, str]:
        """The messages (OpenAI's shape: an assistant's `tool_calls`, a tool message's `tool_call_id`) and tools
        rendered, and the head of that prompt that the system messages rendered alone make: the part that many
        chats share (a long system prompt, the tools), or "" if none. A template that refuses the messages (roles
        out of its order), or a model without one, is a 400 naming them."""
        if not self.exists:  # as vLLM answers, rather than guess a format the model was not trained on
            raise ServerError("the model has no chat template (its tokenizer_config.json names none): send its prompts "
                              "to /v1/completions, or serve a checkpoint that has one", "messages")
        messages, offered = self.conversation(messages, tools)
        system = [m for m in messages if m["role"] == "system"]
        try:
            prompt = self.tokenizer.apply_chat_template(messages, tools=offered, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise ServerError(f"the model's chat template refuses these messages: {exc}", "messages") from exc
        try:
            head = self.tokenizer.apply_chat_template(system, tools=offered, tokenize=False) if system else ""
        except TemplateError:  # a template that puts the tools in the first user message wants one
            head = ""
        return prompt, head if prompt.startswith(head) else ""

    def conversation(self, messages: list[dict[str, Any]],
                     tools: ToolRequest | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages as the template takes them (the calls' arguments as objects, which templates write with
        `tojson`), and the tools to give it (None: none, or written into the messages)."""
        offered = tools.tools if tools is not None and tools.offered else None
        messages = [with_arguments(message, index) for index, message in enumerate(messages)]
        if self.renders_tools:
            return messages, offered
        return hermes_conversation(messages, offered), None


def with_arguments(message: dict[str, Any], index: int) -> dict[str, Any]:
    """The message with its tool calls' arguments (OpenAI's JSON text) as values; text that is no JSON is a 400
    naming it."""
    calls = []
    for number, call in enumerate(message.get("tool_calls") or []):
        try:
            arguments = json.loads(call["function"]["arguments"])
        except ValueError as exc:
            raise ServerError(f"a tool call's arguments are not JSON: {exc}",
                              f"messages.{index}.tool_calls.{number}.function.arguments") from exc
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": calls} if calls else message


def hermes_conversation(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """The messages for a template without a tool format, with the tools, the calls and the results written in
    Hermes' format (see the module's docstring), in the roles every template takes: a turn's tool results in one
    user message."""
    rendered: list[dict[str, str]] = []
    results = False  # whether the last message rendered holds tool results
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if results:
                rendered[-1] = {"role": "user", "content": f"{rendered[-1]['content']}\n{response}"}
            else:
                rendered.append({"role": "user", "content": response})
            results = True
            continue
        calls = [f"<tool_call>\n{json.dumps({'name': f['name'], 'arguments': f['arguments']})}\n</tool_call>"
                 for f in (call["function"] for call in message.get("tool_calls") or [])]
        rendered.append({"role": role, "content": "\n".join(([content] if content else []) + calls)})
        results = False
    if tools:
        prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in tools))
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{prompt}".lstrip()}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered


# ---- reading calls out of the text ------------------------------------------------------------------------

Span = tuple[int, int | None]  # a JSON value's text in a reply: its start and end (None: not ended yet)


def object_fields(text: str, start: int) -> tuple[dict[str, Span], int | None]:
    """The top-level fields of the JSON object that begins at `text[start]` (a "{"), as far as the text goes:
    each value's span, and where the object ends (after its "}"; None while it is open). It finds where values
    begin and end as a stream writes them, and checks nothing else: `json.loads` checks what it finds."""
    fields: dict[str, Span] = {}
    depth, phase, key, mark = 0, "key", "", start
    in_string = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 1 and phase == "key":
                    key, phase = loads(text[mark:i + 1], text[mark + 1:i]), "colon"
            continue
        if depth == 1 and phase == "value start" and not c.isspace():
            mark, phase = i, "value"
            fields[key] = (i, None)
        if c == '"':
            in_string = True
            if depth == 1 and phase == "key":
                mark = i
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                if phase == "value":
                    fields[key] = (mark, i)
                return fields, i + 1
        elif depth == 1 and c == ":" and phase == "colon":
            phase = "value start"
        elif depth == 1 and c == "," and phase == "value":
            fields[key], phase = (mark, i), "key"
    return fields, None


def loads(text: str, default: Any = None) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default


def value_text(text: str, span: Span) -> str:
    """A value's text as far as it goes (trailing blanks held: they may end it)."""
    return text[span[0]:span[1]].rstrip()


def call_objects(text: str, start: int) -> Iterator[tuple[dict[str, Span], int | None]]:
    """The JSON objects from `start` on (whatever is between them, markers or separators, skipped): each one's
    fields and end, the last maybe open."""
    position = text.find("{", start)
    while position != -1:
        fields, end = object_fields(text, position)
        yield fields, end
        if end is None:
            return
        position = text.find("{", end)


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes its calls: the text that begins them (`markers`), and the JSON that may begin the
    reply instead (`opening`: the characters it may begin with, after blanks)."""

    name: str
    markers: tuple[str, ...] = ()
    opening: str = ""

    @staticmethod
    def of(template: str) -> ToolFormat:
        """The format of a chat template's model: Mistral's, Llama 3's JSON, else Hermes' (Qwen2.5, Hermes, and
        the rendering of templates with no tool format)."""
        if "[TOOL_CALLS]" in template or "[AVAILABLE_TOOLS]" in template:
            return MISTRAL
        if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "parameters" in template):
            return LLAMA3_JSON
        return HERMES

    def start(self, text: str) -> int | None:
        """Where the calls begin in `text`, if they do."""
        found = [at for marker in self.markers if (at := text.find(marker)) != -1]
        first = len(text) - len(text.lstrip())
        if text[first:first + 1] and text[first] in self.opening:
            found.append(first)
        return min(found, default=None)

    def content_so_far(self, text: str) -> int:
        """How much of `text`, which holds no calls yet, is surely content: not what may begin a marker, nor
        blanks (content before calls ends without them)."""
        return len(text[:len(text) - held_back(text, self.markers)].rstrip())


HERMES = ToolFormat("hermes", markers=("<tool_call>",))
LLAMA3_JSON = ToolFormat("llama3_json", markers=("<|python_tag|>",), opening="{")
MISTRAL = ToolFormat("mistral", markers=("[TOOL_CALLS]",), opening="[")
FORCED = ToolFormat("required", opening="[{")  # the constrained output of tool_choice `required`


@dataclass(frozen=True)
class Reading:
    """What a reply's text holds: content (streamed: what may be sent) and calls, (name, arguments text), the last
    of which is `open` while its arguments are not written to their end."""

    content: str
    calls: list[tuple[str, str]]
    open: bool = False


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class ToolReader:
    """Reads the calls out of replies to a request with tools `names`: in `format`, or, for a named tool choice,
    the constrained reply that is `function`'s arguments object."""

    names: frozenset[str]
    parallel: bool
    format: ToolFormat
    function: str | None = None

    def read(self, text: str, final: bool) -> Reading:
        """The reply's content and calls as far as `text` goes (`final`: all of it). The content of a reply
        with calls is its text before them; a reply whose calls name no tool is all content."""
        if self.function is not None:
            return self.read_arguments(text, final)
        start = self.format.start(text)
        calls = self.calls(text, start) if start is not None else []
        if calls:
            calls = calls if self.parallel else calls[:1]
            return Reading(text[:start].rstrip(), [(name, arguments) for name, arguments, _ in calls],
                           open=not calls[-1][2])
        if final:
            return Reading(text, [])
        return Reading(text[:self.format.content_so_far(text) if start is None else start].rstrip(), [])

    def read_arguments(self, text: str, final: bool) -> Reading:
        first = len(text) - len(text.lstrip())
        if text[first:first + 1] != "{":
            return Reading(text if final else "", [])
        _, end = object_fields(text, first)
        return Reading("", [(self.function, value_text(text, (first, end)))], open=end is None)

    def calls(self, text: str, start: int) -> list[tuple[str, str, bool]]:
        """The calls from `start` on: name, arguments' text, and whether the arguments are written to their end."""
        calls = []
        for fields, end in call_objects(text, start):
            name = fields.get("name")
            name = loads(value_text(text, name)) if name is not None and name[1] is not None else None
            if not isinstance(name, str) or name not in self.names:
                continue
            spans = [fields[key] for key in ARGUMENT_KEYS if key in fields]
            if spans:
                calls.append((name, value_text(text, min(spans)), min(spans)[1] is not None))
            else:
                calls.append((name, "{}" if end is not None else "", end is not None))
        return calls

    @property
    def constrained(self) -> bool:
        """Whether the reply is constrained to calls (a forced call): its calls are kept as written."""
        return self.function is not None or self.format is FORCED

    def keeps(self, arguments: str) -> bool:
        """Whether a call with these arguments (all of them) is returned as one. Unless the reply was constrained
        to calls, only with a JSON object: a small model's slip, or a reply cut off by max_tokens, returned as a
        call would be refused when the client sends it back in the next turn (vLLM's tool parsers answer such a
        reply as content too)."""
        return self.constrained or isinstance(loads(arguments), dict)

    def whole(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole reply's content (None if it only calls) and the calls it `keeps`: with none left, the reply is
        all content."""
        reading = self.read(text, final=True)
        calls = [ToolCall(call_id(), name, arguments) for name, arguments in reading.calls if self.keeps(arguments)]
        if not calls:
            return text, []
        return reading.content or None, calls


@dataclass
class StreamedCall:
    id: str
    sent: int = 0  # characters of its arguments sent


@dataclass
class ToolCallStream:
    """One choice's streamed reply read for calls: each text delta in, the delta's fields out (OpenAI's
    `content` and `tool_calls`), which join into the message that `ToolReader.whole` makes of the whole text."""

    reader: ToolReader
    text: str = ""
    sent: int = 0  # characters of content sent
    calls: list[StreamedCall] = field(default_factory=list)

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """The delta's fields once the reply has `text` more (`final`: the reply ends here); {} if nothing new
        can be sent yet."""
        self.text += text
        reading = self.reader.read(self.text, final)
        if self.reader.constrained:  # its calls are kept whatever their arguments: they stream as they come
            return self._fields(reading.content, reading.calls)
        # Any other call is known good or bad once its arguments end (calls end in order: only the last may be open).
        known = reading.calls[:-1] if reading.open and not final else reading.calls
        kept = [(name, arguments) for name, arguments in known if self.reader.keeps(arguments)]
        return self._fields(self.text if final and not kept else reading.content, kept)

    def _fields(self, content: str, calls: list[tuple[str, str]]) -> dict[str, Any]:
        """The fields that send what `content` and `calls` hold beyond what was sent."""
        delta: dict[str, Any] = {}
        if len(content) > self.sent:
            delta["content"], self.sent = content[self.sent:], len(content)
        deltas = []
        for index, (name, arguments) in enumerate(calls):
            if index == len(self.calls):
                self.calls.append(StreamedCall(call_id(), len(arguments)))
                deltas.append({"index": index, **ToolCall(self.calls[index].id, name, arguments).openai()})
            elif len(arguments) > self.calls[index].sent:
                deltas.append({"index": index, "function": {"arguments": arguments[self.calls[index].sent:]}})
                self.calls[index].sent = len(arguments)
        if deltas:
            delta["tool_calls"] = deltas
        return delta
