"""Log-probabilities of tokens, as OpenAI-compatible clients ask for them: of each sampled token and, on request, of a
prompt's tokens (an evaluation harness scores a text by its prompt's log-probabilities). They are the model's own
distribution, the log-softmax of its logits before temperature, top-k or top-p (what OpenAI and vLLM report), and
are gathered on the device where the logits are: only a row's token's value and its top k come back to the host."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parrot_lc.engine.host_to_device import to_device

MAX_LOGPROBS = 20  # most likely tokens a request may ask for at each position (OpenAI's limit)


@dataclass(frozen=True)
class TokenLogprob:
    """A token at one position, its log-probability there, and the most likely tokens there (most likely first)."""

    token_id: int
    logprob: float | None  # None: the first token of a prompt, which nothing before it predicts
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability)

    def to_wire(self) -> list:
        """A compact JSON value (engine processes send events over HTTP)."""
        return [self.token_id, self.logprob, [list(pair) for pair in self.top]]

    @classmethod
    def from_wire(cls, value: list) -> TokenLogprob:
        token_id, logprob, top = value
        return cls(token_id, logprob, tuple((token, lp) for token, lp in top))


@dataclass(frozen=True)
class LogprobRows:
    """The log-probabilities of one token in each of some rows of logits, and each row's k most likely tokens: on
    the device until read back."""

    chosen: torch.Tensor  # (R,) float32
    top_values: torch.Tensor  # (R, K) float32
    top_ids: torch.Tensor  # (R, K) int64

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.chosen, self.top_values, self.top_ids


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> LogprobRows:
    """logits: (R, V); tokens: (R,) int64 on the logits' device, one token whose log-probability each row gives."""
    logprobs = logits.float().log_softmax(dim=-1)  # (R, V)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]  # (R,)
    top_values, top_ids = logprobs.topk(k, dim=-1)  # (R, K)
    return LogprobRows(chosen, top_values, top_ids)


def read_rows(token_ids: list[int], tops: list[int], host: list[list]) -> list[TokenLogprob]:
    """The TokenLogprobs of rows whose tokens are `token_ids`, each with its own number of top tokens (`tops`, at most
    the rows' K), from the host values of a LogprobRows' tensors (`tolist()` of each)."""
    chosen, top_values, top_ids = host
    return [TokenLogprob(token, value, tuple(zip(ids[:k], values[:k])))
            for token, k, value, ids, values in zip(token_ids, tops, chosen, top_ids, top_values)]


@dataclass
class PromptLogprobs:
    """The log-probabilities of a request's prompt (the tokens it fills), gathered chunk by chunk as its prefill
    computes them, read back once. The logits at a position predict the token after it, so a chunk gives those of
    the prompt tokens after each of its tokens; the first prompt token has none (the logits before it are not the
    request's). A chunk computed again (after a preemption) gives nothing new."""

    token_ids: list[int]
    top: int
    parts: list[LogprobRows] = field(default_factory=list)
    done: int = 1  # leading prompt tokens whose log-probability is had (or that have none)

    def positions(self, fill_start: int, begin: int, end: int) -> range:
        """The positions in [begin, end) of the context (whose prompt starts at `fill_start`) whose logits give
        prompt tokens' log-probabilities still to be had."""
        first = max(begin, fill_start + self.done - 1)
        return range(first, max(first, min(end, fill_start + len(self.token_ids) - 1)))

    def add(self, logits: torch.Tensor, fill_start: int, positions: range) -> None:
        """logits: (len(positions), V), of the context's rows at `positions` (see `positions`)."""
        targets = self.token_ids[positions.start + 1 - fill_start : positions.stop + 1 - fill_start]
        self.parts.append(token_logprobs(logits, to_device(targets, logits.device), self.top))
        self.done = positions.stop + 1 - fill_start

    def read(self) -> list[TokenLogprob]:
        """Waits for the device; every prompt token's TokenLogprob, the first one's None."""
        entries = [TokenLogprob(self.token_ids[0], None)]
        for part in self.parts:
            tokens = self.token_ids[len(entries) : len(entries) + len(part.chosen)]
            entries += read_rows(tokens, [self.top] * len(tokens), [t.tolist() for t in part.tensors])
        return entries
