"""ChatParrot: a LangChain chat model served by Parrot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_openai_messages,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
    make_invalid_tool_call,
    parse_tool_call,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableGenerator, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, Field, field_validator
from pydantic_core import from_json

from parrot_lc.frontend import Completion, MessageDict
from parrot_lc.integrations.langchain._base import (
    CALL_OPTIONS, PARAMS_CONFIG, ParrotParams, StreamEnd, summed_usage,
)
from parrot_lc.integrations.langchain._errors import raises_langchain_errors
from parrot_lc.integrations.langchain._trace import current_trace

_ROLES = {"system", "developer", "user", "assistant", "tool"}
_NON_TEXT_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "file", "video", "document"}
_REQUEST_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "logprobs", "top_logprobs", "n")
"""Keyword arguments of a call sent as the request's fields: tools and a response format (bound by `bind_tools` and
`with_structured_output`), log-probabilities (`bind(logprobs=True, top_logprobs=k)`) and the number of replies."""
_STRUCTURED_FORMATS = ("json_object", "json_schema")
"""The response formats whose replies are parsed: one cut by `max_tokens` raises rather than being parsed in part."""

__all__ = ["ChatParrot", "LengthFinishReasonError"]


class LengthFinishReasonError(OutputParserException):
    """A structured reply cut short by `max_tokens` (finish reason `"length"`), raised rather than parsed in part
    (LangChain's JSON parsers would complete a cut JSON text without a word): the error ChatOpenAI raises (the
    `openai` package's of this name), with its message. `llm_output` holds the text that was cut."""

    def __init__(self, text: str, usage: dict[str, Any] | None = None, reason: str = "") -> None:
        message = "Could not parse response content as the length limit was reached"
        super().__init__(message + (f" - {usage}" if usage else "") + reason, llm_output=text)


class ChatParrot(ParrotParams, BaseChatModel):
    """A chat model on a Parrot server (`parrot-lc serve`), or on a server in this process.

    Messages go through the frontend's clients (`parrot_client()`: `chat`, `stream_chat`) to the server's
    OpenAI-compatible `/v1/chat/completions`, which renders them with the model's chat template; chats that share
    their system messages share that prefix's KV cache on the server. Text only: no images (a message with an
    image, audio or file part raises ValueError).

    Inside `deferred(chain)`, every call (of any method) without tools is recorded in the run's graph instead: its
    messages are rendered with the model's chat template around the values not known yet (see `_chat_layout`), so
    chats that share their system prompt share it on the server; its reply's `finish_reason` is a value not known yet,
    as its text is, and it has no usage metadata. `get_num_tokens_from_messages` counts the prompt
    the server makes of the messages (its `input_tokens`), `get_num_tokens` a text, with the served model's
    tokenizer.

    Each reply carries `usage_metadata` (`input_tokens`, `output_tokens`, `total_tokens`, and in
    `input_token_details.cache_read` the prompt tokens whose KV the server had already) and
    `response_metadata` (`finish_reason`: `"stop"`, `"length"` or `"tool_calls"`, `model_name`); streamed, they
    come with the last chunk. A call bound with `logprobs=True` (and `top_logprobs`) has OpenAI's
    `response_metadata["logprobs"]` (`content`: each token's `logprob` and `top_logprobs`), chunk by chunk when
    streamed. Server errors raise `parrot_lc.frontend.ParrotError` subclasses with the server's message, each also
    langchain-core's error of its condition (`ContextOverflowError` for a prompt longer than the model's context,
    `ModelRateLimitError`, `ModelAuthenticationError`...: `_errors`), as ChatOpenAI's are; a constructor argument or a call option that ChatParrot does not take raises before any request.

    As a stand-in for LangChain's ChatOpenAI it takes ChatOpenAI's common arguments with their meaning: `model`
    (or `model_name`), `base_url`, `api_key`, `temperature`, `max_tokens` (or `max_completion_tokens`), `top_p`,
    `frequency_penalty`, `presence_penalty`, `seed`, `stop`, `n`, `logprobs`, `top_logprobs`, `timeout`,
    `max_retries`, `streaming`, `stream_usage`, `model_kwargs`, `extra_body`, `default_headers`, `default_query` and
    `organization`; and a call's `n`, `logprobs` and `stream_usage`. `reasoning_effort`, `http_client` and
    `http_async_client` are taken as None only (see their fields).

    Tools: `bind_tools` (LangChain tools, functions, Pydantic classes, TypedDicts or OpenAI tool dicts) sends them
    with the chat; the server renders them with the model's chat template and reads its calls into
    `AIMessage.tool_calls` (streamed: `tool_call_chunks`). `tool_choice="any"` (or `"required"`, `True`) or a
    tool's name forces a call, constrained to the tools' schemas: a valid call always comes back.
    `with_structured_output` (`method="json_schema"`, the default, `"function_calling"` or `"json_mode"`) gives
    Pydantic objects or dicts, its output constrained to the schema (to JSON in JSON mode). A reply with a JSON
    response format that `max_tokens` cuts raises `LengthFinishReasonError` (as ChatOpenAI does), and so does, at
    its parser, a structured output's reply cut short by any method. Inside `deferred`, a call with a response
    format is recorded with its output so constrained; a call with tools runs at once, on real text (its reply's
    calls are read on the server).

    Example:
        ```python
        from parrot_lc import ChatParrot

        chat = ChatParrot(base_url="http://127.0.0.1:9000", max_tokens=128, temperature=0)
        reply = chat.invoke([("system", "You are terse."), ("human", "What is a parrot?")])
        print(reply.content, reply.usage_metadata)
        for chunk in chat.stream("Tell me a story"):
            print(chunk.content, end="")

        local = ChatParrot()  # SmolLM2-135M-Instruct, in this process (started on first use)
        ```
    """

    model_config = PARAMS_CONFIG
    _call_options = CALL_OPTIONS | set(_REQUEST_OPTIONS) | {"stream_usage"}
    _request_fields = ("n", "logprobs", "top_logprobs")

    logprobs: bool | None = None
    """Whether replies carry their tokens' log-probabilities (`response_metadata["logprobs"]`), as a call bound
    with `logprobs=True` does."""

    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With `logprobs`: the most likely tokens at each position, with their log-probabilities (at most 20)."""

    stream_usage: bool = True
    """Whether a stream ends with `usage_metadata` on its last chunk (ChatOpenAI's option; a call may set it too:
    `stream(..., stream_usage=False)`). On by default, as ChatOpenAI has it against OpenAI's API: a Parrot
    server always counts a stream's tokens."""

    reasoning_effort: str | None = None
    """ChatOpenAI's option for reasoning models: the served models have no reasoning mode, so only None is taken
    (any other value is refused, naming the field, rather than ignored)."""

    @field_validator("reasoning_effort")
    @classmethod
    def _no_reasoning_mode(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError(f"reasoning_effort={value!r} is not taken: the served models have no reasoning mode "
                             "(leave it unset)")
        return None

    @field_validator("model_kwargs")
    @classmethod
    def _call_options_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        """ChatParrot's `model_kwargs` are keyword arguments of every call (`_call_kwargs`): a field it would not
        send is refused, naming it, rather than dropped (arguments of their own are refused by ParrotParams)."""
        arguments = cls._argument_names()
        unknown = sorted(set(value) - cls._call_options - arguments)
        if unknown:
            raise ValueError(f"{unknown}: no request fields that ChatParrot sends; model_kwargs takes "
                             f"{sorted(cls._call_options - arguments)}")
        return value

    @property
    def _llm_type(self) -> str:
        return "parrot-chat"

    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None]) -> dict[str, Any]:
        """`generate`'s `llm_output` for its chats: their `token_usage` summed and the model, as ChatOpenAI's
        (LangChain's base class gives `{}`). Streamed and deferred replies have none to add."""
        outputs = [output for output in llm_outputs if output]
        model = next((output["model_name"] for output in outputs if output.get("model_name")), None)
        return {"token_usage": summed_usage(output.get("token_usage") for output in outputs),
                "model_name": model or self._reply_model_name()}

    @raises_langchain_errors
    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """The tokens of the prompt the server makes of `messages` (rendered with the chat template, with `tools`,
        anything `bind_tools` takes, ending with the start of the assistant's turn): a reply's `input_tokens`."""
        messages = self._known(messages, "ChatParrot.get_num_tokens_from_messages")
        formatted = [convert_to_openai_tool(tool) for tool in tools or []]
        return len(self.parrot_client().tokenize(messages=_chat_messages(messages), model=self._requested_model(),
                                                 tools=formatted))

    # ---- tools and structured output -------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The model with `tools` (anything `convert_to_openai_tool` takes) sent with each chat. `tool_choice`:
        `"auto"` (the default), `"none"`, `"any"` / `"required"` / `True` (some call), a tool's name or OpenAI's
        `{"type": "function", "function": {"name": ...}}`; forced calls are constrained to valid ones.
        `parallel_tool_calls=False`: at most one call a reply. `strict`: marks the tools strict (OpenAI's flag;
        a forced call follows its schema either way)."""
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        if tool_choice is not None and tool_choice is not False:
            kwargs["tool_choice"] = _openai_tool_choice(tool_choice)
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """The model's replies as `schema` (a Pydantic class, which gives its instances; a TypedDict or a JSON
        schema, which give dicts), by `method`: `"json_schema"` constrains the reply to the schema,
        `"function_calling"` forces a call of a tool of that schema, `"json_mode"` constrains the reply to a JSON
        object (the prompt should ask for the fields). `include_raw`: `{"raw", "parsed", "parsing_error"}`.
        `strict` is accepted for LangChain's sake: the server holds a schema's output to it either way."""
        if kwargs:
            raise ValueError(f"ChatParrot.with_structured_output: unsupported arguments {sorted(kwargs)}")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            model = self.bind_tools([schema], tool_choice=name, parallel_tool_calls=False, strict=strict, **traced)
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic
                                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            response_format = {"type": "json_object"} if method == "json_mode" else _json_schema_format(schema)
            model = self.bind(response_format=response_format, **traced)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        else:
            raise ValueError(f"ChatParrot.with_structured_output: unknown method {method!r} (json_schema, "
                             "function_calling or json_mode)")
        parser = _whole_reply(json_output=method != "function_calling") | parser
        if not include_raw:
            return model | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=model) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    # ---- inside `deferred(chain)`: record the call in the run's graph --------------------------------------

    def _record(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> str | None:
        """Inside a deferred run: records the chat's call in its graph and returns its reply (a value not known
        yet); None outside one, or where the call must run now (see `Trace.can_record`, a chat template that
        does not insert contents as they are, and a call with tools or tool messages: its reply's calls are read
        on the server, and its prompt holds more than the messages' contents; a call that asks for
        log-probabilities, which a graph's outputs do not carry). A response format is recorded as
        the output's constraint, as the chat route applies it; a JSON one's reply that `max_tokens` cuts raises
        LengthFinishReasonError where it is read and at the run's end (the eager call raises it at once)."""
        trace = current_trace()
        if trace is None:
            return None
        if _parsed_class(kwargs) is not None:  # the reply carries the object parsed from its real text
            trace.note(type(self).__name__, "calls with a pydantic class as response_format run at once")
            return None
        chat = _chat_messages(messages)
        constraint = _output_constraint(kwargs.get("response_format"))
        if (any(kwargs.get(name) for name in ("tools", "tool_choice")) or constraint is False
                or any(m["role"] == "tool" or "tool_calls" in m for m in chat)):
            trace.note(type(self).__name__, "calls with tools run at once, on real text")
            return None
        if self._needs_a_request(trace, kwargs) or not trace.can_record(self, kwargs):
            return None
        prompt = trace.chat_prompt(self, chat)
        if prompt is None:
            return None
        sampling = self._graph_sampling(stop, kwargs)
        on_cut = LengthFinishReasonError if _structured(kwargs) else None  # where the eager call raises it
        return trace.record([prompt], {**sampling, "constraint": constraint} if constraint else sampling,
                            field="messages", on_cut=on_cut)[0]

    def _call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's keyword arguments over `model_kwargs` and the fields that the request sends as they are."""
        return super()._call_kwargs({**self.model_kwargs, **kwargs})

    def _stream_usage(self, kwargs: dict[str, Any]) -> bool:
        usage = kwargs.get("stream_usage")
        return usage if isinstance(usage, bool) else self.stream_usage

    def _chat_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The chat request's options: the model, sampling, the tools, response format and log-probabilities
        bound, and `extra_body`'s fields."""
        fields = {name: kwargs[name] for name in _REQUEST_OPTIONS if kwargs.get(name) is not None}
        if fields.get("tools") == []:  # `bind_tools([])`, an agent of no tools: a chat without any (the API refuses [])
            del fields["tools"]
        schema = _parsed_class(kwargs)
        if schema is not None:
            fields["response_format"] = _json_schema_format(schema)
        return self._request_options(stop, kwargs, **fields)

    def _recorded_result(self, text: str, kwargs: dict[str, Any]) -> ChatResult:
        metadata = self._recorded_metadata(text, kwargs)
        message = AIMessage(content=text, response_metadata=metadata)
        info = {"finish_reason": metadata["finish_reason"]}
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _recorded_metadata(self, reply: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The `response_metadata` of a chat recorded in a deferred run, whose reply is `reply`: its finish reason is
        a value not known yet, as its reply is (marked text, see `Trace.finish_reason`). No usage metadata: counts,
        which LangChain adds up, cannot wait."""
        trace = current_trace()
        assert trace is not None, "recorded in it"
        return {"finish_reason": trace.finish_reason(reply), "model_name": self._reply_model_name(kwargs.get("model")),
                "model_provider": "parrot"}

    # ---- whole replies ------------------------------------------------------------------------------

    @raises_langchain_errors
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        kwargs = self._call_kwargs(kwargs)
        recorded = self._record(messages, stop, kwargs)
        if recorded is not None:
            return self._recorded_result(recorded, kwargs)
        messages = self._known(messages, "ChatParrot.generate")
        client = self.parrot_client(kwargs.get("model"))
        reply = client.chat(_chat_messages(messages), **self._chat_options(stop, kwargs))
        return _chat_result(reply, _structured(kwargs), _parsed_class(kwargs))

    @raises_langchain_errors
    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        kwargs = self._call_kwargs(kwargs)
        if current_trace() is not None:  # recording asks the server for the chat template's layout
            recorded = await asyncio.to_thread(self._record, messages, stop, kwargs)
            if recorded is not None:  # its metadata may ask the server which model it serves
                return await asyncio.to_thread(self._recorded_result, recorded, kwargs)
            messages = await asyncio.to_thread(self._known, messages, "ChatParrot.agenerate")
        client = await self._async_client(kwargs.get("model"))
        reply = await client.chat(_chat_messages(messages), **self._chat_options(stop, kwargs))
        return _chat_result(reply, _structured(kwargs), _parsed_class(kwargs))

    # ---- streamed replies ---------------------------------------------------------------------------

    @raises_langchain_errors
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        kwargs = self._streamed_call_kwargs(kwargs)
        recorded = self._record(messages, stop, kwargs)
        if recorded is not None:
            chunk = _recorded_chunk(recorded, self._recorded_metadata(recorded, kwargs))
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
            return
        messages = self._known(messages, "ChatParrot.stream")
        end = StreamEnd()
        client = self.parrot_client(kwargs.get("model"))
        for piece in client.stream_chat(_chat_messages(messages), **self._chat_options(stop, kwargs)):
            end.note(piece)
            if piece.text or piece.tool_calls:
                chunk = _chunk(piece)
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        chunk = _last_chunk(end, _structured(kwargs), self._stream_usage(kwargs))
        if run_manager:
            run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk

    @raises_langchain_errors
    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        kwargs = self._streamed_call_kwargs(kwargs)
        if current_trace() is not None:
            recorded = await asyncio.to_thread(self._record, messages, stop, kwargs)
            if recorded is not None:
                metadata = await asyncio.to_thread(self._recorded_metadata, recorded, kwargs)
                chunk = _recorded_chunk(recorded, metadata)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
                return
            messages = await asyncio.to_thread(self._known, messages, "ChatParrot.astream")
        end = StreamEnd()
        client = await self._async_client(kwargs.get("model"))
        async for piece in client.stream_chat(_chat_messages(messages), **self._chat_options(stop, kwargs)):
            end.note(piece)
            if piece.text or piece.tool_calls:
                chunk = _chunk(piece)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        chunk = _last_chunk(end, _structured(kwargs), self._stream_usage(kwargs))
        if run_manager:
            await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk


# ---- conversions ------------------------------------------------------------------------------------


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, (ToolMessage, FunctionMessage)):
        return "tool"
    if isinstance(message, ChatMessage):
        role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
        if role in _ROLES:
            return role
        raise ValueError(f"ChatParrot: unsupported chat message role {message.role!r} (one of {sorted(_ROLES)})")
    raise ValueError(f"ChatParrot: unsupported message type {type(message).__name__}")


def _text(content: str | Sequence[Any]) -> str:
    """A message's text: its string, or its text parts joined; other parts the model cannot read raise."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind == "text":
                texts.append(part.get("text", ""))
            elif kind in _NON_TEXT_PARTS:
                raise ValueError(f"ChatParrot takes text only: a message has a {kind!r} part")
            # other parts (reasoning, tool calls, ...) carry no text for the prompt
    return "".join(texts)


def _chat_messages(messages: list[BaseMessage]) -> list[MessageDict]:
    """LangChain's messages as the frontend's chat takes them: an AI message's tool calls and a tool message's
    call id with them (OpenAI's shape)."""
    return [_chat_message(message) for message in messages]


def _chat_message(message: BaseMessage) -> MessageDict:
    chat: MessageDict = {"role": _role(message), "content": _text(message.content)}
    if isinstance(message, AIMessage) and message.tool_calls:
        calls = convert_to_openai_messages(AIMessage("", tool_calls=message.tool_calls))["tool_calls"]
        chat["tool_calls"] = [{**call, "id": call["id"] or ""} for call in calls]  # OpenAI's ids are strings
    if isinstance(message, ToolMessage):
        chat["tool_call_id"] = message.tool_call_id
    return chat


def _output_constraint(response_format: dict[str, Any] | None) -> dict[str, Any] | None | Literal[False]:
    """OpenAI's `response_format` as the constraint of a graph call's output (the Parrot API's); None for plain
    text, False for a format that has none."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema" and "schema" in response_format.get("json_schema", {}):
        return {"json_schema": response_format["json_schema"]["schema"]}
    return None if kind == "text" else False


def _openai_tool_choice(choice: str | bool | dict[str, Any]) -> str | dict[str, Any]:
    """LangChain's tool choice as OpenAI's: `"any"` and `True` are `"required"`, another name a function's."""
    if choice is True or choice == "any":
        return "required"
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        return {"type": "function", "function": {"name": choice}}
    return choice


def _tool_calls(raw: list[dict[str, Any]] | None) -> dict[str, list]:
    """A reply's calls (OpenAI's) as an AIMessage's `tool_calls`, and those whose arguments are no JSON object as
    its `invalid_tool_calls`."""
    valid, invalid = [], []
    for call in raw or []:
        try:
            valid.append(parse_tool_call(call, return_id=True))
        except Exception as exc:  # an OutputParserException, or arguments JSON but no object
            invalid.append(make_invalid_tool_call(call, str(exc)))
    return {"tool_calls": valid, "invalid_tool_calls": invalid}


def _chunk(piece: Completion) -> ChatGenerationChunk:
    """A stream piece: its text and its calls' deltas (`tool_call_chunks`, which LangChain joins by index)."""
    chunks = [tool_call_chunk(name=call.get("function", {}).get("name"), args=call.get("function", {}).get("arguments"),
                              id=call.get("id"), index=call.get("index")) for call in piece.tool_calls or []]
    metadata = {"logprobs": piece.logprobs} if piece.logprobs else {}  # LangChain joins chunks' `content` lists
    return ChatGenerationChunk(message=AIMessageChunk(content=piece.text, tool_call_chunks=chunks,
                                                      response_metadata=metadata))


def _usage_metadata(usage: dict[str, int] | None) -> UsageMetadata | None:
    if usage is None:
        return None
    input_tokens, output_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    metadata = UsageMetadata(input_tokens=input_tokens, output_tokens=output_tokens,
                             total_tokens=usage.get("total_tokens", input_tokens + output_tokens))
    if "cached_tokens" in usage:  # the prompt tokens the server did not compute (a shared prefix, cached blocks)
        metadata["input_token_details"] = InputTokenDetails(cache_read=usage["cached_tokens"])
    return metadata


def _chat_result(reply: Completion, structured: bool, parse_as: type[BaseModel] | None = None) -> ChatResult:
    """A reply as LangChain's result: a generation per choice, each message with the request's usage (as
    ChatOpenAI gives it) and, asked with a pydantic class as `response_format`, the object parsed from it in
    `additional_kwargs["parsed"]` (as ChatOpenAI's); a structured reply that `max_tokens` cut raises."""
    choices = [reply, *reply.others]
    for choice in choices:
        if structured and choice.finish_reason == "length":
            raise LengthFinishReasonError(choice.text, _openai_usage(reply.usage))
    generations = []
    for choice in choices:
        metadata = {"finish_reason": choice.finish_reason, "model_name": reply.model, "model_provider": "parrot"}
        if choice.logprobs:
            metadata["logprobs"] = choice.logprobs
        message = AIMessage(content=choice.text, usage_metadata=_usage_metadata(reply.usage),
                            response_metadata=metadata, **_tool_calls(choice.tool_calls))
        if parse_as is not None:
            message.additional_kwargs["parsed"] = parse_as.model_validate_json(choice.text)
        generations.append(ChatGeneration(message=message, generation_info={"finish_reason": choice.finish_reason}))
    return ChatResult(generations=generations,
                      llm_output={"token_usage": _openai_usage(reply.usage), "model_name": reply.model})


def _openai_usage(usage: dict[str, int] | None) -> dict[str, Any] | None:
    """A reply's usage as OpenAI's API has it (ChatOpenAI's `token_usage`, which LangChain also puts in a single
    reply's `response_metadata`): the cached prompt tokens in `prompt_tokens_details`."""
    if usage is None:
        return None
    openai_usage: dict[str, Any] = {k: v for k, v in usage.items() if k != "cached_tokens"}
    if "cached_tokens" in usage:
        openai_usage["prompt_tokens_details"] = {"cached_tokens": usage["cached_tokens"]}
    return openai_usage


def _recorded_chunk(reply: str, metadata: dict[str, Any]) -> ChatGenerationChunk:
    """The one chunk of a chat recorded in a deferred run: its whole reply, with the metadata of a stream's end."""
    message = AIMessageChunk(content=reply, response_metadata=metadata)
    return ChatGenerationChunk(message=message, generation_info={"finish_reason": metadata["finish_reason"]})


def _last_chunk(end: StreamEnd, structured: bool, with_usage: bool) -> ChatGenerationChunk:
    """The last chunk: no text; finish reason, model name and (`with_usage`) the usage, set on this chunk only. A
    structured reply that `max_tokens` cut raises instead."""
    if structured and end.finish_reason == "length":
        raise LengthFinishReasonError(end.text, _openai_usage(end.usage))
    metadata = {"finish_reason": end.finish_reason, "model_name": end.model, "model_provider": "parrot"}
    usage = _usage_metadata(end.usage) if with_usage else None
    message = AIMessageChunk(content="", usage_metadata=usage, response_metadata=metadata, chunk_position="last")
    return ChatGenerationChunk(message=message, generation_info={"finish_reason": end.finish_reason})


def _structured(kwargs: dict[str, Any]) -> bool:
    """Whether a call's response format is one whose replies are parsed (JSON)."""
    response_format = kwargs.get("response_format")
    return _parsed_class(kwargs) is not None or (isinstance(response_format, dict)
                                                  and response_format.get("type") in _STRUCTURED_FORMATS)


def _parsed_class(kwargs: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic class given as a call's `response_format` (ChatOpenAI's `invoke(..., response_format=Person)`),
    if it is one: the request asks for its JSON schema, and the reply carries the parsed object."""
    response_format = kwargs.get("response_format")
    return response_format if isinstance(response_format, type) and is_basemodel_subclass(response_format) else None


def _json_schema_format(schema: Any) -> dict[str, Any]:
    """OpenAI's `json_schema` response format of a schema (a pydantic class, a TypedDict, a JSON schema dict)."""
    json_schema = convert_to_json_schema(schema)
    named = {"name": json_schema.get("title") or "output", "schema": json_schema, "strict": True}
    return {"type": "json_schema", "json_schema": named}


@dataclass
class _ReplySeen:
    """What a structured output's check has seen of a reply (whole, or chunk by chunk)."""

    json_output: bool
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None

    def note(self, message: BaseMessage) -> None:
        self.texts.append(str(message.content))  # a deferred run's value: its real text (str() waits for it)
        self.finish_reason = message.response_metadata.get("finish_reason") or self.finish_reason
        usage = getattr(message, "usage_metadata", None)  # LangChain's names; the error says OpenAI's, as elsewhere
        if usage:
            self.usage = {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
                          "total_tokens": usage["total_tokens"]}

    def check(self) -> None:
        """Raises if the reply was cut short: its finish reason is "length", or the JSON of a constrained output
        does not end (a stop sequence)."""
        text = "".join(self.texts)
        if self.finish_reason == "length":
            raise LengthFinishReasonError(text, self.usage)
        if self.json_output and not _complete_json(text):
            raise LengthFinishReasonError(text, self.usage, ": the reply ends before its JSON does (cut by "
                                          "max_tokens or a stop sequence)")


def _whole_reply(json_output: bool) -> Runnable:
    """The step before a structured output's parser: the reply goes on as it comes (a stream still streams), and
    one cut short raises LengthFinishReasonError at its end rather than being parsed in part (`json_output`: the
    reply's text is JSON)."""

    def check(messages: Iterator[BaseMessage]) -> Iterator[BaseMessage]:
        seen = _ReplySeen(json_output)
        for message in messages:
            seen.note(message)
            yield message
        seen.check()

    async def acheck(messages: AsyncIterator[BaseMessage]) -> AsyncIterator[BaseMessage]:
        seen = _ReplySeen(json_output)
        async for message in messages:
            seen.note(message)
            yield message
        seen.check()

    return RunnableGenerator(check, acheck, name="whole_reply")


def _complete_json(text: str) -> bool:
    try:
        from_json(text)  # strict: a JSON text cut short is no JSON value (LangChain's parsers would complete it)
    except ValueError:
        return False
    return True
