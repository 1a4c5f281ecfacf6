"""Completions and chat replies of the server's OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`):
their requests, written once for both clients, and their replies and stream pieces, read into `Completion`s.

A request's options are fields of its body as the OpenAI API names them (`max_tokens`, `temperature`, `top_p`,
`seed`, `stop`...): the server checks them and refuses what it does not implement, naming the field (400).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from parrot_lc.frontend.api import ApiRequest, Steps

MessageDict = dict[str, Any]
"""A chat message as the OpenAI API writes it: `{"role": "system" | "developer" | "user" | "assistant" | "tool",
"content": text}`, with an assistant's `tool_calls` and a tool message's `tool_call_id`."""


@dataclass(frozen=True)
class Completion:
    """A completion or a chat reply, or one piece of its stream (then `text` is what the piece adds). Where the
    reply or the piece tells them: why generation stopped (`"stop"`: a stop sequence or the end of the text;
    `"length"`: `max_tokens`), the model's name, and the token usage (`prompt_tokens`, `completion_tokens`,
    `total_tokens`, and `cached_tokens`: the prompt tokens whose KV an earlier request computed), which a stream gives in its
    last piece. A chat reply's `tool_calls` are OpenAI's (`id`, `function.name`, `function.arguments`); a stream
    piece's are deltas of them (with their `index`). `logprobs`: the choice's log-probabilities as the server sends
    them (a request that asks for them: `logprobs=True` for a chat, `logprobs=k` for a completion)."""

    text: str
    finish_reason: str | None = None
    model: str | None = None
    usage: dict[str, int] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: dict[str, Any] | None = None
    others: tuple[Completion, ...] = ()
    """A whole reply's choices after the first (whose fields are the reply's), for a request of `n` choices:
    each with its text, finish reason, calls and log-probabilities."""


def completion_request(prompt: str | list[str], model: str | None, options: dict[str, Any], *,
                       stream: bool = False) -> ApiRequest:
    return _request("/v1/completions", {"prompt": prompt}, model, options, stream)


def chat_request(messages: list[MessageDict], model: str | None, options: dict[str, Any], *,
                 stream: bool = False) -> ApiRequest:
    return _request("/v1/chat/completions", {"messages": messages}, model, options, stream)


def _request(path: str, body: dict[str, Any], model: str | None, options: dict[str, Any], stream: bool) -> ApiRequest:
    """`model` None names none: the server answers with the model it serves."""
    if model:
        body["model"] = model
    body.update(options)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # the token usage, in the stream's last piece
    return ApiRequest("POST", path, json=body)


def reply_steps(request: ApiRequest, read: Callable[[dict[str, Any]], Completion]) -> Steps[Completion]:
    [body] = yield [request]
    return read(body)


def served_models_steps() -> Steps[list[str]]:
    """The names of the models the server serves (`GET /v1/models`), as replies name them."""
    [body] = yield [ApiRequest("GET", "/v1/models")]
    return [model["id"] for model in body["data"]]


def model_card_steps(name: str) -> Steps[dict[str, Any]]:
    """The card of the served model `name` (`GET /v1/models/{name}`); a name it does not serve raises
    NotFoundError."""
    [body] = yield [ApiRequest("GET", f"/v1/models/{name}")]
    return body


def completion_of(body: dict[str, Any]) -> Completion:
    """A completion, or a piece of its stream."""
    return _completion(body, lambda choice: {"content": choice.get("text")})


def chat_reply_of(body: dict[str, Any]) -> Completion:
    return _completion(body, lambda choice: choice.get("message") or {})


def chat_piece_of(event: dict[str, Any]) -> Completion:
    """A piece of a chat reply's stream."""
    return _completion(event, lambda choice: choice.get("delta") or {})


def _completion(body: dict[str, Any], message: Callable[[dict[str, Any]], dict[str, Any]]) -> Completion:
    first, *others = body.get("choices") or [{}]  # a stream's usage piece has none
    return replace(_choice(first, message), model=body.get("model"), usage=usage_of(body),
                   others=tuple(_choice(choice, message) for choice in others))


def _choice(choice: dict[str, Any], message: Callable[[dict[str, Any]], dict[str, Any]]) -> Completion:
    fields = message(choice)
    return Completion(text=fields.get("content") or "", finish_reason=choice.get("finish_reason"),
                      tool_calls=fields.get("tool_calls"), logprobs=choice.get("logprobs"))


def usage_of(body: dict[str, Any]) -> dict[str, int] | None:
    """The `usage` of a reply (or a variable's fetch), its cached tokens as `cached_tokens`."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    counts = {k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        counts["cached_tokens"] = int(cached)
    return counts
