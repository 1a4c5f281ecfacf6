"""OpenAI-compatible endpoints, so unmodified clients (the `openai` package, LangChain's ChatOpenAI) use the
server too. Each request is a one-call graph; its constant prefix (the prompt, or a chat's system part) is
shared with every other request that starts the same way."""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from parrot_lc.server.graph import Piece
from parrot_lc.server.manager import Completion, ParrotManager
from parrot_lc.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAISampling

DEFAULT_MAX_TOKENS = 256


def openai_router(manager: ParrotManager, model_name: str) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "parrot_lc"}]}

    @router.post("/completions")
    async def completions(body: CompletionRequest):
        manager.check_prompt(body.prompt)
        pieces = [Piece("text", body.prompt)]
        return await respond(body, pieces, "text_completion", lambda text: {"text": text, "logprobs": None})

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt = manager.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        manager.check_prompt(prompt)
        # The system messages rendered alone are the part that many chats share (a long system prompt).
        system = [m for m in messages if m["role"] == "system"]
        head = manager.tokenizer.apply_chat_template(system, tokenize=False) if system else ""
        head = head if prompt.startswith(head) else ""
        pieces = [Piece("text", head), Piece("text", prompt[len(head):])] if head else [Piece("text", prompt)]
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await respond(body, pieces, "chat.completion",
                             lambda text: {"message": {"role": "assistant", "content": text}},
                             lambda text, first: {"delta": {"role": "assistant", "content": text} if first
                                                  else {"content": text}})

    async def respond(body: OpenAISampling, pieces: list[Piece], kind: str, final_choice, delta_choice=None):
        sampling = body.to_params(DEFAULT_MAX_TOKENS)
        sampling.validate(manager.vocab_size)
        response_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": response_id, "created": int(time.time()), "model": body.model}
        if not body.stream:
            async with manager.completion(pieces, sampling) as completion:
                text = "".join([d async for d in completion.deltas()])
            choice = {"index": 0, **final_choice(text), "finish_reason": completion.call.finish_reason}
            return {**head, "object": kind, "choices": [choice], "usage": usage(completion)}
        chunk_kind = f"{kind}.chunk" if kind == "chat.completion" else kind
        delta = delta_choice or (lambda text, first: {"text": text, "logprobs": None})
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def events() -> AsyncIterator[str]:
            async with manager.completion(pieces, sampling) as completion:
                first = True
                async for text in completion.deltas():
                    yield sse({**head, "object": chunk_kind, "choices": [{"index": 0, **delta(text, first),
                                                                          "finish_reason": None}]})
                    first = False
                final = {"index": 0, **delta("", first), "finish_reason": completion.call.finish_reason}
                yield sse({**head, "object": chunk_kind, "choices": [final]})
                if include_usage:
                    yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage(completion)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return router


def usage(completion: Completion) -> dict:
    call = completion.call
    return {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
            "total_tokens": call.prompt_tokens + call.completion_tokens}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
