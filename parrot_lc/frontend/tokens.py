"""The server's tokenizer routes (`POST /tokenize`, `POST /detokenize`, as vLLM serves them): the served model's own
tokenizer, for counting tokens and for rendering chat messages with the model's chat template, written once for both
clients."""

from __future__ import annotations

from typing import Any

from parrot_lc.frontend.api import ApiRequest, Steps
from parrot_lc.frontend.completions import MessageDict


def tokenize_steps(prompt: str | None, messages: list[MessageDict] | None, model: str | None,
                   add_special_tokens: bool, add_generation_prompt: bool,
                   tools: list[dict[str, Any]] | None = None) -> Steps[list[int]]:
    """The token ids of `prompt`, or of `messages` (with `tools`, OpenAI's definitions) rendered with the chat
    template (one of them is given)."""
    if (prompt is None) == (messages is None):
        raise TypeError("tokenize() takes a prompt or messages")
    body: dict[str, Any] = {"add_special_tokens": add_special_tokens}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        body.update(messages=messages, add_generation_prompt=add_generation_prompt)
        if tools:
            body["tools"] = tools
    if model:
        body["model"] = model
    [reply] = yield [ApiRequest("POST", "/tokenize", json=body)]
    return reply["tokens"]


def detokenize_steps(tokens: list[int], model: str | None) -> Steps[str]:
    body: dict[str, Any] = {"tokens": tokens}
    if model:
        body["model"] = model
    [reply] = yield [ApiRequest("POST", "/detokenize", json=body)]
    return reply["prompt"]
