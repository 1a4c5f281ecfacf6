"""Sessions, Semantic Variables and calls: the request DAG the server sees, and its analysis.

A call is a prompt template of pieces (constant text, input variables, output variables). Variables are the
edges: produced by at most one call, consumed by any number. Analysis finds the DAG's order, rejects cycles
and variables produced twice, deduces each call's scheduling objective from the criteria of fetches, and finds
the prompt prefixes that calls of a graph will share (the same text and the same variables, see
`mark_shared_pieces`).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator, Callable

from parrot_lc.engine.logprobs import TokenLogprob
from parrot_lc.engine.request import RequestOutput
from parrot_lc.engine.sampling import SamplingParams
from parrot_lc.server.errors import GraphError


class Criterion(str, Enum):
    LATENCY = "latency"
    THROUGHPUT = "throughput"


@dataclass
class Piece:
    """One piece of a template: constant `text`, or a variable (`var_id`) that is an input or an output."""

    kind: str  # "text" | "input" | "output"
    text: str = ""
    var_id: str = ""
    sampling: SamplingParams | None = None  # outputs only


class TextStream:
    """The text of an output as it is generated, for one consumer. Pieces that arrive while the consumer is busy
    wait in a list and leave joined: a consumer that runs behind (a slow client, a busy event loop) sends fewer,
    larger chunks. A wait costs one future, not a task per piece, since there is a wait per token and stream."""

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._closed = False
        self._waiter: asyncio.Future | None = None

    def push(self, text: str) -> None:
        self._pieces.append(text)
        self._wake()

    def close(self) -> None:
        """No more pieces come: the consumer ends once it has taken what is left."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            if self._pieces:
                text = "".join(self._pieces)
                self._pieces.clear()
                yield text
            elif self._closed:
                return
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None


@dataclass(frozen=True)
class Generated:
    """How a call generated an output: why it ended (`finish_reason`: "stop" or "length"; `stop_reason`, vLLM's: the
    stop string or token that ended it, if one did), the tokens of the call's context before it (`prompt_tokens`: the
    call's prompt, for its first output; of those, `cached_tokens` whose KV the call did not compute) and its own
    (`completion_tokens`)."""

    finish_reason: str | None
    stop_reason: str | int | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(eq=False)
class Variable:
    var_id: str
    session_id: str
    name: str = ""
    value: str | None = None
    error: str | None = None
    error_code: str | None = None  # OpenAI's code of why its producer failed, where one applies
    generated: Generated | None = None  # None for a value the client set
    producer: "Call | None" = None
    consumers: list["Call"] = field(default_factory=list)
    criterion: Criterion | None = None  # deduced: its own fetch's, a consumer's, or latency (a sink at submission)
    fetched: Criterion | None = None  # the criterion its first fetch named
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    deltas: TextStream | None = None  # when set, the producer streams text pieces here as they come

    def set(self, value: str, generated: Generated | None = None) -> None:
        self.value, self.generated = value, generated
        self._end()

    def fail(self, error: str, code: str | None = None) -> None:
        self.error, self.error_code = error, code
        self._end()

    def _end(self) -> None:
        self.ready.set()
        if self.deltas is not None:
            self.deltas.close()


class CallState(str, Enum):
    WAITING = "waiting"  # for its inputs
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class CallOutcome(str, Enum):
    """How a finished call ended, as `parrot_calls_finished_total{state}` counts it. A cancelled call is FAILED to
    its session (its outputs fail, and so do the calls that read them), but it is no failure of the server: its
    client went away, it or its session was deleted, or it still ran at the shutdown deadline."""

    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class CallProgress:
    """What a call's context holds past its prompt. A call that runs again (on another engine after its engine
    died, or after waiting for KV memory) resumes from here: outputs already set are not generated again, and an
    output's text already generated (and perhaps streamed to a client) is neither sent twice nor replaced."""

    token_ids: list[int] = field(default_factory=list)  # filled or generated after the prompt, in order
    outputs_done: int = 0
    started: bool = False  # the output in progress has its text before it in `token_ids`
    pieces: list[str] = field(default_factory=list)  # its text so far
    tokens: int = 0  # its tokens so far
    resumed: bool = False  # its text has yet to be continued after a rerun began

    def took(self, text_ids: list[int], event: RequestOutput, decode: Callable[[list[int]], str]) -> str:
        """Notes an event of the request that filled `text_ids` (the text before the output) and generates it;
        returns the event's text. The first text after a resume is decoded here with the tokens before it: the
        engine decodes only the request's own, and some tokenizers drop a space at the start of a text."""
        if not self.started:
            self.token_ids += text_ids
            self.started = True
        self.token_ids += event.token_ids
        self.tokens += len(event.token_ids)
        text = event.text
        if self.resumed and text:
            self.resumed = False
            before, whole = "".join(self.pieces), decode(self.output_ids)
            if whole.startswith(before) and not whole.endswith("\ufffd"):
                text = whole[len(before):]
        self.pieces.append(text)
        return text

    @property
    def output_ids(self) -> list[int]:
        """The tokens generated so far of the output in progress."""
        return self.token_ids[len(self.token_ids) - self.tokens:]

    def resume(self, decode: Callable[[list[int]], str]) -> int:
        """Prepares a rerun: drops the output's last tokens whose text was not given out yet (a character whose
        bytes had not all come, a possible start of a stop string), which the rerun generates again; returns
        how many it dropped."""
        if not self.tokens:
            return 0
        given, ids = "".join(self.pieces), self.output_ids
        kept = next((k for k in range(len(ids), -1, -1) if decode(ids[:k]) == given), len(ids))
        del self.token_ids[len(self.token_ids) - (len(ids) - kept):]
        self.tokens, self.resumed = kept, True
        return len(ids) - kept

    def output_done(self) -> str:
        """Ends the output in progress; returns its text."""
        text = "".join(self.pieces)
        self.outputs_done += 1
        self.started, self.pieces, self.tokens = False, [], 0
        return text


@dataclass(eq=False)
class Call:
    call_id: str
    session_id: str
    pieces: list[Piece]
    state: CallState = CallState.WAITING
    error: str | None = None
    latency_critical: bool = False
    task_group: str | None = None  # calls of one group are scheduled for the group's completion
    task: asyncio.Task | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those whose KV its session did not compute (PrefixEntry.computed_for)
    completion_tokens: int = 0
    finish_reason: str | None = None  # of the last output
    stop_reason: str | int | None = None  # of the last output: the stop string or token that ended it (vLLM's)
    progress: "CallProgress" = field(default_factory=lambda: CallProgress())
    # The prompt's token ids (the text before the first output), when the submitter has tokenized it already (an
    # OpenAI-compatible request, for its length check): a long prompt is tokenized once, not again here.
    prompt_token_ids: list[int] | None = None
    # Leading pieces that another call of its graph begins with too (`mark_shared_pieces`); 0: none.
    shared_pieces: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of its output's tokens, where its sampling asks
    prompt_logprobs: list[TokenLogprob] | None = None  # of its prompt's tokens, where its sampling asks

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether its first output asks for its prompt's log-probabilities: then it computes its whole prompt
        itself, since a prefix context's tokens would have none."""
        first = next(piece.sampling for piece in self.pieces if piece.kind == "output")
        return first is not None and first.prompt_logprobs is not None

    @property
    def shares_variables(self) -> bool:
        """Whether the prefix it shares in its graph holds a variable's value (see `mark_shared_pieces`)."""
        return any(piece.kind == "input" for piece in self.pieces[:self.shared_pieces])

    @property
    def inputs(self) -> list[str]:
        return [p.var_id for p in self.pieces if p.kind == "input"]

    @property
    def outputs(self) -> list[str]:
        return [p.var_id for p in self.pieces if p.kind == "output"]

    @property
    def constant_prefix(self) -> str:
        """The text before the first variable where the template goes on after it (a role before its inputs, a
        chat's system part before the rest): shared by every call of the template. A prompt that is one text (an
        OpenAI completion) has none: a context of its own to fork it from would cost a step and hold KV for no
        other call (calls of one graph that repeat it still share it, see `mark_shared_pieces`)."""
        if len(self.pieces) > 1 and self.pieces[0].kind == "text" and self.pieces[1].kind != "output":
            return self.pieces[0].text
        return ""


def mark_shared_pieces(calls: list[Call]) -> None:
    """Sets each call's `shared_pieces`: the most pieces before its first output that another of the calls begins
    with too (the same texts, the same input variables). Once those inputs have values, such calls' prompts begin
    with the same text, which is then filled once and forked: prefix sharing through Semantic Variables (a
    design and a codebase that every agent of a round reads), not only through a template's constant text."""
    def key(piece: Piece) -> tuple[str, str]:
        return (piece.kind, piece.text if piece.kind == "text" else piece.var_id)

    heads = [[key(p) for p in itertools.takewhile(lambda p: p.kind != "output", call.pieces)] for call in calls]
    # In sorted order the head that begins like a head longest is one of its neighbours: n log n comparisons,
    # not a count of every prefix of every head (quadratic in a call's pieces).
    order = sorted(range(len(calls)), key=heads.__getitem__)
    common = [_common_pieces(heads[a], heads[b]) for a, b in zip(order, order[1:])]  # of neighbours in order
    for rank, index in enumerate(order):
        before = common[rank - 1] if rank > 0 else 0
        after = common[rank] if rank < len(common) else 0
        calls[index].shared_pieces = max(before, after)


def _common_pieces(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass(eq=False)
class Session:
    session_id: str
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    variables: dict[str, Variable] = field(default_factory=dict)
    calls: dict[str, Call] = field(default_factory=dict)
    # (engine name, prefix key) of the prefix contexts made of this session's variables' values: no other
    # session's prompts begin with them, so they are freed with the session.
    variable_prefixes: set[tuple[str, str]] = field(default_factory=set)
    client: str | None = None  # the API key it was opened with (a label, not the key), for per-key limits
    queued: int = 0  # its unfinished calls
    waiting: int = 0  # fetches waiting for a value
    last_used: float = field(default_factory=time.monotonic)  # when a request last named it, or a call ended


def validate_new_calls(session: Session, calls: list[Call]) -> None:
    """Rejects graphs that cannot run: unknown variables, a variable produced twice, an output that is also an
    input of the same call, and cycles (through the new calls and the session's earlier ones). A new call is named
    by its place in the request (`calls.1`, its template's pieces `calls.1.template.2`): the client never saw the
    ids of a refused submission's calls."""
    produced: dict[str, str] = {}
    place = {call.call_id: f"calls.{index}" for index, call in enumerate(calls)}
    for call in calls:
        at = place[call.call_id]
        if not any(p.kind == "output" for p in call.pieces):
            raise GraphError(f"{at} has no output variable", field=f"{at}.template")
        for number, piece in enumerate(call.pieces):
            if piece.kind != "text" and piece.var_id not in session.variables:
                raise GraphError(f"unknown variable {piece.var_id!r}", field=f"{at}.template.{number}.{piece.kind}")
        for number, piece in enumerate(call.pieces):
            if piece.kind != "output":
                continue
            variable = session.variables[piece.var_id]
            if variable.producer is not None or variable.value is not None or piece.var_id in produced:
                raise GraphError(f"variable {piece.var_id!r} is produced twice (or was already set)",
                                 field=f"{at}.template.{number}.output")
            if piece.var_id in call.inputs:
                raise GraphError(f"{at} reads its own output {piece.var_id!r}", field=f"{at}.template.{number}.output")
            produced[piece.var_id] = call.call_id
    # A cycle through the new calls may pass through the session's earlier ones: an earlier call that reads a
    # variable no call produced yet (the client was to set it) depends on the new call that produces it now.
    by_id = {c.call_id: c for c in calls}

    def producer(var_id: str) -> Call | None:
        new = produced.get(var_id)
        return by_id[new] if new is not None else session.variables[var_id].producer

    _check_acyclic(calls, lambda call: [p for v in dict.fromkeys(call.inputs) if (p := producer(v)) is not None],
                   lambda call: place.get(call.call_id, call.call_id))


def _check_acyclic(roots: list[Call], producers: Callable[[Call], list[Call]], name: Callable[[Call], str]) -> None:
    """Raises GraphError if a call reachable from `roots` (through `producers`, a call's input producers) reads,
    through others, its own output; the error names the calls by `name` (the first of the new ones as its field).
    Depth-first with a stack of its own: a chain of thousands of calls is a graph to run, not a recursion limit to
    hit."""
    finished: set[str] = set()
    for root in roots:
        if root.call_id in finished:
            continue
        path, on_path = [root], {root.call_id}
        stack = [iter(producers(root))]
        while stack:
            dep = next(stack[-1], None)
            if dep is None:
                stack.pop()
                done = path.pop().call_id
                on_path.discard(done)
                finished.add(done)
                continue
            if dep.call_id in on_path:
                cycle = path[path.index(dep):] + [dep]
                raise GraphError(f"the calls form a cycle: {' -> '.join(map(name, cycle))}", field=name(root))
            if dep.call_id in finished:
                continue
            path.append(dep)
            on_path.add(dep.call_id)
            stack.append(iter(producers(dep)))


def fetch_objective(session: Session, variable: Variable, criterion: Criterion) -> None:
    """A fetch names its variable's criterion (the first fetch decides). A sink was assumed latency-critical when
    it was submitted; a fetch that names throughput instead re-deduces the session's calls that have not started
    (those that run keep their priority)."""
    if variable.fetched is not None:
        return
    variable.fetched = criterion
    if variable.criterion is None:
        deduce_objectives(session, variable, criterion)
    elif variable.criterion is not criterion:
        deduce_session_objectives(session)


def deduce_session_objectives(session: Session) -> None:
    """Deduces every waiting call's objective afresh from the fetched variables and the sinks no fetch has named
    yet (latency), latency first: a call on a latency-critical path stays there whatever else fetches it."""
    for call in session.calls.values():
        if call.state is CallState.WAITING:
            call.latency_critical, call.task_group = False, None
    roots = []
    for variable in session.variables.values():
        variable.criterion = None
        if variable.fetched is not None:
            roots.append((variable, variable.fetched))
        elif variable.producer is not None and not variable.consumers:
            roots.append((variable, Criterion.LATENCY))
    for variable, criterion in sorted(roots, key=lambda root: root[1] is not Criterion.LATENCY):
        deduce_objectives(session, variable, criterion)


def deduce_objectives(session: Session, variable: Variable, criterion: Criterion) -> None:
    """Propagates a fetch's criterion backwards through the DAG (Parrot's objective deduction).

    Two or more producers feeding one consumer finish together only when the slowest does: they form a task
    group, scheduled for the group's completion (throughput). Any other producer on the way back from a
    latency fetch is a step of the critical path: latency-critical.
    """
    # Preorder depth-first with a stack of its own (a chain of thousands of calls is no recursion limit to hit):
    # a consumer puts its producers into task groups before any of them is visited, as recursion would.
    stack = [variable]
    while stack:
        variable = stack.pop()
        if variable.criterion is not None:
            continue
        variable.criterion = criterion
        call = variable.producer
        if call is None:
            continue
        if criterion is Criterion.LATENCY and call.task_group is None:
            call.latency_critical = True
        inputs = [session.variables[v] for v in dict.fromkeys(call.inputs)]
        producers = list(dict.fromkeys(v.producer for v in inputs if v.producer is not None))
        if len(producers) >= 2:
            for producer in producers:
                if producer.task_group is None and not producer.latency_critical:
                    producer.task_group = f"group:{call.call_id}"
        stack.extend(reversed(inputs))
