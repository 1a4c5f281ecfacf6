"""Constrained decoding: a request's output held to a grammar (a JSON schema, any JSON object, a regular expression, a
choice of strings) by a mask of the tokens the grammar allows next, applied to its logits before sampling.

The grammars are xgrammar's (chosen over llguidance by measurement: benchmarks/RESULTS.md, "Constrained decoding").
A `Constraint` is plain data (it crosses process and HTTP boundaries); `ConstraintCompiler` compiles it against the
engine's tokenizer (compiled grammars are cached by the compiler) into a `GrammarState`, which a request advances
with each accepted token; `token_masks` fills one bitmask for a step's constrained rows on the host, and
`apply_token_masks` applies it to the logits on the device in one kernel."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache, cached_property
from types import ModuleType
from typing import TYPE_CHECKING, Literal, get_args

import torch

from parrot_lc.engine.errors import InvalidRequestError
from parrot_lc.engine.host_to_device import to_device

if TYPE_CHECKING:
    import xgrammar
    from transformers import PreTrainedTokenizerBase

ConstraintKind = Literal["json_object", "json_schema", "regex", "choice"]
KINDS: tuple[str, ...] = get_args(ConstraintKind)
# Whitespace between JSON elements: any, but at most this many characters in a row, so that a model that likes
# indentation may indent while one that drifts cannot fill max_tokens with blanks inside a value's frame.
MAX_JSON_WHITESPACE = 32
ANY_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class Constraint:
    """What a generated output must match.

    - `json_schema`: `spec` is the schema as JSON text; the output is one JSON value valid against it (strict: an
      object has no properties beyond those the schema names, unless it allows them).
    - `json_object`: any JSON object (`spec` unused).
    - `regex`: `spec` is the pattern; the whole output matches it.
    - `choice`: `spec` is a JSON list of strings; the output is one of them.

    The engine ends a constrained request when its grammar is complete (the end-of-sequence token is allowed only
    then); `max_tokens` may still cut it."""

    kind: ConstraintKind
    spec: str = ""

    def validate(self) -> None:
        """Raises InvalidRequestError naming `sampling.constraint` if the kind is unknown or the spec is not a
        grammar of that kind (checked without a tokenizer: cheap, before the request reaches an engine)."""
        self.grammar()

    def grammar(self) -> xgrammar.Grammar:
        """The tokenizer-independent grammar; raises InvalidRequestError for a bad constraint."""
        if self.kind not in KINDS:
            raise _invalid(f"kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        try:
            if self.kind == "regex":
                return _xgrammar().Grammar.from_regex(self.spec)
            if self.kind == "choice":
                return _xgrammar().Grammar.from_ebnf(_choice_ebnf(self.spec))
            return _xgrammar().Grammar.from_json_schema(self._schema, **_JSON_OPTIONS)
        except RuntimeError as exc:
            raise _invalid(f"{self.kind} is not valid: {_library_message(exc)}") from None

    @property
    def _schema(self) -> str:
        if self.kind == "json_object":
            return ANY_OBJECT
        try:
            schema = json.loads(self.spec)
        except json.JSONDecodeError as exc:
            raise _invalid(f"json_schema is not JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise _invalid(f"json_schema must be a JSON object (got {type(schema).__name__})")
        return self.spec


_JSON_OPTIONS = dict(any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE, strict_mode=True)


def _choice_ebnf(spec: str) -> str:
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise _invalid(f"choice is not a JSON list: {exc}") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise _invalid("choice must be a JSON list of at least one string")
    # JSON's string escapes are those of xgrammar's EBNF literals.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _invalid(why: str) -> InvalidRequestError:
    return InvalidRequestError(f"sampling.constraint {why}")


def _library_message(exc: RuntimeError) -> str:
    """xgrammar's message without its time stamp and source location."""
    text = str(exc).strip()
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    return text.replace("Check failed: (error.empty()) is false: ", "")


class GrammarState:
    """Where one request's output is in its grammar: advanced with each token it accepts."""

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self.matcher = _xgrammar().GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        """Advances past `token`; False if the grammar does not allow it (the mask makes that a bug)."""
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its end (an end-of-sequence token) accepted: nothing may follow."""
        return self.matcher.is_terminated()


class ConstraintCompiler:
    """Compiles constraints against one tokenizer, for logits `vocab_size` wide (the model's, which may be padded
    past the tokenizer's tokens: those are never allowed); the end of a complete grammar is one of
    `stop_token_ids`. Compiled grammars are cached (xgrammar's cache, by grammar), so a schema that many requests
    share compiles once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)

    @cached_property
    def _compiler(self) -> xgrammar.GrammarCompiler:
        # Built on the first constrained request: reading the vocabulary takes a fraction of a second.
        info = _xgrammar().TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                       stop_token_ids=self.stop_token_ids)
        return _xgrammar().GrammarCompiler(info)

    def compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        """Raises InvalidRequestError for a bad constraint."""
        grammar = constraint.grammar()
        try:
            return self._compiler.compile_grammar(grammar)
        except RuntimeError as exc:
            raise _invalid(f"{constraint.kind} does not compile: {_library_message(exc)}") from None

    def start(self, constraint: Constraint, replay: tuple[int, ...] = ()) -> GrammarState:
        """A new request's state at the start of the grammar, advanced past `replay` (tokens an earlier attempt of
        the same output generated)."""
        state = GrammarState(self.compile(constraint))
        for i, token in enumerate(replay):
            if not state.accept(token):
                raise _invalid(f"the output so far does not match it (token {i}: {token})")
        return state


@dataclass(frozen=True)
class TokenMasks:
    """The allowed tokens of some rows of a step's logits, bit-packed: bit j of row r's word j // 32 is token j."""

    bitmask: torch.Tensor  # (B, ceil(V / 32)) int32 on the logits' device; only `rows` are filled
    rows: torch.Tensor  # (R,) int32 there


def token_masks(states: list[GrammarState | None], vocab_size: int, device: torch.device) -> TokenMasks | None:
    """Fills the masks of the rows that have a grammar (None: no row has one); the others are left unfilled and
    cost nothing."""
    rows = [row for row, state in enumerate(states) if state is not None]
    if not rows:
        return None
    bitmask = torch.empty(len(states), _xgrammar().get_bitmask_shape(1, vocab_size)[1], dtype=torch.int32,
                          pin_memory=device.type == "cuda")  # (B, W)
    if len(rows) == 1:
        states[rows[0]].matcher.fill_next_token_bitmask(bitmask, rows[0])
    else:
        _batch_matcher().batch_fill_next_token_bitmask([states[row].matcher for row in rows], bitmask, rows)
    # Both through page-locked memory: a copy from pageable memory would wait for the device's queued work (the
    # model run of this step). The caching host allocator keeps the pinned buffer until the copy has run.
    return TokenMasks(bitmask.to(device, non_blocking=True), to_device(rows, device, torch.int32))


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks) -> None:
    """Sets the logits of the tokens that a masked row's grammar does not allow to -inf, in place (one kernel).
    logits: (B, V) float32, as wide as the masks' vocabulary."""
    _xgrammar().apply_token_bitmask_inplace(logits, masks.bitmask, vocab_size=logits.shape[-1], indices=masks.rows)


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """Each token's bytes as the model writes them (xgrammar's decoded vocabulary: byte-level and byte-fallback
    tokens back to the UTF-8 they stand for), by token id: a token that splits a character holds its piece of it,
    where the token's text alone is U+FFFD."""
    return _xgrammar().TokenizerInfo.from_huggingface(tokenizer).decoded_vocab


@cache
def _batch_matcher() -> xgrammar.BatchGrammarMatcher:
    """Fills many rows' masks on several threads."""
    return _xgrammar().BatchGrammarMatcher()


@cache
def _xgrammar() -> ModuleType:
    """xgrammar, imported on first use: the import takes most of a second, which no unconstrained run pays."""
    import xgrammar

    return xgrammar
