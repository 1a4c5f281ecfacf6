"""ChatParrot: a LangChain chat model served by Parrot."""

from __future__ import annotations

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

from parrot_lc.integrations.langchain._base import ParrotParams, usage_of

_ROLES = {"system", "developer", "user", "assistant", "tool"}
_NON_TEXT_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "file", "video", "document"}

__all__ = ["ChatParrot"]


class ChatParrot(ParrotParams, BaseChatModel):
    """A chat model on a Parrot server (`parrot-lc serve`), or on a server in this process.

    Messages go to the server's OpenAI-compatible `/v1/chat/completions`, which renders them with the
    model's chat template; chats that share their system messages share that prefix's KV cache on the
    server. Text only: no tool calling, structured output or images (a message with an image, audio or file
    part raises ValueError).

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

    def _chat_body(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any], *,
                   stream: bool) -> dict[str, Any]:
        return {"messages": [_to_openai(m) for m in messages], **self._openai_body(stop, kwargs, stream=stream)}

    # ---- whole replies ------------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        body = self._chat_body(messages, stop, kwargs, stream=False)
        return _chat_result(self._post("/v1/chat/completions", body, kwargs.get("model")))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        body = self._chat_body(messages, stop, kwargs, stream=False)
        return _chat_result(await self._apost("/v1/chat/completions", body, kwargs.get("model")))

    # ---- streamed replies ---------------------------------------------------------------------------

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        state: dict[str, Any] = {}
        body = self._chat_body(messages, stop, kwargs, stream=True)
        for event in self._post_events("/v1/chat/completions", body, kwargs.get("model")):
            chunk = _text_chunk(event, state)
            if chunk is not None:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        chunk = _last_chunk(state)
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
        state: dict[str, Any] = {}
        body = self._chat_body(messages, stop, kwargs, stream=True)
        async for event in self._apost_events("/v1/chat/completions", body, kwargs.get("model")):
            chunk = _text_chunk(event, state)
            if chunk is not None:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        chunk = _last_chunk(state)
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


def _to_openai(message: BaseMessage) -> dict[str, Any]:
    return {"role": _role(message), "content": _text(message.content)}


def _usage_metadata(usage: dict[str, int] | None) -> UsageMetadata | None:
    if usage is None:
        return None
    input_tokens, output_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return UsageMetadata(input_tokens=input_tokens, output_tokens=output_tokens,
                         total_tokens=usage.get("total_tokens", input_tokens + output_tokens))


def _chat_result(body: dict[str, Any]) -> ChatResult:
    choice = body["choices"][0]
    usage = usage_of(body)
    metadata = {"finish_reason": choice.get("finish_reason"), "model_name": body.get("model"),
                "model_provider": "parrot"}
    message = AIMessage(content=(choice.get("message") or {}).get("content") or "",
                        usage_metadata=_usage_metadata(usage), response_metadata=metadata)
    generation = ChatGeneration(message=message, generation_info={"finish_reason": choice.get("finish_reason")})
    return ChatResult(generations=[generation], llm_output={"token_usage": usage, "model_name": body.get("model")})


def _text_chunk(event: dict[str, Any], state: dict[str, Any]) -> ChatGenerationChunk | None:
    """The chunk of one streamed event (None if it has no text); notes the finish reason and usage."""
    usage = usage_of(event)
    if usage is not None:
        state["usage"] = usage
    if event.get("model"):
        state.setdefault("model_name", event["model"])
    for choice in event.get("choices") or []:
        if choice.get("finish_reason"):
            state["finish_reason"] = choice["finish_reason"]
        text = (choice.get("delta") or {}).get("content")
        if text:
            return ChatGenerationChunk(message=AIMessageChunk(content=text))
    return None


def _last_chunk(state: dict[str, Any]) -> ChatGenerationChunk:
    """The last chunk: no text; usage, finish reason and model name (set on this chunk only)."""
    metadata = {"finish_reason": state.get("finish_reason"), "model_name": state.get("model_name"),
                "model_provider": "parrot"}
    message = AIMessageChunk(content="", usage_metadata=_usage_metadata(state.get("usage")),
                             response_metadata=metadata, chunk_position="last")
    return ChatGenerationChunk(message=message, generation_info={"finish_reason": state.get("finish_reason")})
