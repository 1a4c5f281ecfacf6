"""Sampling settings of a generate request, and the sampler that turns logits into tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parrot_lc.engine.constraints import Constraint, TokenMasks, apply_token_masks
from parrot_lc.engine.errors import InvalidRequestError
from parrot_lc.engine.host_to_device import to_device
from parrot_lc.engine.logprobs import MAX_LOGPROBS

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` (or below 1e-5) is greedy decoding."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0  # cut tokens less likely than min_p times the most likely one (0: no cut)
    # OpenAI's penalties on the output so far: logits minus presence (once a token occurs) and minus frequency times
    # its count; vLLM's repetition penalty on every token of the prompt and output: a positive logit divided by it, a
    # negative one multiplied. Neutral: 0, 0 and 1.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # the same seed gives the same tokens, whatever else runs in the batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Tokens generated before the output may end (vLLM's min_tokens): until then EOS (unless ignored) and
    # `stop_token_ids` are never sampled, and no stop string is looked for.
    min_tokens: int = 0
    # Each sampled token's log-probability and the k most likely tokens' (None: none); see engine/logprobs.py.
    logprobs: int | None = None
    # The same for the tokens the request fills (its prompt), computed in its prefill only when asked (None: not).
    # With them, `max_tokens` may be 0: the request ends once its prompt is computed.
    prompt_logprobs: int | None = None
    # What the output must match (engine/constraints.py): the sampler draws only tokens its grammar allows, and the
    # request ends when the grammar is complete.
    constraint: Constraint | None = None
    # Tokens of this output that an earlier attempt generated (a call resumed after a failover or a wait for
    # memory): the constraint's grammar takes them before the first token sampled here.
    constraint_prefix: tuple[int, ...] = ()

    def validate(self, vocab_size: int) -> None:
        """Raises InvalidRequestError naming the first field that is out of range."""
        checks = [
            ("max_tokens", self.max_tokens >= (0 if self.prompt_logprobs is not None else 1),
             "must be at least 1 (0 only with prompt_logprobs)"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be 0 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be a non-negative 64-bit integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must hold non-empty strings"),
            (
                "stop_token_ids",
                all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids),
                f"must hold token ids in [0, {vocab_size})",
            ),
            (
                "constraint_prefix",
                all(isinstance(t, int) and 0 <= t < vocab_size for t in self.constraint_prefix),
                f"must hold token ids in [0, {vocab_size})",
            ),
            *((name, k is None or 0 <= k <= min(MAX_LOGPROBS, vocab_size), f"must be unset or in [0, {MAX_LOGPROBS}]")
              for name, k in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs))),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidRequestError(f"sampling.{name} {why} (got {getattr(self, name)!r})", name)
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise InvalidRequestError(f"sampling.constraint must be a Constraint (got {self.constraint!r})")
            self.constraint.validate()
            if self.min_tokens:
                # A complete grammar allows only its end, which min_tokens would forbid: nothing left to sample.
                raise InvalidRequestError("sampling.min_tokens cannot go with a constraint, whose grammar may be "
                                          "complete sooner", "min_tokens")

    def banned_tokens(self, num_generated: int, eos_token_ids: tuple[int, ...]) -> tuple[int, ...]:
        """The tokens that its next token may not be, after `num_generated`: those that would end it, before
        `min_tokens`."""
        if num_generated >= self.min_tokens:
            return ()
        return self.stop_token_ids + (() if self.ignore_eos else eos_token_ids)

    @property
    def penalized(self) -> bool:
        """Whether its logits depend on the tokens so far (a penalty other than neutral)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflow to inf (NaN probabilities): it is greedy in all but name.
        return self.temperature < GREEDY_BELOW_TEMPERATURE


class Sampler:
    """Samples one token per row on the logits' device, without waiting for it: a sampled row takes the argmax
    of its probabilities over exponential noise (which draws each token with its probability), the noise from
    the row's own generator when it has a seed, else from the sampler's."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._shared = torch.Generator(device=self.device).manual_seed(seed)

    def generator(self, seed: int) -> torch.Generator:
        """A request's own generator, on the sampler's device."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
        masks: TokenMasks | None = None, histories: list[TokenHistory | None] | None = None,
        banned: list[tuple[int, ...]] | None = None,
    ) -> torch.Tensor:
        """logits: (B, V) float32 on the sampler's device; returns B token ids (B,) int64 there. `histories`: the
        tokens so far of each penalized row (None for the others); their penalties change their logits here, in
        place. `banned`: each row's tokens that it may not take (`SamplingParams.banned_tokens`). `masks`: the
        tokens that constrained rows may take; their other logits are set to -inf, after the penalties and bans,
        before greedy and sampled rows alike pick."""
        if histories is not None and any(h is not None for h in histories):
            apply_penalties(logits, params, histories)
        if banned is not None and any(banned):
            ban_tokens(logits, banned)
        if masks is not None:
            apply_token_masks(logits, masks)
        tokens = logits.argmax(dim=-1)  # (B,)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return tokens
        on_device = to_device(rows, self.device)
        probs = self._probabilities(logits[on_device], [params[i] for i in rows])  # (R, V)
        noise = torch.empty_like(probs)  # (R, V)
        shared = [r for r, i in enumerate(rows) if generators[i] is None]
        if shared:
            noise[to_device(shared, self.device)] = torch.empty(
                len(shared), probs.shape[1], device=self.device).exponential_(generator=self._shared)
        for r, i in enumerate(rows):
            if generators[i] is not None:
                noise[r].exponential_(generator=generators[i])
        # Noise of exactly 0 would divide a zero probability into NaN, which argmax would pick.
        tokens[on_device] = (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
        return tokens

    @staticmethod
    def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temperature = to_device([p.temperature for p in params], logits.device, torch.float32)  # (R,)
        scaled = logits.float() / temperature[:, None]  # (R, V)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        vocab = scaled.shape[-1]
        top_k = to_device([p.top_k or vocab for p in params], logits.device)  # (R,)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        cut = rank >= top_k[:, None]
        sorted_probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
        top_p = to_device([p.top_p for p in params], logits.device, torch.float32)  # (R,)
        # Keep the smallest set of tokens whose mass reaches top_p (the first token always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut |= mass_before >= top_p[:, None]
        cut[:, 0] = False  # even where top_p is too small for float32 (it rounds to 0, which would cut them all)
        min_p = to_device([p.min_p for p in params], logits.device, torch.float32)  # (R,)
        cut |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]  # the first token is never below min_p times itself
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        probs = torch.empty_like(scaled).scatter_(-1, order, sorted_logits.softmax(dim=-1))
        return probs


@dataclass(frozen=True)
class TokenHistory:
    """A penalized row's tokens so far: `seen`, every token of its context (prompt and output, for the repetition
    penalty), and `output`, those it generated (for presence and frequency)."""

    seen: list[int]
    output: list[int]


def _counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(R, V) float32: how many times each token occurs in each row."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width + 1), vocab, dtype=torch.int64)  # padded with an id past the vocabulary
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)  # (R, V + 1)
    counts.scatter_add_(1, ids.to(device), torch.ones(ids.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], histories: list[TokenHistory | None]) -> None:
    """The penalties of the rows with a history, in place on logits (B, V): the repetition penalty first, then
    presence and frequency, as vLLM applies them."""
    rows = [i for i, h in enumerate(histories) if h is not None]
    on_device = to_device(rows, logits.device)
    vocab = logits.shape[-1]
    selected = logits[on_device].float()  # (R, V)
    seen = _counts([histories[i].seen for i in rows], vocab, logits.device) > 0  # (R, V)
    repetition = to_device([params[i].repetition_penalty for i in rows], logits.device, torch.float32)[:, None]
    penalized = torch.where(selected > 0, selected / repetition, selected * repetition)
    selected = torch.where(seen, penalized, selected)
    output = _counts([histories[i].output for i in rows], vocab, logits.device)  # (R, V)
    presence = to_device([params[i].presence_penalty for i in rows], logits.device, torch.float32)[:, None]
    frequency = to_device([params[i].frequency_penalty for i in rows], logits.device, torch.float32)[:, None]
    selected -= presence * (output > 0) + frequency * output
    logits[on_device] = selected.to(logits.dtype)


def ban_tokens(logits: torch.Tensor, banned: list[tuple[int, ...]]) -> None:
    """Sets each row's banned tokens' logits to -inf, in place on logits (B, V)."""
    rows = [row for row, tokens in enumerate(banned) for _ in tokens]
    columns = [token for tokens in banned for token in tokens]
    logits[to_device(rows, logits.device), to_device(columns, logits.device)] = float("-inf")
