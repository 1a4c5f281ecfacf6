"""The Parrot manager: sessions, variables and call graphs, run on engines with prefix sharing.

It knows nothing of HTTP. It keeps the sessions and their graphs, admits calls into a bounded queue, starts each
call as soon as its inputs have values (no client round trip: `CallExecutor` runs it on an engine of the
`EnginePool`), and drains for a shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import secrets
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import AsyncIterator

from transformers import PreTrainedTokenizerBase

from parrot_lc.engine.errors import ContextTooLargeError, EngineError, EngineUnavailableError
from parrot_lc.engine.sampling import SamplingParams
from parrot_lc.engine.engine_client import EngineClient
from parrot_lc.server.engine_pool import EnginePool, EngineSlot
from parrot_lc.server.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    CallFailedError,
    ForbiddenError,
    NoEngineError,
    NotFoundError,
    QueueFullError,
    ServerError,
    ShuttingDownError,
    VariableTimeoutError,
)
from parrot_lc.server.executor import CallExecutor
from parrot_lc.server.graph import (
    Call,
    CallOutcome,
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
from parrot_lc.server.prompts import Prompts
from parrot_lc.server.tasks import start_now
from parrot_lc.settings import ServerSettings

log = logging.getLogger("parrot_lc.manager")
# The error codes of a call that fails for an engine's reason: its clients act on them (retry a 503; shorten a prompt
# that does not fit, as for OpenAI's context_length_exceeded).
ENGINE_ERROR_CODES: dict[type[EngineError], str] = {EngineUnavailableError: NoEngineError.code,
                                                     ContextTooLargeError: CONTEXT_LENGTH_EXCEEDED}


@dataclass(frozen=True)
class CompletionPrompt:
    """One prompt of a completion: its template's pieces, their text tokenized (`Prompts.tokenize`, or the token
    ids that the client sent), and the sampling of its choices."""

    pieces: list[Piece]
    token_ids: list[int]
    sampling: SamplingParams


@dataclass
class Completion:
    """A running graph of one call per choice, `n` per prompt (choice i * n + j is prompt i's j-th), whose texts
    stream out of `deltas()`; its calls hold usage and log-probabilities once they are done."""

    calls: list[Call]
    outputs: list[Variable]
    session: Session
    n: int = 1

    @property
    def prompt_calls(self) -> list[Call]:
        """The first call of each prompt: a prompt's choices share its tokens, which usage counts once."""
        return self.calls[:: self.n]

    async def deltas(self) -> AsyncIterator[tuple[int, str]]:
        """(choice, text piece) as they are generated; raises CallFailedError, once every call has ended, if one
        failed (NoEngineError where no engine could take it, a 400 where its context is larger than an engine's KV
        cache). A choice's pieces that queued up while the consumer was busy come out joined: a server running
        behind sends fewer, larger chunks."""
        async for delta in merged([output.deltas for output in self.outputs]):
            yield delta
        failed = next((output for output in self.outputs if output.error is not None), None)
        if failed is None:
            return
        if failed.error_code == NoEngineError.code:
            raise NoEngineError(failed.error)
        if failed.error_code == CONTEXT_LENGTH_EXCEEDED:  # the request's prompt and max_tokens: a 400, as OpenAI's
            raise ServerError(f"{failed.error}: send a shorter prompt or a smaller max_tokens (or start the server "
                              "with a larger --kv-cache-bytes)", code=CONTEXT_LENGTH_EXCEEDED)
        raise CallFailedError(failed.error)

    async def texts(self) -> list[str]:
        """Each choice's whole text, once every call has ended."""
        pieces: list[list[str]] = [[] for _ in self.outputs]
        async for index, text in self.deltas():
            pieces[index].append(text)
        return ["".join(texts) for texts in pieces]


async def merged(streams: list[TextStream]) -> AsyncIterator[tuple[int, str]]:
    """The pieces of several streams as they come, each with its stream's index. A lone stream is read as it is:
    a completion of one choice, the usual one, costs no task."""
    if len(streams) == 1:
        async for text in streams[0]:
            yield 0, text
        return
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()

    async def pump(index: int, stream: TextStream) -> None:
        async for text in stream:
            queue.put_nowait((index, text))
        queue.put_nowait(None)  # this stream's end

    pumps = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        for _ in streams:
            while (delta := await queue.get()) is not None:
                yield delta
    finally:
        for task in pumps:
            task.cancel()


def choice_sampling(sampling: SamplingParams, choice: int) -> SamplingParams:
    """The sampling of a prompt's `choice`-th choice: with a seed, seed + choice, so that each choice is the same
    from run to run and no two choices of a prompt draw alike."""
    if choice == 0 or sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=(sampling.seed + choice) % 2**63)


@dataclass(frozen=True)
class ModelInfo:
    """What the manager must know of the model all its engines serve."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    max_context: int


class ParrotManager:
    def __init__(self, model: ModelInfo, engines: list[EngineClient], settings: ServerSettings | None = None) -> None:
        self.settings = settings = settings or ServerSettings()
        self.model = model
        self.tokenizer = model.tokenizer
        self.vocab_size = model.vocab_size
        self.max_context = model.max_context
        self.pool = EnginePool(settings)
        for engine in engines:
            self.pool.add(engine)
        self.prompts = Prompts(model.tokenizer, model.max_context, settings.max_prefixes_per_engine, model.vocab_size,
                               self.pool.context_capacity)
        self.executor = CallExecutor(self.pool, self.prompts, settings.app_centric)
        self.queued_calls = 0  # submitted and not finished, in every session: what max_queued_calls bounds
        self.queued_by_client: dict[str, int] = {}  # the same, by API key (where max_queued_calls_per_key bounds)
        self.rejected_calls = 0
        self.sessions: dict[str, Session] = {}
        self._ids = itertools.count()
        self.calls_finished = dict.fromkeys(CallOutcome, 0)  # parrot_calls_finished_total{state}
        self.draining = False  # set by drain() (or stop_now()): new sessions and calls are refused
        self._stopping = asyncio.Event()  # set by stop_now(): a drain's deadline is now
        self._room_freed = asyncio.Event()  # set (and replaced) whenever a call leaves the queues

    @property
    def engines(self) -> list[EngineSlot]:
        return self.pool.slots

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
    ) -> Variable:
        """Waits for the variable's value (and, for a call's output, how the call generated it); the criterion steers
        how its producers are scheduled. A failed producer raises CallFailedError with its failure's code."""
        if timeout is not None and not 0 <= timeout < math.inf:  # NaN fails both comparisons
            raise ServerError(f"timeout must be a finite number of seconds, at least 0; got {timeout}", field="timeout")
        variable = self.variable(session, var_id)
        fetch_objective(session, variable, criterion)
        session.waiting += 1
        try:
            if not variable.ready.is_set():  # wait_for(..., 0) times out even on a set event (Python 3.11)
                await asyncio.wait_for(variable.ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise VariableTimeoutError(f"variable {var_id!r} has no value after {timeout} s", field="timeout") from None
        finally:
            session.waiting -= 1
            session.last_used = time.monotonic()
        if variable.error is not None:
            raise CallFailedError(variable.error, field="var_id", code=variable.error_code)
        return variable

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
        context, bound = self.prompts.context()
        for index, call in enumerate(calls):
            for piece in call.pieces:
                if piece.sampling is not None:
                    piece.sampling.validate(self.vocab_size)
                    if piece.sampling.max_tokens >= context:  # no prompt leaves room for it
                        raise ServerError(f"sampling.max_tokens is {piece.sampling.max_tokens}; {bound}",
                                          field=f"calls.{index}.sampling.max_tokens", code=CONTEXT_LENGTH_EXCEEDED)
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

    def call_room(self, session: Session) -> tuple[int, int]:
        """(room, limit): how many more calls `session` may submit now, and how many it may hold unfinished at
        most (the least of the limits of the queues its calls join). A larger graph goes in parts."""
        limits = self._queue_limits(session)
        room = min(limit - queued for queued, limit, _, _ in limits)
        return max(room, 0), min(limit for _, limit, _, _ in limits)

    async def wait_for_room(self, session: Session, calls: int, timeout: float) -> tuple[int, int]:
        """Waits until `session` may submit `calls` more calls (no more than its limit), or `timeout` seconds have
        passed; returns `call_room` then. How a client submits a graph larger than its limit in parts."""
        deadline = time.monotonic() + timeout
        session.waiting += 1  # a session that waits is not idle
        try:
            while True:
                room, limit = self.call_room(session)
                left = deadline - time.monotonic()
                if room >= min(calls, limit) or left <= 0:
                    return room, limit
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._room_freed.wait(), left)
        finally:
            session.waiting -= 1
            session.last_used = time.monotonic()

    def _queue(self, session: Session, count: int) -> None:
        self.queued_calls += count
        session.queued += count
        if session.client is not None:
            self.queued_by_client[session.client] = self.queued_by_client.get(session.client, 0) + count

    def _unqueue(self, session: Session) -> None:
        self._room_freed.set()
        self._room_freed = asyncio.Event()
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
        cancelled = False
        try:
            inputs = [session.variables[v] for v in dict.fromkeys(call.inputs)]
            await asyncio.gather(*(v.ready.wait() for v in inputs))
            failed = [v for v in inputs if v.error is not None]
            if failed:
                raise CallFailedError(f"input {failed[0].var_id} failed: {failed[0].error}", code=failed[0].error_code)
            call.state = CallState.RUNNING
            await self.executor.execute(session, call)  # DONE once its outputs are set, before its context is freed
        except asyncio.CancelledError:
            if call.state is not CallState.DONE:  # else only the freeing of its context was cut short
                call.state, cancelled = CallState.FAILED, True
                self._fail_outputs(session, call, "the call was cancelled")
            raise
        except (EngineError, ServerError) as exc:
            log.info("call %s failed: %s", call.call_id, exc)
            call.state, call.error = CallState.FAILED, str(exc)
            code = exc.code if isinstance(exc, ServerError) else ENGINE_ERROR_CODES.get(type(exc))
            self._fail_outputs(session, call, f"call {call.call_id} failed: {exc}", code)
        except Exception:  # a bug: the call fails visibly instead of leaving its consumers waiting forever
            log.exception("call %s failed unexpectedly", call.call_id)
            call.state, call.error = CallState.FAILED, "internal error (logged on the server)"
            self._fail_outputs(session, call, f"call {call.call_id} failed: internal error (logged on the server)")
        finally:
            if call.state in (CallState.DONE, CallState.FAILED):
                self.calls_finished[CallOutcome.CANCELLED if cancelled else CallOutcome(call.state.value)] += 1

    def _fail_outputs(self, session: Session, call: Call, error: str, code: str | None = None) -> None:
        for var_id in call.outputs:
            variable = session.variables[var_id]
            if not variable.ready.is_set():
                variable.fail(error, code)

    @asynccontextmanager
    async def completion(
        self, prompts: list[CompletionPrompt], n: int = 1, client: str | None = None
    ) -> AsyncIterator["Completion"]:
        """A graph of one call per choice in a session of its own (what the OpenAI-compatible endpoints run): `n`
        calls per prompt, each the prompt's pieces followed by an output of its own. The session goes when the
        block ends, early or not."""
        completion = self.start_completion(prompts, n, client)
        try:
            yield completion
        finally:
            await self.end_completion(completion)

    def start_completion(self, prompts: list[CompletionPrompt], n: int = 1, client: str | None = None) -> Completion:
        """Submits the graph of `completion()` for `client` (see `create_session`); end it with `end_completion`
        (more than once is fine). A prompt's n calls begin with the same pieces, so its prompt is filled once and
        forked n times (`mark_shared_pieces`); each counts as a call in the queue's limits. Raises before anything
        runs if the calls are refused (a full queue, bad sampling, more choices than a session may hold)."""
        limit = self.settings.max_variables_per_session
        if len(prompts) * n > limit:  # named as the request names its choices, not as the session it never sees
            raise ServerError(f"{len(prompts) * n} choices ({len(prompts)} prompts x n={n}) are more than a request "
                              f"may have (max_variables_per_session={limit})", "n" if n > 1 else "prompt")
        session = self.create_session(client)
        try:
            outputs = [self.create_variable(session) for _ in range(len(prompts) * n)]
            for output in outputs:
                output.deltas = TextStream()
            choices = [(prompt, choice_sampling(prompt.sampling, choice)) for prompt in prompts for choice in range(n)]
            graph = [prompt.pieces + [Piece("output", var_id=output.var_id, sampling=sampling)]
                     for (prompt, sampling), output in zip(choices, outputs)]
            calls = self.submit(session, graph, [prompt.token_ids for prompt, _ in choices])
        except Exception as exc:  # refused: nothing runs, and the session must not stay behind
            self.sessions.pop(session.session_id)
            if not isinstance(exc, ServerError) or exc.field != "calls":
                raise
            # The graph is the request's choices, which are named as the request gives them; a full queue (429)
            # names no field, as OpenAI's rate limits do.
            field = None if isinstance(exc, QueueFullError) else "n" if n > 1 else "prompt"
            raise type(exc)(f"{len(choices)} choices ({len(prompts)} prompts x n={n}): {exc.message}", field) from None
        return Completion(calls, outputs, session, n)

    async def end_completion(self, completion: Completion) -> None:
        """Cancels the completion's call if it still runs (its client went away) and forgets its session."""
        await self.delete_session(completion.session)

    # ---- the engines' block caches ----------------------------------------------------------------------

    async def reset_prefix_cache(self) -> int:
        """Makes the next requests compute their prompts (a benchmark's runs each start cold): frees every engine's
        idle warm prefix contexts, then drops the cached KV blocks that no context holds; returns how many blocks,
        summed over the engines. Sessions, the prefix contexts that calls use and the calls in flight keep theirs.
        An engine that cannot be reached is skipped: its calls move to the others."""
        self._check_accepting()

        async def reset(slot: EngineSlot) -> int:
            await slot.prefixes.evict()  # their blocks join the cache's unused ones, dropped next
            return await slot.engine.reset_prefix_cache()

        slots = list(self.engines)
        freed = await asyncio.gather(*(reset(slot) for slot in slots), return_exceptions=True)
        total = 0
        for slot, result in zip(slots, freed):
            if isinstance(result, EngineUnavailableError):
                log.warning("could not reset the prefix cache of %s: %s", slot.name, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                total += result
        return total

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

    def _unfinished_calls(self) -> list[asyncio.Task]:
        return [c.task for s in list(self.sessions.values()) for c in s.calls.values()
                if c.task is not None and not c.task.done()]

    async def drain(self, timeout: float) -> None:
        """Takes no new work from now on (ShuttingDownError), gives the unfinished calls up to `timeout` seconds (or
        until `stop_now`), cancels those still running then (their outputs fail), and frees the engines' warm
        prefix contexts."""
        self.draining = True
        tasks = self._unfinished_calls()
        if tasks:
            ended, cut_short = asyncio.ensure_future(asyncio.wait(tasks)), asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait([ended, cut_short], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()  # the waits, not the calls
            cut_short.cancel()
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # each frees its context as it stops
        freed = 0
        for slot in list(self.engines):
            try:
                # Fills still running too: a call cancelled (or whose session was deleted) while its prefix was
                # being filled leaves the fill going, and a prefix is idle only once filled.
                freed += await slot.prefixes.free_unused()
            except EngineError as exc:  # an engine that went away meanwhile: nothing of it to free
                log.warning("could not free the prefixes of %s: %s", slot.name, exc)
        # Engines in other processes report through heartbeats, too late to count here. A local engine's count is
        # true once the frees sent to it are answered: a call whose session went as its output was read ended
        # before its context's free was.
        local = [slot for slot in self.engines if slot.registration is None]
        await asyncio.gather(*(free for slot in local for free in slot.frees), return_exceptions=True)
        left = sum(slot.engine.stats().num_contexts for slot in local)
        log.info("drained: calls finished %d, cancelled at the deadline %d; prefix contexts freed %d; contexts "
                 "still held by local engines %d", len(tasks) - len(pending), len(pending), freed, left,
                 extra={"calls_finished": len(tasks) - len(pending), "calls_cancelled": len(pending),
                        "prefixes_freed": freed, "contexts_left": left})

    def stop_now(self) -> int:
        """Cuts a drain short (a second signal): its deadline is now, so it cancels the unfinished calls at once
        (their outputs fail; each frees its context as it stops). The variables that no call produces and the
        client never set fail too: every fetch still open is then answered (424) before the server stops, not cut
        off. Returns how many calls are cancelled."""
        self.draining = True
        self._stopping.set()
        for session in self.sessions.values():
            for variable in session.variables.values():
                if variable.producer is None and not variable.ready.is_set():
                    variable.fail("the server stopped before this variable was set")
        return len(self._unfinished_calls())

    def close(self) -> None:
        for slot in self.engines:
            slot.engine.close()
