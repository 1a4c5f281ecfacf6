"""OpenAI-compatible endpoints, so unmodified clients (the `openai` package, LangChain's ChatOpenAI, evaluation
harnesses) use the server too, and vLLM's /tokenize and /detokenize. Each request is a graph of one call per
choice (n per prompt): a prompt's choices share it, filled once and forked; its constant prefix (a chat's system
part) is shared with every other request that starts the same way. A chat's tools are rendered, constrained and
read by server/tool_calls.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from pathlib import PurePath
from typing import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from parrot_lc.engine.constraints import Constraint
from parrot_lc.engine.errors import InvalidRequestError
from parrot_lc.engine.logprobs import TokenLogprob
from parrot_lc.engine.sampling import SamplingParams
from parrot_lc.server.errors import NotFoundError, ServerError
from parrot_lc.server.graph import Piece
from parrot_lc.server.manager import Completion, CompletionPrompt, ParrotManager
from parrot_lc.server.openai_choices import ChatChoices, TextChoices, TokenTexts
from parrot_lc.server.prompts import COMPLETION_MAX_TOKENS
from parrot_lc.server.responses import error_body
from parrot_lc.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    OpenAISampling,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from parrot_lc.server.tool_calls import ChatTemplate

Choices = ChatChoices | TextChoices


def openai_router(manager: ParrotManager, model_name: str, client_of: Callable[..., str | None]) -> APIRouter:
    """The /v1 routes; `client_of` is the dependency that tells a request's client (its API key's label), whose
    requests share the per-key queue limit. Every response names the model as /v1/models lists it."""
    router = APIRouter(prefix="/v1")
    served = served_names(model_name)
    texts = TokenTexts(manager.tokenizer)
    template = ChatTemplate.of(manager.tokenizer)

    created = int(time.time())

    def card() -> dict:
        """vLLM's card of the model, whose max_model_len is the longest context a request may have (what the
        engines' KV cache holds, where that is less than the model's context): it changes as engines come and go."""
        return {"id": model_name, "object": "model", "created": created, "owned_by": "parrot_lc", "root": model_name,
                "parent": None, "max_model_len": manager.prompts.context()[0]}

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @router.get("/models/{name:path}")
    async def model(name: str) -> dict:
        """The served model's card (the `openai` package's `models.retrieve`); another name gets 404."""
        check_model(served, name)
        return card()

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request, client: str | None = Depends(client_of)):
        check_model(served, body.model)
        given = body.prompts()
        if not given:
            raise ServerError("the list of prompts is empty", "prompt")
        fields = ["prompt"] if len(given) == 1 else [f"prompt.{index}" for index in range(len(given))]
        prompts = [completion_prompt(body, prompt, field) for prompt, field in zip(given, fields)]
        echoes = [prompt.pieces[0].text for prompt in prompts for _ in range(body.n)] if body.echo else None
        return await respond(body, request, client, prompts, TextChoices(texts, body.logprobs is not None, echoes))

    def completion_prompt(body: CompletionRequest, prompt: str | list[int], field: str) -> CompletionPrompt:
        """A prompt of the request, given as text or as token ids (`field` names it in errors)."""
        if isinstance(prompt, str):
            text, token_ids = prompt, manager.prompts.tokenize(prompt)
        else:
            manager.prompts.check_token_ids(prompt, field)
            text, token_ids = manager.prompts.detokenize(prompt), prompt
        max_tokens = manager.prompts.check(token_ids, body.max_tokens, field, COMPLETION_MAX_TOKENS)
        return CompletionPrompt([Piece("text", text)], token_ids, checked_sampling(body, max_tokens))

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               client: str | None = Depends(client_of)):
        check_model(served, body.model)
        tools = body.tool_request()
        prompt, head = template.render(body.template_messages(), tools)
        token_ids = manager.prompts.tokenize(prompt, head)  # once: the length check and the call share the ids
        max_tokens = manager.prompts.check(token_ids, body.max_completion_tokens or body.max_tokens, "messages")
        pieces = [Piece("text", head), Piece("text", prompt[len(head):])] if head else [Piece("text", prompt)]
        sampling = checked_sampling(body, max_tokens, tools.constraint() if tools is not None else None)
        reader = tools.reader(template) if tools is not None else None
        return await respond(body, request, client, [CompletionPrompt(pieces, token_ids, sampling)],
                             ChatChoices(texts, bool(body.logprobs), reader))

    def checked_sampling(body: OpenAISampling, max_tokens: int, forced: Constraint | None = None) -> SamplingParams:
        """The request's sampling; `forced`: the constraint of a forced tool call."""
        sampling = body.to_params(max_tokens)
        if forced is not None:
            if sampling.constraint is not None:
                raise ServerError("response_format (or a guided_* field) and a forced tool_choice both constrain the "
                                  "output: send one", "tool_choice")
            sampling = dataclasses.replace(sampling, constraint=forced)
        try:
            sampling.validate(manager.vocab_size)
        except InvalidRequestError as exc:  # named as the request names it (max_tokens as the server settled it)
            raise ServerError(str(exc).removeprefix("sampling."), exc.field) from None
        return sampling

    async def respond(body: OpenAISampling, request: Request, client: str | None, prompts: list[CompletionPrompt],
                      shape: Choices):
        head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if not body.stream:
            async def whole() -> dict:
                async with manager.completion(prompts, body.n, client) as completion:
                    outputs = await completion.texts()
                choices = [{"index": index, **shape.whole(index, call, text),
                            "finish_reason": shape.finish_reason(index, call), "stop_reason": call.stop_reason}
                           for index, (call, text) in enumerate(zip(completion.calls, outputs))]
                return {**head, "object": shape.kind, "choices": choices, "usage": usage(completion)}

            return await unless_disconnected(request, whole())
        options = body.stream_options
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options.continuous_usage_stats
        # Submitted before the response starts, so that a refusal (429) is still an HTTP status.
        completion = manager.start_completion(prompts, body.n, client)
        return CompletionStream(stream_events(completion, head, shape, include_usage, continuous), manager, completion)

    return router


def tokenizer_router(manager: ParrotManager, model_name: str) -> APIRouter:
    """/tokenize, /detokenize and /tokenizer_info (as vLLM serves them): the model's tokenizer as the completion
    routes use it, for clients that count tokens or send token ids (lm-evaluation-harness's remote tokenizer)."""
    router = APIRouter()
    served = served_names(model_name)
    template = ChatTemplate.of(manager.tokenizer)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """The token ids of a prompt, or of chat messages (and tools) rendered with the model's chat template, as
        /v1/completions and /v1/chat/completions tokenize them (with the tokenizer's special tokens, unless
        `add_special_tokens` is false)."""
        check_model(served, body.model)
        text = body.prompt
        if body.messages is not None:
            text = template.render(body.template_messages(), body.tool_request(), body.add_generation_prompt)[0]
        tokens = manager.prompts.tokenize(text) if body.add_special_tokens else manager.prompts.continuation(text)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=manager.prompts.context()[0])

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids (special tokens written out); an id outside the vocabulary is a 400 naming it."""
        check_model(served, body.model)
        manager.prompts.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=manager.prompts.detokenize(body.tokens))

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> TokenizerInfo:
        """The tokenizer's special tokens and the longest context a request may have."""
        tokenizer = manager.tokenizer
        return TokenizerInfo(tokenizer_class=type(tokenizer).__name__, bos_token=tokenizer.bos_token,
                             eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                             model_max_length=manager.prompts.context()[0])

    return router


async def unless_disconnected(request: Request, work: Awaitable[dict]) -> dict | Response:
    """The response of `work`, or, if the client goes first, `work` cancelled (its calls end, their KV freed, as
    vLLM's handlers are): a client that gave up (the `openai` package retries on a timeout) leaves no generation
    behind. The 499 (nginx's "client closed request") is for the logs: nobody reads it."""
    answer = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)
    return Response(status_code=499) if answer.cancelled() else answer.result()


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (its body already read, the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def served_names(model_name: str) -> list[str]:
    """The names a request may give the model: the one /v1/models lists and, for a path, its last part."""
    return list(dict.fromkeys([model_name, PurePath(model_name).name]))


def check_model(served: list[str], name: str | None) -> None:
    """Refuses a request for a model this server does not serve (404, as vLLM does), rather than answering it
    with another model's text under the name asked for. A request that names none gets the served one."""
    if name is not None and name not in served:
        raise NotFoundError(f"model {name!r} is not served here; this server serves "
                            f"{' or '.join(map(repr, served))} (GET /v1/models)", field="model",
                            code="model_not_found")


async def stream_events(
    completion: Completion, head: dict, shape: Choices, include_usage: bool, continuous_usage: bool = False
) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion: each choice's deltas as they come (with the
    log-probabilities of the tokens generated since its last chunk), then each choice's finish and stop reasons,
    then usage if asked (`continuous_usage`: in every chunk too, as far as the request has gone, as vLLM's
    `continuous_usage_stats`); a call that fails ends the stream with an error event (the status, 200, is sent)."""
    count = len(completion.calls)
    started = [False] * count  # a choice's first chunk (or its echoed prompt) is sent
    sent = [0] * count  # log-probabilities of a choice's tokens sent so far
    plain: dict[int, DeltaEvents] = {}  # a choice's next delta without log-probabilities, encoded once

    def chunk(choices: list[dict]) -> dict:
        # with include_usage, every chunk has a usage: null but the last (OpenAI's stream), or the usage so far
        so_far = usage(completion) if continuous_usage else None
        return {**head, "object": shape.chunk_kind, "choices": choices, **({"usage": so_far} if include_usage else {})}

    def event(index: int, fields: dict | None, finish_reason: str | None = None,
              stop_reason: str | int | None = None) -> str:
        """The event of a choice's chunk; none where it has nothing to send (`fields` None). Its last chunk has
        its finish reason and (vLLM's) stop reason; the others have them null."""
        return "" if fields is None else sse(chunk([{"index": index, **fields, "finish_reason": finish_reason,
                                                     "stop_reason": stop_reason}]))

    def new_logprobs(index: int) -> list[TokenLogprob]:
        call = completion.calls[index]
        entries, sent[index] = call.logprobs[sent[index]:], len(call.logprobs)
        return entries

    def first(index: int, text: str) -> str:
        started[index] = True
        opening = shape.opening(index, completion.calls[index])
        return ("" if opening is None else event(index, opening)) + event(
            index, shape.delta(index, text, opening is None, new_logprobs(index)))

    def next_delta(index: int, text: str) -> str:
        if not shape.plain or continuous_usage:  # a delta's usage differs from chunk to chunk: no shared encoding
            return event(index, shape.delta(index, text, False, new_logprobs(index)))
        if index not in plain:
            plain[index] = DeltaEvents(lambda text: chunk([{"index": index, **shape.delta(index, text, False, []),
                                                            "finish_reason": None, "stop_reason": None}]))
        return plain[index](text)

    try:
        async for index, text in completion.deltas():
            yield next_delta(index, text) if started[index] else first(index, text)
        last = [first(index, "") if not started[index] else "" for index in range(count)]
        last += [event(index, shape.last(index, new_logprobs(index)), shape.finish_reason(index, call),
                       call.stop_reason) for index, call in enumerate(completion.calls)]
        if include_usage:
            last.append(sse({**chunk([]), "usage": usage(completion)}))
    except ServerError as exc:  # a call failed once the status (200) was sent: the error is the stream's last event
        last = [sse(error_body(exc.message, exc.kind, exc.field, exc.code))]
    yield "".join(last) + "data: [DONE]\n\n"  # the stream's last events in one write


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
    """The request's tokens: each prompt's once, however many choices fork it, and every choice's own."""
    prompts, choices = completion.prompt_calls, completion.calls
    prompt_tokens, completion_tokens = sum(c.prompt_tokens for c in prompts), sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in prompts)}}


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
