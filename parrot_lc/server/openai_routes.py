"""OpenAI-compatible endpoints, so unmodified clients (the `openai` package, LangChain's ChatOpenAI) use the
server too. Each request is a one-call graph; its constant prefix (the prompt, or a chat's system part) is
shared with every other request that starts the same way."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import PurePath
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from parrot_lc.server.errors import CallFailedError, NotFoundError
from parrot_lc.server.graph import Piece
from parrot_lc.server.manager import Completion, ParrotManager
from parrot_lc.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAISampling


def openai_router(manager: ParrotManager, model_name: str, client_of: Callable[..., str | None]) -> APIRouter:
    """The /v1 routes; `client_of` is the dependency that tells a request's client (its API key's label), whose
    requests share the per-key queue limit."""
    router = APIRouter(prefix="/v1")
    # The names a request may give the model: the one /v1/models lists and, for a path, its last part.
    served = list(dict.fromkeys([model_name, PurePath(model_name).name]))

    def check_model(body: OpenAISampling) -> None:
        """Refuses a request for a model this server does not serve (404, as vLLM does), rather than answering it
        with another model's text under the name asked for. A request that names none gets the served one."""
        if body.model is not None and body.model not in served:
            raise NotFoundError(f"model {body.model!r} is not served here; this server serves "
                                f"{' or '.join(map(repr, served))} (GET /v1/models)", field="model")

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "parrot_lc"}]}

    @router.post("/completions")
    async def completions(body: CompletionRequest, client: str | None = Depends(client_of)):
        check_model(body)
        token_ids = manager.prompts.tokenize(body.prompt)
        max_tokens = manager.prompts.check(token_ids, body.max_tokens)
        pieces = [Piece("text", body.prompt)]
        return await respond(body, client, max_tokens, pieces, token_ids, "text_completion",
                             lambda text: {"text": text, "logprobs": None})

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, client: str | None = Depends(client_of)):
        check_model(body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt = manager.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The system messages rendered alone are the part that many chats share (a long system prompt).
        system = [m for m in messages if m["role"] == "system"]
        head = manager.tokenizer.apply_chat_template(system, tokenize=False) if system else ""
        head = head if prompt.startswith(head) else ""
        token_ids = manager.prompts.tokenize(prompt, head)  # once: the length check and the call share the ids
        max_tokens = manager.prompts.check(token_ids, body.max_completion_tokens or body.max_tokens, "messages")
        pieces = [Piece("text", head), Piece("text", prompt[len(head):])] if head else [Piece("text", prompt)]
        return await respond(body, client, max_tokens, pieces, token_ids, "chat.completion",
                             lambda text: {"message": {"role": "assistant", "content": text}},
                             lambda text, first: {"delta": {"role": "assistant", "content": text} if first
                                                  else {"content": text}})

    async def respond(body: OpenAISampling, client: str | None, max_tokens: int, pieces: list[Piece],
                      token_ids: list[int], kind: str, final_choice, delta_choice=None):
        sampling = body.to_params(max_tokens)
        sampling.validate(manager.vocab_size)
        response_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": response_id, "created": int(time.time()), "model": body.model or model_name}
        if not body.stream:
            async with manager.completion(pieces, sampling, token_ids, client) as completion:
                text = "".join([d async for d in completion.deltas()])
            choice = {"index": 0, **final_choice(text), "finish_reason": completion.call.finish_reason}
            return {**head, "object": kind, "choices": [choice], "usage": usage(completion)}
        chunk_kind = f"{kind}.chunk" if kind == "chat.completion" else kind
        delta = delta_choice or (lambda text, first: {"text": text, "logprobs": None})
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        # Submitted before the response starts, so that a refusal (429) is still an HTTP status.
        completion = manager.start_completion(pieces, sampling, token_ids, client)

        def chunk(choices: list[dict]) -> dict:
            return {**head, "object": chunk_kind, "choices": choices}

        def delta_chunk(text: str, first: bool) -> dict:
            return chunk([{"index": 0, **delta(text, first), "finish_reason": None}])

        next_event = DeltaEvents(lambda text: delta_chunk(text, False))

        async def events() -> AsyncIterator[str]:
            first = True
            try:
                async for text in completion.deltas():
                    yield sse(delta_chunk(text, True)) if first else next_event(text)  # the first names the role
                    first = False
                last = [sse(chunk([{"index": 0, **delta("", first), "finish_reason": completion.call.finish_reason}]))]
                if include_usage:
                    last.append(sse({**chunk([]), "usage": usage(completion)}))
            except CallFailedError as exc:  # the status (200) is sent: the error goes as the stream's last event
                last = [sse({"error": {"message": exc.message, "type": type(exc).__name__, "field": exc.field}})]
            yield "".join(last) + "data: [DONE]\n\n"  # the stream's last events in one write

        return CompletionStream(events(), manager, completion)

    return router


class CompletionStream(StreamingResponse):
    """The server-sent events of a completion, which ends (its call stopped, its KV freed) however the response
    ends: streamed to the end, or its client gone mid-stream or before the first byte. Starlette neither closes
    the events' generator nor runs background tasks when the client goes, hence this."""

    def __init__(self, events: AsyncIterator[str], manager: ParrotManager, completion: Completion) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.manager, self.completion = manager, completion

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.manager.end_completion(self.completion))


def usage(completion: Completion) -> dict:
    call = completion.call
    return {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
            "total_tokens": call.prompt_tokens + call.completion_tokens}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class DeltaEvents:
    """The server-sent event of a delta of one streamed response, from the delta's text. All but the text is the
    same in every delta of a response, so it is encoded once: a delta costs the encoding of its text, not a
    payload built and dumped per token and stream. The event is `sse(payload(text))` to the byte."""

    _MARK = "\u0000delta"  # a string that no key of the payload is

    def __init__(self, payload: Callable[[str], dict]) -> None:
        # The text is the payload's last string (nothing after it comes from a client), so the last occurrence of
        # the mark's encoding is where the text goes.
        self._before, _, self._after = sse(payload(self._MARK)).rpartition(json.dumps(self._MARK))

    def __call__(self, text: str) -> str:
        return f"{self._before}{json.dumps(text)}{self._after}"
