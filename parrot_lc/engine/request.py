"""A fill or generate request on one context, and what it streams out."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from parrot_lc.engine.context import Context, ContextId
from parrot_lc.engine.sampling import SamplingParams


class RequestKind(Enum):
    FILL = "fill"
    GENERATE = "generate"


@dataclass
class RequestOutput:
    """One event of a request: new tokens (and their text), or its end."""

    request_id: int
    context_id: ContextId
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "filled", "cancelled", "error"
    error: Exception | None = None


@dataclass(eq=False)
class Request:
    request_id: int
    kind: RequestKind
    context: Context
    priority: int  # higher runs first; ties in arrival order
    arrival: int
    fill_token_ids: list[int] = field(default_factory=list)  # appended to the context when the request starts
    sampling: SamplingParams | None = None
    generator: torch.Generator | None = None
    started: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    num_in_flight: int = 0  # tokens sampled in a step still on the device: not in output_token_ids yet
    _emitted_chars: int = 0
    finished: bool = False

    @property
    def num_generated(self) -> int:
        """Tokens sampled so far, those still on the device included."""
        return len(self.output_token_ids) + self.num_in_flight

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: most important first."""
        return (-self.priority, self.arrival)

    def add_token(
        self, token: int, decode: Callable[[list[int]], str] | None, eos_token_ids: tuple[int, ...]
    ) -> RequestOutput:
        """Records a sampled token and decides whether generation stops here. `decode`: token ids to text
        (`text_decoder`), None for a model without a tokenizer."""
        assert self.sampling is not None
        params = self.sampling
        self.output_token_ids.append(token)
        reason = None
        if (token in eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        text = decode(self.output_token_ids) if decode else ""
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if reason is None and len(self.output_token_ids) >= params.max_tokens:
            reason = "length"
        visible = text if reason else text[: len(text) - _held_back(text, params.stop)]
        delta = visible[self._emitted_chars :]
        self._emitted_chars = max(self._emitted_chars, len(visible))
        return RequestOutput(
            self.request_id, self.context.context_id, [token], delta, finished=reason is not None, finish_reason=reason
        )


def text_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], str]:
    """The tokenizer's decode with special tokens skipped, through its Rust backend where the wrapper would add
    nothing: the wrapper's checks of every id cost more than the decode itself, once a token and sequence."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.clean_up_tokenization_spaces:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: backend.decode(ids, skip_special_tokens=True)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to stream yet: a possible start of a stop string, or a
    partial UTF-8 character that the tokenizer shows as U+FFFD."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold
