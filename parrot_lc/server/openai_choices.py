"""The choices of OpenAI's responses, whole or streamed, in the shape of each endpoint: a chat's message and
deltas (with the tool calls read out of its text, server/tool_calls.py), a completion's text (after its echoed
prompt); and their log-probabilities, from the engine's
TokenLogprobs: a chat's `content` list (each token with its bytes and its most likely alternatives) and the
completions' parallel lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), as vLLM gives them, but a
token that splits a character has its own bytes and the offsets index the text, as OpenAI defines them (vLLM gives
U+FFFD's bytes and counts each token's text alone)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from functools import cached_property

from transformers import PreTrainedTokenizerBase

from parrot_lc.engine.constraints import token_bytes
from parrot_lc.engine.logprobs import TokenLogprob
from parrot_lc.server.graph import Call
from parrot_lc.server.tool_calls import ToolCallStream, ToolReader

# What OpenAI gives for a log-probability of minus infinity (JSON has no infinity).
MIN_LOGPROB = -9999.0


class TokenTexts:
    """Each token's text (its decode alone, special tokens written out), decoded once: a response with top
    log-probabilities names thousands of tokens, most of them the same few; and its bytes (`raw`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id])
        return text

    @cached_property
    def _bytes(self) -> list[bytes]:  # read on the first request that asks for log-probabilities
        return token_bytes(self._tokenizer)

    def raw(self, token_id: int) -> bytes:
        """The token's bytes (OpenAI's `bytes`): a piece of a character's UTF-8 for a token that splits one, whose
        text alone is U+FFFD; an id past the tokenizer's vocabulary, its text's UTF-8."""
        return self._bytes[token_id] if token_id < len(self._bytes) else self(token_id).encode()


@dataclass
class TextOffsets:
    """Where each token of a choice's text starts, in characters (a completion's `text_offset`): the tokens' bytes
    decoded one after the other, so that a token that splits a character starts at that character, and one after it
    at the next."""

    texts: TokenTexts
    chars: int = 0
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def __call__(self, token_id: int) -> int:
        offset = self.chars
        self.chars += len(self.decoder.decode(self.texts.raw(token_id)))
        return offset


def finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict:
    """A chat choice's (or chunk's) `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def token(token_id: int, logprob: float) -> dict:
        return {"token": texts(token_id), "logprob": finite(logprob), "bytes": list(texts.raw(token_id))}

    return {"content": [{**token(entry.token_id, entry.logprob),
                         "top_logprobs": [token(token_id, logprob) for token_id, logprob in entry.top]}
                        for entry in entries]}


def completion_logprobs(entries: list[TokenLogprob], texts: TokenTexts, offsets: TextOffsets | None = None) -> dict:
    """A completion choice's (or chunk's) `logprobs`, its tokens placed in the choice's text by `offsets` (from its
    start where None). A position's `top_logprobs` holds its top tokens and the token itself (as vLLM's:
    `logprobs: 0` still names it); a prompt's first token has none (null)."""
    offsets = offsets or TextOffsets(texts)
    tokens = [texts(entry.token_id) for entry in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [None if entry.logprob is None else finite(entry.logprob) for entry in entries],
        "top_logprobs": [top_logprobs(entry, text, texts) for entry, text in zip(entries, tokens)],
        "text_offset": [offsets(entry.token_id) for entry in entries],
    }


def top_logprobs(entry: TokenLogprob, text: str, texts: TokenTexts) -> dict[str, float] | None:
    """A position's top tokens by their text, and the token itself (`text`); None where it has no log-probability."""
    if entry.logprob is None:
        return None
    top = {texts(token_id): finite(logprob) for token_id, logprob in entry.top}
    top.setdefault(text, finite(entry.logprob))
    return top


@dataclass
class ChatChoices:
    """The choices of /v1/chat/completions: an assistant message each, with the tool calls that `tools` reads
    out of its text where the request offers tools (finish reason `tool_calls`); streamed, deltas whose first
    names the role."""

    texts: TokenTexts
    logprobs: bool  # asked for
    tools: ToolReader | None = None
    streams: dict[int, ToolCallStream] = field(default_factory=dict)  # streamed: each choice's calls so far
    called: set[int] = field(default_factory=set)  # the choices that call tools
    kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    @property
    def plain(self) -> bool:
        """Whether a delta's fields are its text alone (see `openai_routes.DeltaEvents`)."""
        return not self.logprobs and self.tools is None

    def whole(self, choice: int, call: Call, text: str) -> dict:
        """A choice's fields but its index and finish reason."""
        message: dict = {"role": "assistant", "content": text}
        if self.tools is not None:
            content, calls = self.tools.whole(text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}
                self.called.add(choice)
        return {"message": message, "logprobs": chat_logprobs(call.logprobs, self.texts) if self.logprobs else None}

    def finish_reason(self, choice: int, call: Call) -> str | None:
        """`tool_calls` where the choice calls tools and was not cut short."""
        return "tool_calls" if choice in self.called and call.finish_reason == "stop" else call.finish_reason

    def opening(self, choice: int, call: Call) -> dict | None:
        """The fields of a chunk before the choice's first delta: none (the first delta names the role)."""
        return None

    def delta(self, choice: int, text: str, first: bool, entries: list[TokenLogprob]) -> dict | None:
        """A chunk's fields for the choice's next `text` and the log-probabilities of its tokens (`entries`);
        None where there is nothing to send (text held back: it may begin a tool call)."""
        return self._chunk(choice, self._read(choice, text, final=False), first, entries)

    def last(self, choice: int, entries: list[TokenLogprob]) -> dict:
        """The fields of the choice's last chunk (with its finish reason): what was held back, if anything."""
        return self._chunk(choice, self._read(choice, "", final=True), False, entries) or {"delta": {},
                                                                                           "logprobs": None}

    def _read(self, choice: int, text: str, final: bool) -> dict:
        if self.tools is None:
            return {"content": text}
        stream = self.streams.setdefault(choice, ToolCallStream(self.tools))
        fields = stream.feed(text, final)
        if stream.calls:
            self.called.add(choice)
        return fields

    def _chunk(self, choice: int, delta: dict, first: bool, entries: list[TokenLogprob]) -> dict | None:
        if first:
            delta = {"role": "assistant", **({"content": ""} if not delta else delta)}
        elif not delta and not (self.logprobs and entries):
            return None
        return {"delta": delta, "logprobs": chat_logprobs(entries, self.texts) if self.logprobs else None}


@dataclass
class TextChoices:
    """The choices of /v1/completions: a text each, after its prompt where the request echoes it; streamed, the
    echoed prompt is the choice's first chunk."""

    texts: TokenTexts
    logprobs: bool  # asked for
    echoes: list[str] | None  # each choice's prompt text, where the request echoes it
    offsets: dict[int, TextOffsets] = field(default_factory=dict)  # streamed: each choice's tokens so far
    kind = "text_completion"
    chunk_kind = "text_completion"
    id_prefix = "cmpl"

    @property
    def plain(self) -> bool:
        """Whether a delta's fields are its text alone (see `openai_routes.DeltaEvents`)."""
        return not self.logprobs

    def finish_reason(self, choice: int, call: Call) -> str | None:
        return call.finish_reason

    def whole(self, choice: int, call: Call, text: str) -> dict:
        """A choice's fields but its index and finish reason."""
        echo = self.echoes[choice] if self.echoes is not None else None
        entries = call.logprobs if echo is None else (call.prompt_logprobs or []) + call.logprobs
        return {"text": (echo or "") + text,
                "logprobs": completion_logprobs(entries, self.texts) if self.logprobs else None}

    def opening(self, choice: int, call: Call) -> dict | None:
        """The fields of a chunk before the choice's first delta: the echoed prompt, if the request echoes it."""
        if self.echoes is None:
            return None
        return self.delta(choice, self.echoes[choice], True, call.prompt_logprobs or [])

    def delta(self, choice: int, text: str, first: bool, entries: list[TokenLogprob]) -> dict:
        """A chunk's fields for the choice's next `text` and the log-probabilities of its tokens (`entries`)."""
        if not self.logprobs:
            return {"text": text, "logprobs": None}
        offsets = self.offsets.setdefault(choice, TextOffsets(self.texts))
        return {"text": text, "logprobs": completion_logprobs(entries, self.texts, offsets)}

    def last(self, choice: int, entries: list[TokenLogprob]) -> dict:
        """The fields of the choice's last chunk (with its finish reason)."""
        return self.delta(choice, "", False, entries)
