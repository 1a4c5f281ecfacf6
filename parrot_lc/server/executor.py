"""The execution of one call on engines, whose inputs have values: its prompt tokenized, its shared prefix taken
from (or filled into) a warm prefix context on the engine that holds it, its context forked from there, and each
output generated into it. When its engine dies it resumes on another (failover); when the KV cache is full of
contexts that wait it resumes once another call ends (a memory wait), after evicting idle prefixes."""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import AsyncIterator

from parrot_lc.engine.errors import ContextTooLargeError, EngineError, EngineUnavailableError, OutOfMemoryError
from parrot_lc.engine.request import RequestOutput
from parrot_lc.engine.sampling import SamplingParams
from parrot_lc.server.engine_pool import EnginePool, EngineSlot
from parrot_lc.server.errors import ServerError
from parrot_lc.server.graph import Call, CallState, Generated, Session
from parrot_lc.server.prefix_cache import PromptPrefix
from parrot_lc.server.prompts import Prompts, Segment

LATENCY_PRIORITY, GROUP_PRIORITY, DEFAULT_PRIORITY = 2, 1, 0
# A call refused for want of KV waits for another call to end (at most this long) and runs again; after this
# many waits in which nothing ended, it fails.
OOM_RETRY_SECONDS, OOM_IDLE_WAITS = 1.0, 3


@dataclass
class CallRun:
    """What every attempt at a call needs: its prompt cut at its outputs, tokenized, and the prefix it shares."""

    session: Session
    call: Call
    segments: list[Segment]
    token_ids: list[int]  # of the text before its first output
    prefix: PromptPrefix | None

    @property
    def context_id(self) -> str:
        return f"{self.session.session_id}/{self.call.call_id}"


class CallExecutor:
    """Runs calls on the pool's engines. `app_centric` off: no prefix sharing, one priority for all, no cap on
    background calls (request-level serving, the baseline)."""

    def __init__(self, pool: EnginePool, prompts: Prompts, app_centric: bool) -> None:
        self.pool, self.prompts, self.app_centric = pool, prompts, app_centric

    async def execute(self, session: Session, call: Call) -> None:
        """Runs the call to its end (DONE once its outputs are set) or raises why it failed."""
        segments = self.prompts.segments(session, call)
        token_ids = call.prompt_token_ids
        if token_ids is None:
            token_ids = self.prompts.tokenize(segments[0][0])
        if not token_ids:  # its inputs' values were empty: an engine has nothing to compute its first token from
            raise ServerError("the prompt before the call's first output is empty", field="template")
        # Refused as an OpenAI request is (its message and code) before it runs, not failed by the engine's fill, or
        # once it has generated what the KV cache holds.
        self.prompts.check_call(token_ids, segments)
        call.prompt_tokens = len(token_ids)
        shares = self.app_centric and not call.wants_prompt_logprobs
        prefix = self.prompts.shared_prefix(session, call, token_ids) if shares else None
        run = CallRun(session, call, segments, token_ids, prefix)
        while True:
            slot = self.pool.place(call, prefix)
            if prefix is not None and call.shares_variables:
                session.variable_prefixes.add((slot.name, prefix.key))
            slot.calls.add(run.context_id)
            try:
                return await self._on_engine(slot, run)
            except EngineUnavailableError as exc:
                # The first of its calls to notice drops it, naming them all (each is on it until its `finally`);
                # the call resumes on another engine where this one stopped (CallProgress).
                self.pool.drop(slot, str(exc))
            finally:
                slot.calls.discard(run.context_id)

    def _priority(self, call: Call) -> int:
        if not self.app_centric:
            return DEFAULT_PRIORITY  # request-level serving: one priority for all
        return LATENCY_PRIORITY if call.latency_critical else GROUP_PRIORITY if call.task_group else DEFAULT_PRIORITY

    async def _on_engine(self, slot: EngineSlot, run: CallRun) -> None:
        """Runs the call on `slot`'s engine, waiting for memory there as long as other calls end meanwhile."""
        slot.placed += 1
        call = run.call
        async with nullcontext() if call.latency_critical or not self.app_centric else slot.background:
            idle_waits = 0
            while True:
                try:
                    return await self._attempt(slot, run, self._priority(call))
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

    async def _attempt(self, slot: EngineSlot, run: CallRun, priority: int) -> None:
        """One attempt in one context, which it frees however it ends; it resumes where the last one stopped."""
        call, progress = run.call, run.call.progress
        slot.running += 1
        dropped = progress.resume(self.prompts.decode)
        call.completion_tokens -= dropped
        del call.logprobs[len(call.logprobs) - dropped:]  # where it keeps them: of its one output's tokens
        first_request = True  # of this attempt: it creates the context, from the prefix, with all done before
        try:
            for index, (text, output) in enumerate(run.segments):
                if index < progress.outputs_done:
                    continue
                # The text before each output is filled by the request that generates the output.
                ids = [] if index == 0 or progress.started else self.prompts.continuation(text)
                if output is None:
                    if ids and not first_request:
                        await slot.engine.fill(ids, run.context_id, priority=priority)
                    break
                variable = run.session.variables[output.var_id]
                sampling = attempt_sampling(output.sampling, call)
                if sampling is not None:
                    events = (self._start_context(slot, run, run.token_ids + progress.token_ids + ids, sampling,
                                                  priority) if first_request else
                              slot.engine.generate(sampling, run.context_id, priority=priority, token_ids=ids))
                    first_request = False
                    async for event in events:
                        delta = progress.took(ids, event, self.prompts.decode)
                        call.completion_tokens += len(event.token_ids)
                        call.logprobs += event.logprobs
                        if event.prompt_logprobs is not None:  # in the first event, before any token
                            call.prompt_logprobs = event.prompt_logprobs
                        call.finish_reason, call.stop_reason = event.finish_reason, event.stop_reason
                        if variable.deltas is not None and delta:
                            variable.deltas.push(delta)
                # The context before the output: the prompt, and what was filled or generated before its tokens.
                before = len(run.token_ids) + len(progress.token_ids) - progress.tokens
                generated = Generated(call.finish_reason, call.stop_reason, before, progress.tokens,
                                      call.cached_tokens)
                variable.set(progress.output_done(), generated)
            call.state = CallState.DONE  # its outputs are set: a client that reads one finds the call done
        finally:
            slot.running -= 1
            await free_quietly(slot, run.context_id)
            slot.end_call()

    async def _start_context(
        self, slot: EngineSlot, run: CallRun, token_ids: list[int], sampling: SamplingParams, priority: int,
    ) -> AsyncIterator[RequestOutput]:
        """Forks the call's context from the warm prefix context, fills the rest of `token_ids` and generates its
        first output: one engine request, whose events this yields. It sets the call's cached tokens."""
        prefix = run.prefix
        # Never empty: Prompts.shared_prefix leaves the call a token of its own.
        rest = token_ids[len(prefix.token_ids):] if prefix is not None else token_ids
        for attempt in range(2):
            # Filled at this call's priority, but never below a task group's: a throughput call's fill may be
            # what a latency-critical call that comes next waits for.
            entry = (await slot.prefixes.acquire(prefix, max(priority, GROUP_PRIORITY), run.session.session_id)
                     if prefix is not None else None)
            events = slot.engine.generate(sampling, run.context_id, entry.context_id if entry else None, priority,
                                          rest)
            try:
                first = await anext(events)  # the prompt is in the context once its first token comes
            except EngineError as exc:
                # A fork of a prefix whose fill failed (after the fork was sent) fails for the fill's reason.
                error = entry.error if entry is not None and entry.error is not None else exc
                if not isinstance(error, OutOfMemoryError):
                    raise error
                await free_quietly(slot, run.context_id)
                # Idle prefixes hold the cache: evict them (least recently used first) and try once more; not for
                # a context longer than the whole cache, which no eviction makes room for.
                if isinstance(error, ContextTooLargeError) or attempt or not await slot.prefixes.evict():
                    raise error
                continue
            finally:
                if entry is not None:
                    slot.prefixes.release(entry)
            try:
                # The engine counts the prefix that the fork inherits as cached; what its fill computed for this
                # session is not (PrefixEntry.computed_for). A rerun's prompt holds tokens generated before: not
                # the call's prompt.
                computed = await entry.computed_for(run.session.session_id) if entry is not None else 0
                run.call.cached_tokens = min(max(first.cached_tokens - computed, 0), run.call.prompt_tokens)
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()
            return


def attempt_sampling(sampling: SamplingParams, call: Call) -> SamplingParams | None:
    """What an attempt asks of the call's output in progress: the tokens that the attempts before did not generate,
    and its prompt's log-probabilities unless one had them (an attempt has them before any token); None when
    nothing is left to ask."""
    done = call.progress.tokens
    if done or call.prompt_logprobs is not None:
        sampling = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - done,
                                       min_tokens=max(sampling.min_tokens - done, 0), prompt_logprobs=None)
    if done and sampling.constraint is not None:  # its grammar goes on after the tokens generated before
        sampling = dataclasses.replace(sampling, constraint_prefix=tuple(call.progress.output_ids))
    return sampling if sampling.max_tokens > 0 or sampling.prompt_logprobs is not None else None


async def free_quietly(slot: EngineSlot, context_id: str) -> None:
    """Frees the context if the engine has it (a call's context may never have been created). The free goes on if
    the caller is cancelled meanwhile, in the slot's `frees` until it is answered."""
    free = asyncio.ensure_future(slot.engine.free_context(context_id))
    slot.frees.add(free)
    free.add_done_callback(slot.frees.discard)
    try:
        await asyncio.shield(free)
    except EngineError:
        pass
