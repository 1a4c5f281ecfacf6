"""A fill or generate request on one context, and what it streams out."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from parrot_lc.engine.constraints import GrammarState
from parrot_lc.engine.context import Context, ContextId
from parrot_lc.engine.logprobs import PromptLogprobs, TokenLogprob
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
    # What ended a "stop" (vLLM's stop_reason): the stop string, or the token of `stop_token_ids`; None for EOS (or
    # the end of a constraint's grammar) and for any other finish reason.
    stop_reason: str | int | None = None
    error: Exception | None = None
    cached_tokens: int = 0  # the request's `Request.cached_tokens` so far (final from its first token on)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of `token_ids`, when its sampling asks
    prompt_logprobs: list[TokenLogprob] | None = None  # of its prompt, in its first event, when its sampling asks


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
    text: "StreamedText | None" = None  # the output's text (None: a model without a tokenizer)
    finished: bool = False
    cached_from: int = 0  # its context's num_cached when it was submitted: what it adds to that is its own
    fill_start: int = 0  # where its fill's tokens begin in its context (set when it starts)
    prompt_logprobs: PromptLogprobs | None = None  # gathered while its prompt is computed, until its first event
    grammar: GrammarState | None = None  # where its output is in its sampling's constraint, if it has one

    @property
    def cached_tokens(self) -> int:
        """Tokens of its prompt whose KV it did not compute: what the fork it made inherited, and what it took from
        the block cache (those another request computed while it waited included)."""
        return self.context.num_cached - self.cached_from

    @property
    def num_generated(self) -> int:
        """Tokens sampled so far, those still on the device included."""
        return len(self.output_token_ids) + self.num_in_flight

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: most important first."""
        return (-self.priority, self.arrival)

    def take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """Its prompt's log-probabilities, read back from the device, the first time only (for its first event)."""
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        return prompt_logprobs.read() if prompt_logprobs is not None else None

    def add_token(
        self, token: int, eos_token_ids: tuple[int, ...], logprob: TokenLogprob | None = None
    ) -> RequestOutput:
        """Records a sampled token (with its log-probability, if its sampling asks) and decides whether generation
        stops here."""
        assert self.sampling is not None
        params = self.sampling
        self.output_token_ids.append(token)
        eos = token in eos_token_ids and not params.ignore_eos
        stop_token = eos or token in params.stop_token_ids
        reason = "stop" if stop_token else None
        stop_reason: str | int | None = token if stop_token and not eos else None  # EOS counts first, as vLLM's
        if self.grammar is not None:
            accepted = self.grammar.accept(token)
            assert accepted, f"token {token} sampled against its request's grammar"
            if self.grammar.terminated:  # its end accepted (end-of-sequence): nothing may follow, ignore_eos or not
                reason = "stop"
        if reason is None and len(self.output_token_ids) >= params.max_tokens:
            reason = "length"
        delta = ""
        if self.text is not None:
            # The token that ends it is no part of its text (as vLLM's without include_stop_str_in_output), and
            # stop strings count only in the text after its first min_tokens tokens (as vLLM's).
            # A stop string in the text before a stop token is what ended it (as vLLM's stop_reason says).
            delta, stop = self.text.add(self.output_token_ids[:-1] if stop_token else self.output_token_ids,
                                        final=reason is not None,
                                        find_stops=len(self.output_token_ids) > params.min_tokens)
            if stop is not None:
                reason, stop_reason = "stop", stop
        return RequestOutput(self.request_id, self.context.context_id, [token], delta, finished=reason is not None,
                             finish_reason=reason, stop_reason=stop_reason, cached_tokens=self.cached_tokens,
                             logprobs=[logprob] if logprob is not None else [],
                             prompt_logprobs=self.take_prompt_logprobs())


@dataclass
class StreamedText:
    """A generation's text, decoded as its tokens come: each token decodes only a window of the last few tokens
    (from the token after the last window's start, so that a tokenizer that drops a leading space at the start
    of a text sees the word before), instead of the whole output again; a stop string is searched for only
    where the new text can complete one. The deltas join to the tokenizer's decode of all the tokens."""

    decode: Callable[[list[int]], str]  # token ids to text (`text_decoder`)
    stops: tuple[str, ...] = ()
    text: str = ""  # decoded so far, cut at a stop string
    _window_start: int = 0  # first token of the decode window
    _decoded: int = 0  # tokens whose text is in `text`
    _emitted: int = 0  # characters of `text` streamed

    def add(self, token_ids: list[int], final: bool, find_stops: bool = True) -> tuple[str, str | None]:
        """The text to stream now that `token_ids` (all of the output) has a new token, and the stop string that
        ended it, if one did (looked for only with `find_stops`). A possible start of a stop string, or a character
        whose bytes are not all there yet (U+FFFD), is held back until the next token, unless the output ends here."""
        before = self.decode(token_ids[self._window_start : self._decoded])
        window = self.decode(token_ids[self._window_start :])
        searched = len(self.text)
        if len(window) > len(before) and (final or not window.endswith("\ufffd")):
            self.text += window[len(before) :]
            self._window_start, self._decoded = self._decoded, len(token_ids)
        # Each stop string only where it ends in the new text: one in the text before may not end it now (it came
        # before min_tokens, else it had ended it).
        found = [(at, stop) for stop in self.stops if find_stops
                 if (at := self.text.find(stop, max(0, searched - len(stop) + 1))) >= 0]
        cut, stop = min(found, default=(-1, None), key=lambda hit: hit[0])  # the stop string that the text has first
        if stop is not None:
            self.text = self.text[:cut]
        final = final or stop is not None
        visible = len(self.text) if final else len(self.text) - held_back(self.text, self.stops)
        delta = self.text[self._emitted : visible]
        self._emitted = max(self._emitted, visible)
        return delta, stop


def text_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], str]:
    """The tokenizer's decode with special tokens skipped, through its Rust backend where the wrapper would add
    nothing: the wrapper's checks of every id cost more than the decode itself, once a token and sequence."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.clean_up_tokenization_spaces:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: backend.decode(ids, skip_special_tokens=True)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to stream yet: a possible start of a stop string. (A partial UTF-8
    character never reaches `text` before the output ends: `StreamedText.add` waits for its other bytes.)"""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold
