"""The Parrot manager: sessions, variables and call graphs, executed on engines with prefix sharing.

It knows nothing of HTTP. A call runs as soon as its inputs have values (no client round trip): its prompt
is tokenized, the longest constant prefix it shares with its template is taken from (or filled into) a warm
prefix context on the engine that holds it, the call forks a context from there, and each output is
generated into it with the output's sampling settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from transformers import PreTrainedTokenizerBase

from parrot_lc.engine.errors import ContextTooLargeError, EngineError, EngineUnavailableError, OutOfMemoryError
from parrot_lc.engine.request import RequestOutput, text_decoder
from parrot_lc.engine.sampling import SamplingParams
from parrot_lc.server.engine_client import EngineClient
from parrot_lc.server.errors import (
    CallFailedError,
    ForbiddenError,
    NotFoundError,
    QueueFullError,
    ServerError,
    ShuttingDownError,
    TooManyEnginesError,
    VariableTimeoutError,
)
from parrot_lc.server.graph import (
    Call,
    CallState,
    Criterion,
    Piece,
    Session,
    TextStream,
    Variable,
    deduce_objectives,
    fetch_objective,
    mark_shared_pieces,
    validate_new_calls,
)
from parrot_lc.server.prefix_cache import PrefixCache, PromptPrefix
from parrot_lc.server.remote_engine import RemoteEngine
from parrot_lc.server.tasks import start_now
from parrot_lc.settings import ServerSettings

LATENCY_PRIORITY, GROUP_PRIORITY, DEFAULT_PRIORITY = 2, 1, 0
DEFAULT_MAX_TOKENS = 256  # of a completion that does not say (the OpenAI-compatible endpoints)
# A call refused for want of KV waits for another call to end (at most this long) and runs again; after this
# many waits in which nothing ended, it fails.
OOM_RETRY_SECONDS, OOM_IDLE_WAITS = 1.0, 3
log = logging.getLogger("parrot_lc.manager")


@dataclass
class Completion:
    """A running one-call graph: its text streams out of `deltas()`; `call` holds usage once it is done."""

    call: Call
    output: Variable
    session: Session

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces as they are generated; raises CallFailedError if the call fails. Pieces that queued up
        while the consumer was busy come out joined: a server running behind sends fewer, larger chunks."""
        async for text in self.output.deltas:
            yield text
        if self.output.error is not None:
            raise CallFailedError(self.output.error)


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


@dataclass(eq=False)
class EngineSlot:
    """An engine as the manager sees it: its prefix contexts and the calls running on it."""

    name: str
    engine: EngineClient
    prefixes: PrefixCache
    background: asyncio.Semaphore  # caps the calls that are not latency-critical
    running: int = 0
    call_ended: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) as each call ends
    placed: int = 0  # calls ever placed here: breaks ties in load, so idle engines take turns
    last_heartbeat: float = 0.0  # remote engines only
    token: str | None = None  # remote engines: given at registration, carried by each heartbeat


def common_length(a: list[int], b: list[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case for a prefix and its prompt, compared in C rather than id by id
        return n
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


@dataclass(frozen=True)
class ModelInfo:
    """What the manager must know of the model all its engines serve."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    max_context: int


class ParrotManager:
    def __init__(self, model: ModelInfo, engines: list[EngineClient], settings: ServerSettings | None = None) -> None:
        settings = settings or ServerSettings()
        self.settings = settings
        self.model = model
        self.tokenizer = model.tokenizer
        self.vocab_size = model.vocab_size
        self.max_context = model.max_context
        self.max_prefixes_per_engine = settings.max_prefixes_per_engine
        self.prefix_cache_fraction = settings.prefix_cache_fraction
        self.max_background_calls = settings.max_background_calls_per_engine
        self.max_queued_calls = settings.max_queued_calls
        self.app_centric = settings.app_centric  # off: no prefix sharing, one priority, no background cap (the baseline)
        max_prefixes_per_engine = settings.max_prefixes_per_engine
        # As many prefixes as an engine keeps warm contexts for: the ones in use.
        self._decode = text_decoder(self.tokenizer) if self.tokenizer is not None else lambda ids: ""
        self._prefix_tokens = PrefixTokens(self.tokenize, max_prefixes_per_engine, self.max_context)
        # Special tokens that a text may be split before (one that strips the spaces before it may not), and
        # whether the tokenizer adds its own special tokens only at the start (an end-of-text one would land in
        # the middle of a prompt tokenized in two parts).
        self._boundary_tokens: tuple[str, ...] = ()
        self._splits_at_special_tokens = False
        if self.tokenizer is not None:
            self._boundary_tokens = tuple(t.content for t in self.tokenizer.added_tokens_decoder.values()
                                          if t.special and not t.lstrip)
            plain = self.tokenizer("x", add_special_tokens=False).input_ids
            self._splits_at_special_tokens = self.tokenizer("x").input_ids[-len(plain):] == plain
        self.queued_calls = 0  # submitted and not finished, in every session: what max_queued_calls bounds
        self.queued_by_client: dict[str, int] = {}  # the same, by API key (where max_queued_calls_per_key bounds)
        self.rejected_calls = 0
        self._engine_numbers = itertools.count()
        self.engines: list[EngineSlot] = []
        for engine in engines:
            self.add_engine(engine)
        self.sessions: dict[str, Session] = {}
        self._ids = itertools.count()
        self._group_engines: dict[str, EngineSlot] = {}
        self.calls_finished = {CallState.DONE: 0, CallState.FAILED: 0}
        self.draining = False  # set by drain(): new sessions and calls are refused

    # ---- engines ----------------------------------------------------------------------------------

    def add_engine(self, engine: EngineClient) -> EngineSlot:
        """A slot named `engine-N`, N never used before by this manager: a name given again after its engine was
        dropped would let the heartbeats of one engine process keep another's slot alive."""
        slot = EngineSlot(f"engine-{next(self._engine_numbers)}", engine,
                          PrefixCache(engine, self.max_prefixes_per_engine, self.prefix_cache_fraction),
                          asyncio.Semaphore(self.max_background_calls), last_heartbeat=time.monotonic())
        self.engines.append(slot)
        return slot

    def add_remote_engine(self, engine: RemoteEngine) -> EngineSlot:
        """Adds a registered engine process, with a token of its own for its heartbeats. One registered before at
        the same URL is dropped first (a restarted process holds none of its contexts, and one address serves one
        engine); past max_remote_engines, TooManyEnginesError."""
        for old in self._remote_slots():
            if old.engine.url == engine.url:
                log.warning("engine %s registers again: it replaces %s", engine.url, old.name)
                self.drop_engine(old)
        most = self.settings.max_remote_engines
        if len(self._remote_slots()) >= most:
            raise TooManyEnginesError(f"the server holds {most} remote engines already (its max_remote_engines): "
                                      "stop one, or raise the limit", field="url")
        slot = self.add_engine(engine)
        slot.token = secrets.token_urlsafe(24)
        return slot

    def remote_slot(self, name: str, token: str | None) -> EngineSlot:
        """The remote engine registered as `name` with `token` (compared in constant time). Anything else is
        NotFoundError, on which an engine process registers again: its slot was dropped, or the name is another
        engine's (given by this run of the server, when the engine registered with an earlier one)."""
        slot = next((s for s in self.engines if s.name == name), None)
        if slot is None:
            raise NotFoundError(f"unknown engine {name!r}: register again", field="name")
        if slot.token is None:
            raise NotFoundError(f"engine {name!r} runs in the server: it sends no heartbeats", field="name")
        if token is None or not secrets.compare_digest(token.encode("utf-8", "replace"), slot.token.encode()):
            raise NotFoundError(f"engine {name!r} is not the one registered with this token: register again",
                                field="name")
        return slot

    def _remote_slots(self) -> list[EngineSlot]:
        return [s for s in self.engines if isinstance(s.engine, RemoteEngine)]

    def drop_engine(self, slot: EngineSlot) -> None:
        """Forgets an engine that died: its calls fail over to the others as they notice."""
        if slot in self.engines:
            self.engines.remove(slot)
            self._group_engines = {g: s for g, s in self._group_engines.items() if s is not slot}
            if isinstance(slot.engine, RemoteEngine):
                slot.engine.close()

    def drop_silent_engines(self, timeout: float) -> list[str]:
        """Drops remote engines whose last heartbeat is older than `timeout` seconds."""
        now = time.monotonic()
        silent = [s for s in self._remote_slots() if now - s.last_heartbeat > timeout]
        for slot in silent:
            self.drop_engine(slot)
        return [s.name for s in silent]

    # ---- sessions and variables -------------------------------------------------------------------

    def create_session(self, client: str | None = None) -> Session:
        """A new session of `client` (a label of the API key it came with, for per-key limits)."""
        self._check_accepting()
        session = Session(secrets.token_urlsafe(12), client=client)
        self.sessions[session.session_id] = session
        return session

    def session(self, session_id: str, token: str | None) -> Session:
        """The session, if `token` is its own (compared in constant time)."""
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFoundError(f"unknown session {session_id!r}", field="session_id")
        if token is None or not secrets.compare_digest(token.encode("utf-8", "replace"), session.token.encode()):
            raise ForbiddenError("this session token does not open that session", field="session_token")
        session.last_used = time.monotonic()
        return session

    async def delete_session(self, session: Session) -> None:
        """Cancels the session's calls; their contexts are freed as they stop, and so are the prefix contexts
        made of its variables' values. Fetches still waiting (for a value the client was to set) fail."""
        self.sessions.pop(session.session_id, None)
        tasks = [c.task for c in session.calls.values() if c.task is not None and not c.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for variable in session.variables.values():
            if not variable.ready.is_set():
                variable.fail("the session was deleted")
        for slot in self.engines:
            keys = [key for name, key in session.variable_prefixes if name == slot.name]
            try:
                await slot.prefixes.discard(keys)
            except EngineError as exc:  # an engine that went away took its contexts with it
                log.warning("could not free a prefix of %s: %s", slot.name, exc)

    def check_new_variables(self, session: Session, count: int) -> None:
        """Refuses `count` more variables in the session past max_variables_per_session (before any is made)."""
        limit = self.settings.max_variables_per_session
        if len(session.variables) + count > limit:
            raise ServerError(f"the session has {len(session.variables)} variables; {count} more would pass "
                              f"max_variables_per_session={limit}: delete the session and start another",
                              field="variables")

    def create_variable(self, session: Session, name: str = "", value: str | None = None) -> Variable:
        self.check_new_variables(session, 1)
        variable = Variable(f"v{next(self._ids)}", session.session_id, name=name)
        session.variables[variable.var_id] = variable
        if value is not None:
            variable.set(value)
        return variable

    def variable(self, session: Session, var_id: str) -> Variable:
        try:
            return session.variables[var_id]
        except KeyError:
            raise NotFoundError(f"unknown variable {var_id!r} in this session", field="var_id") from None

    def set_variable(self, session: Session, var_id: str, value: str) -> None:
        variable = self.variable(session, var_id)
        if variable.producer is not None:
            raise ServerError(f"variable {var_id!r} is produced by call {variable.producer.call_id}", field="value")
        if variable.ready.is_set():
            raise ServerError(f"variable {var_id!r} already has a value", field="value")
        variable.set(value)

    async def get_variable(
        self, session: Session, var_id: str, criterion: Criterion = Criterion.LATENCY, timeout: float | None = None
    ) -> str:
        """Waits for the variable's value; the criterion steers how its producers are scheduled."""
        if timeout is not None and not 0 <= timeout < math.inf:  # NaN fails both comparisons
            raise ServerError(f"timeout must be a finite number of seconds, at least 0; got {timeout}", field="timeout")
        variable = self.variable(session, var_id)
        fetch_objective(session, variable, criterion)
        session.waiting += 1
        try:
            await asyncio.wait_for(variable.ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise VariableTimeoutError(f"variable {var_id!r} has no value after {timeout} s", field="timeout") from None
        finally:
            session.waiting -= 1
            session.last_used = time.monotonic()
        if variable.error is not None:
            raise CallFailedError(variable.error, field="var_id")
        return variable.value

    # ---- calls ------------------------------------------------------------------------------------

    def submit(
        self, session: Session, pieces_of_calls: list[list[Piece]], prompt_token_ids: list[list[int]] | None = None
    ) -> list[Call]:
        """Adds a graph of calls to the session; each starts as soon as its inputs have values (one whose inputs
        have values starts here, up to its first wait). `prompt_token_ids`, if given, are each call's prompt
        tokenized (`tokenize`; only for calls whose prompts are all text)."""
        self._check_accepting()
        calls = [Call(f"c{next(self._ids)}", session.session_id, pieces) for pieces in pieces_of_calls]
        for call, token_ids in zip(calls, prompt_token_ids or ()):
            call.prompt_token_ids = token_ids
        validate_new_calls(session, calls)
        for index, call in enumerate(calls):
            for piece in call.pieces:
                if piece.sampling is not None:
                    piece.sampling.validate(self.vocab_size)
                    if piece.sampling.max_tokens >= self.max_context:
                        raise ServerError(f"sampling.max_tokens is {piece.sampling.max_tokens}; the model's context "
                                          f"is {self.max_context}", field=f"calls.{index}.sampling.max_tokens")
        self._check_room(session, len(calls))
        # Nothing below fails: every call counted into the queue runs (or is cancelled), and leaves it as it ends.
        mark_shared_pieces(calls)
        for call in calls:
            session.calls[call.call_id] = call
            for var_id in call.inputs:
                session.variables[var_id].consumers.append(call)
            for var_id in call.outputs:
                session.variables[var_id].producer = call
        # Variables that nothing consumes are what the client will fetch: latency unless it says otherwise.
        for call in calls:
            for var_id in call.outputs:
                variable = session.variables[var_id]
                if not variable.consumers:
                    deduce_objectives(session, variable, Criterion.LATENCY)
        self._queue(session, len(calls))
        for call in calls:
            call.task = start_now(self._run(session, call))
            # A done callback, not the task's own `finally`: a task cancelled before it started never runs that.
            call.task.add_done_callback(lambda _, session=session: self._unqueue(session))
        return calls

    def _queue_limits(self, session: Session) -> list[tuple[int, int, str, str]]:
        """(calls queued, limit, the limit's setting, whose queue) of each queue that a call of `session` joins."""
        settings = self.settings
        limits = [(self.queued_calls, settings.max_queued_calls, "max_queued_calls", "the server queues"),
                  (session.queued, settings.max_queued_calls_per_session, "max_queued_calls_per_session",
                   "this session has")]
        if session.client is not None and settings.max_queued_calls_per_key is not None:
            limits.append((self.queued_by_client.get(session.client, 0), settings.max_queued_calls_per_key,
                           "max_queued_calls_per_key", "this API key has"))
        return limits

    def _check_room(self, session: Session, count: int) -> None:
        """Refuses `count` more calls of `session` where a queue they join has no room: 429 while it is full, 400
        for a graph larger than the queue itself. Counts nothing (`_queue` does, once nothing can fail)."""
        for queued, limit, setting, whose in self._queue_limits(session):
            if count > limit:
                raise ServerError(f"a graph of {count} calls is more than {whose} room for ({setting}={limit}): "
                                  "submit it in parts", field="calls")
            if queued + count > limit:
                self.rejected_calls += count
                raise QueueFullError(f"{whose} {queued} unfinished calls ({setting}={limit}): retry later",
                                     field="calls")

    def _queue(self, session: Session, count: int) -> None:
        self.queued_calls += count
        session.queued += count
        if session.client is not None:
            self.queued_by_client[session.client] = self.queued_by_client.get(session.client, 0) + count

    def _unqueue(self, session: Session) -> None:
        self.queued_calls -= 1
        session.queued -= 1
        session.last_used = time.monotonic()
        if session.client is not None:
            left = self.queued_by_client[session.client] - 1
            if left:
                self.queued_by_client[session.client] = left
            else:
                del self.queued_by_client[session.client]

    async def expire_idle_sessions(self) -> list[str]:
        """Deletes the sessions that no request has named for session_idle_timeout seconds and that have no
        unfinished call (their clients went away without deleting them); returns their ids."""
        deadline = time.monotonic() - self.settings.session_idle_timeout
        idle = [s for s in self.sessions.values() if s.queued == 0 and s.waiting == 0 and s.last_used < deadline]
        for session in idle:
            await self.delete_session(session)
        return [s.session_id for s in idle]

    async def cancel_call(self, session: Session, call_id: str) -> None:
        """Stops a call of the session (its outputs fail, and so do the calls that wait for them); its
        context is freed as it stops. A call that has finished stays as it is."""
        call = session.calls.get(call_id)
        if call is None:
            raise NotFoundError(f"unknown call {call_id!r} in this session", field="call_id")
        if call.task is not None and not call.task.done():
            call.task.cancel()
            await asyncio.gather(call.task, return_exceptions=True)

    async def _run(self, session: Session, call: Call) -> None:
        try:
            inputs = [session.variables[v] for v in dict.fromkeys(call.inputs)]
            await asyncio.gather(*(v.ready.wait() for v in inputs))
            failed = [v for v in inputs if v.error is not None]
            if failed:
                raise CallFailedError(f"input {failed[0].var_id} failed: {failed[0].error}")
            call.state = CallState.RUNNING
            await self._execute(session, call)  # DONE once its outputs are set, before its context is freed
        except asyncio.CancelledError:
            if call.state is not CallState.DONE:  # else only the freeing of its context was cut short
                call.state = CallState.FAILED
                self._fail_outputs(session, call, "the call was cancelled")
            raise
        except (EngineError, ServerError) as exc:
            log.info("call %s failed: %s", call.call_id, exc)
            call.state, call.error = CallState.FAILED, str(exc)
            self._fail_outputs(session, call, f"call {call.call_id} failed: {exc}")
        except Exception:  # a bug: the call fails visibly instead of leaving its consumers waiting forever
            log.exception("call %s failed unexpectedly", call.call_id)
            call.state, call.error = CallState.FAILED, "internal error (logged on the server)"
            self._fail_outputs(session, call, f"call {call.call_id} failed: internal error (logged on the server)")
        finally:
            if call.state in self.calls_finished:
                self.calls_finished[call.state] += 1

    def _fail_outputs(self, session: Session, call: Call, error: str) -> None:
        for var_id in call.outputs:
            variable = session.variables[var_id]
            if not variable.ready.is_set():
                variable.fail(error)

    async def _execute(self, session: Session, call: Call) -> None:
        """Runs the call on an engine; if that engine dies under it, again from the start on another."""
        segments = self._segments(session, call)
        token_ids = call.prompt_token_ids if call.prompt_token_ids is not None else self.tokenize(segments[0][0])
        if not token_ids:  # its inputs' values were empty: an engine has nothing to compute its first token from
            raise ServerError("the prompt before the call's first output is empty", field="template")
        call.prompt_tokens = len(token_ids)
        prefix = self._shared_prefix(self._prefix_text(session, call), token_ids) if self.app_centric else None
        while True:
            slot = self._place(call, prefix)
            if prefix is not None and call.shares_variables:
                session.variable_prefixes.add((slot.name, prefix.key))
            try:
                return await self._execute_on(slot, session, call, segments, token_ids, prefix)
            except EngineUnavailableError:
                self.drop_engine(slot)  # the call resumes on another engine where this one stopped (CallProgress)

    async def _execute_on(
        self, slot: EngineSlot, session: Session, call: Call, segments, token_ids: list[int],
        prefix: PromptPrefix | None,
    ) -> None:
        priority = DEFAULT_PRIORITY  # request-level serving: one priority for all
        if self.app_centric:
            priority = LATENCY_PRIORITY if call.latency_critical else GROUP_PRIORITY if call.task_group else priority
        context_id = f"{session.session_id}/{call.call_id}"
        slot.placed += 1
        async with nullcontext() if call.latency_critical or not self.app_centric else slot.background:
            idle_waits = 0
            while True:
                try:
                    return await self._execute_in_context(slot, session, call, segments, token_ids, prefix,
                                                          priority, context_id)
                except ContextTooLargeError:
                    raise  # longer than the whole cache: no wait makes room
                except OutOfMemoryError:
                    # The KV cache is full of contexts that wait (filled calls, warm prefixes), which the engine
                    # cannot preempt; this call's context is freed: resume it once another call has ended. Not
                    # after waits in which nothing ended or was evicted: then it cannot fit at all.
                    ended = slot.call_ended  # taken after this attempt's own end, which set the previous one
                    evicted = await slot.prefixes.evict()
                    if idle_waits >= OOM_IDLE_WAITS:
                        raise
                    try:
                        await asyncio.wait_for(ended.wait(), OOM_RETRY_SECONDS)
                        idle_waits = 0
                    except asyncio.TimeoutError:
                        idle_waits += 0 if evicted else 1

    async def _execute_in_context(
        self, slot: EngineSlot, session: Session, call: Call, segments, token_ids: list[int],
        prefix: PromptPrefix | None, priority: int, context_id: str,
    ) -> None:
        slot.running += 1
        progress = call.progress
        call.completion_tokens -= progress.resume(self._decode)
        first_request = True  # of this attempt: it creates the context, from the prefix, with all done before
        try:
            for index, (text, output) in enumerate(segments):
                if index < progress.outputs_done:
                    continue
                # The text before each output is filled by the request that generates the output.
                ids = [] if index == 0 or not text or progress.started else self.tokenizer(
                    text, add_special_tokens=False).input_ids
                if output is None:
                    if ids and not first_request:
                        await slot.engine.fill(ids, context_id, priority=priority)
                    break
                variable = session.variables[output.var_id]
                sampling = output.sampling
                if progress.tokens:  # resumed: generate what the last attempt did not
                    sampling = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - progress.tokens)
                if sampling.max_tokens > 0:
                    events = (self._start_call_context(slot, context_id, prefix, token_ids + progress.token_ids + ids,
                                                       sampling, priority) if first_request else
                              slot.engine.generate(sampling, context_id, priority=priority, token_ids=ids))
                    first_request = False
                    async for event in events:
                        text = progress.took(ids, event, self._decode)
                        call.completion_tokens += len(event.token_ids)
                        call.finish_reason = event.finish_reason
                        if variable.deltas is not None and text:
                            variable.deltas.push(text)
                variable.set(progress.output_done())
            call.state = CallState.DONE  # its outputs are set: a client that reads one finds the call done
        finally:
            slot.running -= 1
            await self._free_quietly(slot, context_id)
            slot.call_ended.set()
            slot.call_ended = asyncio.Event()

    async def _start_call_context(
        self, slot: EngineSlot, context_id: str, prefix: PromptPrefix | None, token_ids: list[int],
        sampling: SamplingParams, priority: int,
    ) -> AsyncIterator[RequestOutput]:
        """Forks the call's context from the warm prefix context, fills the rest of its prompt and generates its
        first output: one engine request, whose events this yields."""
        # Never empty: _shared_prefix leaves the call a token of its own.
        rest = token_ids[len(prefix.token_ids):] if prefix is not None else token_ids
        for attempt in range(2):
            # Filled at this call's priority, but never below a task group's: a throughput call's fill may be
            # what a latency-critical call that comes next waits for.
            entry = await slot.prefixes.acquire(prefix, max(priority, GROUP_PRIORITY)) if prefix is not None else None
            events = slot.engine.generate(sampling, context_id, entry.context_id if entry else None, priority, rest)
            try:
                first = await anext(events)  # the prompt is in the context once its first token comes
            except EngineError as exc:
                # A fork of a prefix whose fill failed (after the fork was sent) fails for the fill's reason.
                error = entry.error if entry is not None and entry.error is not None else exc
                if not isinstance(error, OutOfMemoryError):
                    raise error
                await self._free_quietly(slot, context_id)
                # Idle prefixes hold the cache: evict them (least recently used first) and try once more; not for
                # a context longer than the whole cache, which no eviction makes room for.
                if isinstance(error, ContextTooLargeError) or attempt or not await slot.prefixes.evict():
                    raise error
                continue
            finally:
                if entry is not None:
                    slot.prefixes.release(entry)
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()
            return

    @staticmethod
    async def _free_quietly(slot: EngineSlot, context_id: str) -> None:
        try:
            await asyncio.shield(slot.engine.free_context(context_id))
        except EngineError:
            pass  # it was never created

    def _segments(self, session: Session, call: Call) -> list[tuple[str, Piece | None]]:
        """The prompt cut at each output: [(text before output 1, output 1), (text between 1 and 2, output 2)…]."""
        segments: list[tuple[str, Piece | None]] = []
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

    @staticmethod
    def _prefix_text(session: Session, call: Call) -> str:
        """The text that begins the call's prompt and others': its pieces shared in its graph, their inputs
        filled in, or else its template's constant prefix (shared by every call of the template)."""
        if call.shared_pieces == 0:
            return call.constant_prefix
        return "".join(piece.text if piece.kind == "text" else session.variables[piece.var_id].value
                       for piece in call.pieces[:call.shared_pieces])

    def _shared_prefix(self, prefix_text: str, token_ids: list[int]) -> PromptPrefix | None:
        """The tokens of the prompt that its shared prefix text fixes (tokenization may merge across the
        prefix's end, so only the part on which both tokenizations agree is shared); None if none."""
        if not prefix_text:
            return None
        prefix_ids = self._prefix_tokens(prefix_text)
        # Not the prefix text's last token: whether it merges with the text after it differs from prompt to
        # prompt, and calls that share the text should share one prefix context. And at least one token of the
        # prompt stays the call's own, so that it computes its own logits.
        shared = min(common_length(prefix_ids, token_ids), len(prefix_ids) - 1, len(token_ids) - 1)
        return PromptPrefix.of(token_ids[:shared]) if shared > 0 else None

    def _place(self, call: Call, prefix: PromptPrefix | None) -> EngineSlot:
        """Prefix affinity first (the engine that holds the prefix), then the call's task group, then load."""
        if not self.engines:
            raise EngineUnavailableError("no engine is serving: start one (`parrot-lc engine --manager URL`)")
        if prefix is not None:
            for slot in self.engines:
                if prefix.key in slot.prefixes:
                    return slot
        if call.task_group in self._group_engines:
            return self._group_engines[call.task_group]
        slot = min(self.engines, key=lambda s: (s.running, s.placed))
        if call.task_group is not None:
            self._group_engines[call.task_group] = slot
        return slot

    @asynccontextmanager
    async def completion(
        self, pieces: list[Piece], sampling: SamplingParams, prompt_token_ids: list[int] | None = None,
        client: str | None = None,
    ) -> AsyncIterator["Completion"]:
        """A one-call graph in a session of its own (what the OpenAI-compatible endpoints run): the
        template's pieces followed by one output. The session goes when the block ends, early or not.
        `prompt_token_ids`, if given, are the pieces' text tokenized (`tokenize`), used instead of tokenizing it
        again."""
        completion = self.start_completion(pieces, sampling, prompt_token_ids, client)
        try:
            yield completion
        finally:
            await self.end_completion(completion)

    def start_completion(
        self, pieces: list[Piece], sampling: SamplingParams, prompt_token_ids: list[int] | None = None,
        client: str | None = None,
    ) -> Completion:
        """Submits the one-call graph of `completion()` for `client` (see `create_session`); end it with
        `end_completion` (more than once is fine). Raises before anything runs if the call is refused (a full
        queue, bad sampling)."""
        session = self.create_session(client)
        output = self.create_variable(session)
        output.deltas = TextStream()
        try:
            [call] = self.submit(session, [pieces + [Piece("output", var_id=output.var_id, sampling=sampling)]],
                                 [prompt_token_ids] if prompt_token_ids is not None else None)
        except Exception:  # refused: nothing runs, and the session must not stay behind
            self.sessions.pop(session.session_id)
            raise
        return Completion(call, output, session)

    async def end_completion(self, completion: Completion) -> None:
        """Cancels the completion's call if it still runs (its client went away) and forgets its session."""
        await self.delete_session(completion.session)

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

    def check_prompt(self, token_ids: list[int], max_tokens: int | None, field: str = "prompt") -> int:
        """How many tokens the completion may generate: `max_tokens`, or without it what the context leaves (up
        to a default). A prompt (its `tokenize`d ids) that fills the model's context, or leaves less room than
        `max_tokens`, is rejected before it runs (naming `field`, or `max_tokens`)."""
        count = len(token_ids)
        if count == 0:
            raise ServerError("the prompt is empty: it needs at least one token", field)
        if count >= self.max_context:
            raise ServerError(f"the prompt has {count} tokens; the model's context is {self.max_context}", field)
        room = self.max_context - count
        if max_tokens is not None and max_tokens > room:
            raise ServerError(f"max_tokens is {max_tokens}, but the prompt ({count} tokens) leaves room for {room} "
                              f"in the model's context of {self.max_context}", "max_tokens")
        return min(max_tokens or DEFAULT_MAX_TOKENS, room)

    # ---- observability ------------------------------------------------------------------------------

    def status(self, session: Session) -> dict:
        return {
            "session_id": session.session_id,
            "variables": len(session.variables),
            "calls": {state.value: sum(c.state is state for c in session.calls.values()) for state in CallState},
            "graph": [
                {"call_id": c.call_id, "inputs": list(dict.fromkeys(c.inputs)), "outputs": c.outputs,
                 "state": c.state.value, "latency_critical": c.latency_critical, "task_group": c.task_group}
                for c in session.calls.values()
            ],
        }

    # ---- shutdown ---------------------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if self.draining:
            raise ShuttingDownError("the server is shutting down: it finishes the work it has and takes no more")

    async def drain(self, timeout: float) -> None:
        """Takes no new work from now on (ShuttingDownError), gives the unfinished calls up to `timeout` seconds,
        cancels those still running then (their outputs fail), and frees the engines' warm prefix contexts."""
        self.draining = True
        tasks = [c.task for s in list(self.sessions.values()) for c in s.calls.values()
                 if c.task is not None and not c.task.done()]
        done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # each frees its context as it stops
        for slot in list(self.engines):
            try:
                await slot.prefixes.evict()
            except EngineError as exc:  # an engine that went away meanwhile: nothing of it to free
                log.warning("could not free the prefixes of %s: %s", slot.name, exc)
        # Engines in other processes report through heartbeats, too late to count here.
        left = sum(s.engine.stats().num_contexts for s in self.engines if not isinstance(s.engine, RemoteEngine))
        log.info("drained: %d calls finished, %d cancelled at the deadline, %d contexts left on local engines",
                 len(done), len(pending), left,
                 extra={"calls_finished": len(done), "calls_cancelled": len(pending), "contexts_left": left})

    def close(self) -> None:
        for slot in self.engines:
            slot.engine.close()
