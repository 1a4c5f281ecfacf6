"""Prompts as engines take them: a call's template rendered and tokenized, the prefix it shares with other calls
found, and a call's prompt and max_tokens checked against the context a request may have (the model's, or less
where the engines' KV cache holds less)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from transformers import PreTrainedTokenizerBase

from parrot_lc.engine.request import text_decoder
from parrot_lc.server.errors import CONTEXT_LENGTH_EXCEEDED, ServerError
from parrot_lc.server.graph import Call, Piece, Session
from parrot_lc.server.prefix_cache import PromptPrefix

COMPLETION_MAX_TOKENS = 16  # of a /v1/completions request that does not say (OpenAI's and vLLM's default)


class PrefixTokens:
    """Token ids of the constant prefixes (a template's text before its first variable, a chat's system messages)
    used last. Each call compares them with its prompt's ids to find what it shares, and they are the same every
    time: a long system prompt is tokenized once, not once a request. A prefix with more tokens than the model's
    context is not kept (no call can use it), which bounds what the cache holds."""

    def __init__(self, tokenize: Callable[[str], list[int]], max_entries: int, max_tokens: int) -> None:
        self._tokenize = tokenize
        self._max_entries, self._max_tokens = max_entries, max_tokens
        self._entries: OrderedDict[str, list[int]] = OrderedDict()

    def __call__(self, text: str) -> list[int]:
        token_ids = self._entries.get(text)
        if token_ids is not None:
            self._entries.move_to_end(text)
            return token_ids
        token_ids = self._tokenize(text)
        if len(token_ids) <= self._max_tokens:
            self._entries[text] = token_ids
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return token_ids


def common_length(a: list[int], b: list[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case for a prefix and its prompt, compared in C rather than id by id
        return n
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


Segment = tuple[str, Piece | None]  # the text before an output, and the output (None: text after the last one)


class Prompts:
    """The model's tokenizer as calls use it; `max_prefixes` constant prefixes' ids are kept (as many as an
    engine keeps warm prefix contexts: the ones in use). `kv_capacity` tells the tokens that the engines' KV cache
    holds for one context (None: not known: EnginePool.context_capacity), which bounds a request's context where it
    is less than the model's."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase | None, max_context: int, max_prefixes: int, vocab_size: int,
        kv_capacity: Callable[[], int | None],
    ) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.vocab_size = vocab_size
        self._kv_capacity = kv_capacity
        self.decode = text_decoder(tokenizer) if tokenizer is not None else lambda ids: ""
        self._prefix_tokens = PrefixTokens(self.tokenize, max_prefixes, max_context)
        # Special tokens that a text may be split before (one that strips the spaces before it may not), and
        # whether the tokenizer adds its own special tokens only at the start (an end-of-text one would land in
        # the middle of a prompt tokenized in two parts).
        self._boundary_tokens: tuple[str, ...] = ()
        self._splits_at_special_tokens = False
        if tokenizer is not None:
            self._boundary_tokens = tuple(t.content for t in tokenizer.added_tokens_decoder.values()
                                          if t.special and not t.lstrip)
            plain = tokenizer("x", add_special_tokens=False).input_ids
            self._splits_at_special_tokens = tokenizer("x").input_ids[-len(plain):] == plain

    def tokenize(self, text: str, head: str = "") -> list[int]:
        """The token ids of a prompt, as calls feed them to engines. Of a prompt that starts with `head` (a
        chat's system messages, the same in many requests) only the rest is tokenized, the head's ids cached,
        where the rest begins with a special token: a tokenizer splits text at its special tokens before
        anything else, so the two parts' ids are the whole's (a 4k-token system prompt costs about 2 ms a
        request to tokenize, on the event loop)."""
        rest = text[len(head):]
        if head and rest and text.startswith(head) and self._splits_at_special_tokens and rest.startswith(
                self._boundary_tokens):
            return self._prefix_tokens(head) + self.tokenizer(rest, add_special_tokens=False).input_ids
        return self.tokenizer(text).input_ids

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of token ids a client sent (a prompt, a detokenize request): special tokens written out, as
        the ids stand for them."""
        return self.tokenizer.decode(token_ids)

    def check_token_ids(self, token_ids: list[int], field: str) -> None:
        """Refuses ids outside the model's vocabulary, naming the first (`field`.index)."""
        bad = next((i for i, token in enumerate(token_ids) if not 0 <= token < self.vocab_size), None)
        if bad is not None:
            raise ServerError(f"token id {token_ids[bad]} is not in the model's vocabulary [0, {self.vocab_size})",
                              f"{field}.{bad}")

    def continuation(self, text: str) -> list[int]:
        """The token ids of text that goes on a prompt (no special tokens of the start)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def context(self) -> tuple[int, str]:
        """The tokens a request's context may hold (its prompt and max_tokens), and what bounds them, in words: the
        model's context, or what the engines' KV cache holds where that is less (as vLLM bounds max_model_len by
        its cache). A context that the cache cannot hold would fail on the engine only once it had generated what
        fits."""
        capacity = self._kv_capacity()
        if capacity is None or capacity >= self.max_context:
            return self.max_context, f"the model's context is {self.max_context}"
        return capacity, (f"the KV cache holds {capacity} tokens for one context, fewer than the model's context of "
                          f"{self.max_context}")

    def check(self, token_ids: list[int], max_tokens: int | None, field: str = "prompt",
              default: int | None = None) -> int:
        """How many tokens the completion may generate: `max_tokens`, or without it `default`, or without that what
        the context leaves (as OpenAI and vLLM answer a chat that does not say). A prompt (its `tokenize`d ids)
        that fills the `context`, or leaves less room than `max_tokens`, is rejected before it runs (naming
        `field`, or `max_tokens`)."""
        count = len(token_ids)
        if count == 0:
            raise ServerError("the prompt is empty: it needs at least one token", field)
        context, bound = self.context()
        if count >= context:
            raise ServerError(f"the prompt is too long: it has {count} tokens; {bound}", field, CONTEXT_LENGTH_EXCEEDED)
        room = context - count
        if max_tokens is not None and max_tokens > room:
            raise ServerError(f"max_tokens is {max_tokens}, but the prompt ({count} tokens) leaves room for {room}: "
                              f"{bound}", "max_tokens", CONTEXT_LENGTH_EXCEEDED)
        given = max_tokens if max_tokens is not None else default
        return room if given is None else min(given, room)

    def check_call(self, token_ids: list[int], segments: list[Segment]) -> None:
        """Refuses a call whose context may grow past the `context`: the prompt before its first output (`token_ids`),
        then each output's max_tokens and the text after it (its `segments`)."""
        self.check(token_ids, None, "template")
        context, bound = self.context()
        need = len(token_ids) + sum(piece.sampling.max_tokens for _, piece in segments if piece is not None) + sum(
            len(self.continuation(text)) for text, _ in segments[1:])
        if need > context:
            raise ServerError(f"the call's context may grow to {need} tokens (its prompt's {len(token_ids)}, then its "
                              f"outputs' max_tokens and the text after each); {bound}", "template",
                              CONTEXT_LENGTH_EXCEEDED)

    @staticmethod
    def segments(session: Session, call: Call) -> list[Segment]:
        """The prompt cut at each output: [(text before output 1, output 1), (text between 1 and 2, output 2)…]."""
        segments: list[Segment] = []
        text = []
        for piece in call.pieces:
            if piece.kind == "text":
                text.append(piece.text)
            elif piece.kind == "input":
                text.append(session.variables[piece.var_id].value)
            else:
                segments.append(("".join(text), piece))
                text = []
        if text and "".join(text):
            segments.append(("".join(text), None))
        return segments

    def shared_prefix(self, session: Session, call: Call, token_ids: list[int]) -> PromptPrefix | None:
        """The tokens that begin the call's prompt (`token_ids`) and others': its pieces shared in its graph,
        their inputs filled in, or else its template's constant prefix (shared by every call of the template).
        Tokenization may merge across the prefix's end, so only the part on which both tokenizations agree is
        shared; None if none."""
        if call.shared_pieces == 0:
            prefix_text = call.constant_prefix
        else:
            prefix_text = "".join(piece.text if piece.kind == "text" else session.variables[piece.var_id].value
                                  for piece in call.pieces[:call.shared_pieces])
        if not prefix_text:
            return None
        prefix_ids = self._prefix_tokens(prefix_text)
        # Not the prefix text's last token: whether it merges with the text after it differs from prompt to
        # prompt, and calls that share the text should share one prefix context. And at least one token of the
        # prompt stays the call's own, so that it computes its own logits.
        shared = min(common_length(prefix_ids, token_ids), len(prefix_ids) - 1, len(token_ids) - 1)
        return PromptPrefix.of(token_ids[:shared]) if shared > 0 else None
