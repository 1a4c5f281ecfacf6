"""ChatParrot: a LangChain chat model served by Parrot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from parrot_lc.frontend import Completion, MessageDict
from parrot_lc.integrations.langchain._base import ParrotParams, StreamEnd
from parrot_lc.integrations.langchain._trace import current_trace

_ROLES = {"system", "developer", "user", "assistant", "tool"}
_NON_TEXT_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "file", "video", "document"}

__all__ = ["ChatParrot"]


class ChatParrot(ParrotParams, BaseChatModel):
    """A chat model on a Parrot server (`parrot-lc serve`), or on a server in this process.

    Messages go through the frontend's clients (`parrot_client()`: `chat`, `stream_chat`) to the server's
    OpenAI-compatible `/v1/chat/completions`, which renders them with the model's chat template; chats that share
    their system messages share that prefix's KV cache on the server. Text only: no tool calling, structured
    output or images (a message with an image, audio or file part raises ValueError).

    Inside `deferred(chain)`, every call (of any method) is recorded in the run's graph instead: its messages are
    rendered with the model's chat template around the values not known yet (see `_chat_layout`), so chats that
    share their system prompt share it on the server. `get_num_tokens_from_messages` counts the prompt the server
    makes of the messages (its `input_tokens`), `get_num_tokens` a text, with the served model's tokenizer.

    Each reply carries `usage_metadata` (`input_tokens`, `output_tokens`, `total_tokens`) and
    `response_metadata` (`finish_reason`: `"stop"` or `"length"`, `model_name`); streamed, they come with the
    last chunk. Server errors raise `parrot_lc.frontend.ParrotError` subclasses with the server's message.

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

    @property
    def _llm_type(self) -> str:
        return "parrot-chat"

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """The tokens of the prompt the server makes of `messages` (rendered with the chat template, ending with
        the start of the assistant's turn): a reply's `input_tokens`. ChatParrot takes no tools: `tools` is
        ignored."""
        messages = self._known(messages, "ChatParrot.get_num_tokens_from_messages")
        return len(self.parrot_client().tokenize(messages=_chat_messages(messages), model=self._requested_model()))

    # ---- inside `deferred(chain)`: record the call in the run's graph --------------------------------------

    def _record(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> str | None:
        """Inside a deferred run: records the chat's call in its graph and returns its reply (a value not known
        yet); None outside one, or where the call must run now (see `Trace.can_record`, and a chat template that
        does not insert contents as they are)."""
        trace = current_trace()
        if trace is None or not trace.can_record(self, kwargs):
            return None
        prompt = trace.chat_prompt(self, _chat_messages(messages))
        return trace.record([prompt], self._sampling(stop, kwargs))[0] if prompt is not None else None

    def _recorded_result(self, text: str, kwargs: dict[str, Any]) -> ChatResult:
        metadata = {"model_name": self._model_name(kwargs.get("model")), "model_provider": "parrot"}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text, response_metadata=metadata))])

    # ---- whole replies ------------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        recorded = self._record(messages, stop, kwargs)
        if recorded is not None:
            return self._recorded_result(recorded, kwargs)
        messages = self._known(messages, "ChatParrot.generate")
        client = self.parrot_client(kwargs.get("model"))
        return _chat_result(client.chat(_chat_messages(messages), **self._request_options(stop, kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if current_trace() is not None:  # recording asks the server for the chat template's layout
            recorded = await asyncio.to_thread(self._record, messages, stop, kwargs)
            if recorded is not None:
                return self._recorded_result(recorded, kwargs)
            messages = await asyncio.to_thread(self._known, messages, "ChatParrot.agenerate")
        async with await self._async_client(kwargs.get("model")) as client:
            return _chat_result(await client.chat(_chat_messages(messages), **self._request_options(stop, kwargs)))

    # ---- streamed replies ---------------------------------------------------------------------------

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        recorded = self._record(messages, stop, kwargs)
        if recorded is not None:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=recorded))
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
            return
        messages = self._known(messages, "ChatParrot.stream")
        end = StreamEnd()
        client = self.parrot_client(kwargs.get("model"))
        for piece in client.stream_chat(_chat_messages(messages), **self._request_options(stop, kwargs)):
            end.note(piece)
            if piece.text:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        chunk = _last_chunk(end)
        if run_manager:
            run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if current_trace() is not None:
            recorded = await asyncio.to_thread(self._record, messages, stop, kwargs)
            if recorded is not None:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=recorded))
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
                return
            messages = await asyncio.to_thread(self._known, messages, "ChatParrot.astream")
        end = StreamEnd()
        async with await self._async_client(kwargs.get("model")) as client:
            pieces = client.stream_chat(_chat_messages(messages), **self._request_options(stop, kwargs))
            async for piece in pieces:
                end.note(piece)
                if piece.text:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        chunk = _last_chunk(end)
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
    """LangChain's messages as the frontend's chat takes them."""
    return [{"role": _role(message), "content": _text(message.content)} for message in messages]


def _usage_metadata(usage: dict[str, int] | None) -> UsageMetadata | None:
    if usage is None:
        return None
    input_tokens, output_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return UsageMetadata(input_tokens=input_tokens, output_tokens=output_tokens,
                         total_tokens=usage.get("total_tokens", input_tokens + output_tokens))


def _chat_result(reply: Completion) -> ChatResult:
    metadata = {"finish_reason": reply.finish_reason, "model_name": reply.model, "model_provider": "parrot"}
    message = AIMessage(content=reply.text, usage_metadata=_usage_metadata(reply.usage), response_metadata=metadata)
    generation = ChatGeneration(message=message, generation_info={"finish_reason": reply.finish_reason})
    return ChatResult(generations=[generation], llm_output={"token_usage": reply.usage, "model_name": reply.model})


def _last_chunk(end: StreamEnd) -> ChatGenerationChunk:
    """The last chunk: no text; usage, finish reason and model name (set on this chunk only)."""
    metadata = {"finish_reason": end.finish_reason, "model_name": end.model, "model_provider": "parrot"}
    message = AIMessageChunk(content="", usage_metadata=_usage_metadata(end.usage), response_metadata=metadata,
                             chunk_position="last")
    return ChatGenerationChunk(message=message, generation_info={"finish_reason": end.finish_reason})
