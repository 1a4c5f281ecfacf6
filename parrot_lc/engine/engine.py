"""The engine: fill / generate / free_context over a tree of contexts, one batched step at a time."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from parrot_lc.engine.attention import select_backend
from parrot_lc.engine.block_allocator import BlockAllocator
from parrot_lc.engine.block_cache import BlockCache
from parrot_lc.engine.constraints import ConstraintCompiler, token_masks
from parrot_lc.engine.context import Context, ContextId, ContextTree, in_flight_token
from parrot_lc.engine.errors import (
    ContextBusyError,
    ContextNotFoundError,
    EngineError,
    EngineStepError,
    ContextTooLargeError,
    InvalidRequestError,
    ModelLoadError,
    RequestCancelledError,
    allocator_reason,
    is_out_of_memory,
)
from parrot_lc.engine.host_to_device import to_device
from parrot_lc.engine.loader import load_model
from parrot_lc.engine.logprobs import LogprobRows, PromptLogprobs, TokenLogprob, read_rows, token_logprobs
from parrot_lc.engine.model_runner import ModelRunner
from parrot_lc.engine.request import Request, RequestKind, RequestOutput, StreamedText, text_decoder
from parrot_lc.engine.sampling import Sampler, SamplingParams, TokenHistory
from parrot_lc.engine.scheduler import ScheduledChunk, Scheduler
from parrot_lc.engine.step_log import StepLog
from parrot_lc.settings import EngineSettings

log = logging.getLogger("parrot_lc.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineStats:
    """Counters and gauges the server exports."""

    prefill_tokens: int  # tokens computed from fills (recomputation after preemption included)
    decode_tokens: int  # generated tokens fed back through the model one at a time (not in recomputations)
    reused_tokens: int  # tokens whose KV a fork got from its parent without computing it
    cached_tokens: int  # prompt tokens whose KV a context took from the block cache (not counting recomputations)
    kv_blocks_used: int
    kv_blocks_free: int
    num_running: int
    num_waiting: int
    num_contexts: int
    num_preemptions: int
    num_steps: int = 0  # batches run (prefill chunks and decode rows together)
    kv_capacity_tokens: int = 0  # tokens the whole KV cache holds (0: not known)


@dataclass(frozen=True)
class EngineInfo:
    """What a replica runs, as its start-up log names it."""

    model: str
    device: str
    dtype: str  # of its activations and KV cache
    weights: str  # how its linear layers hold their weights (engine/cpu_weights.py), or its dtype
    attention_backend: str
    kv_capacity_tokens: int

    def __str__(self) -> str:
        return (f"{self.device}, {self.dtype}, weights {self.weights}, attention {self.attention_backend}, "
                f"KV cache {self.kv_capacity_tokens} tokens")


@dataclass
class InFlightStep:
    """A launched step's sampled tokens, on the device until read back: `sampled` holds (request, index of its
    placeholder in its context's tokens, or None when this token ends it) for row after row of `tokens`; `logprobs`
    the log-probabilities of the rows whose sampling asks, `logprob_rows` (row, top tokens asked) in order."""

    tokens: torch.Tensor  # (S,) int64 on the device
    sampled: list[tuple[Request, int | None]]
    logprobs: LogprobRows | None = None
    logprob_rows: list[tuple[int, int]] = field(default_factory=list)
    _host: list[torch.Tensor] | None = None
    _ready: torch.cuda.Event | None = None

    def __post_init__(self) -> None:
        if self.tokens.device.type == "cuda":  # start the copy back now; the host waits only when it reads
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                          for t in self._tensors]
            self._ready = torch.cuda.Event()
            self._ready.record()

    @property
    def _tensors(self) -> list[torch.Tensor]:
        return [self.tokens, *(self.logprobs.tensors if self.logprobs is not None else ())]

    def host_results(self) -> tuple[list[int], dict[int, TokenLogprob]]:
        """Waits for the step: its tokens, and the log-probabilities of the rows that asked, by row."""
        if self._ready is None:
            tokens, *logprobs = [t.tolist() for t in self._tensors]
        else:
            self._ready.synchronize()
            tokens, *logprobs = [t.tolist() for t in self._host]
        rows = [row for row, _ in self.logprob_rows]
        entries = read_rows([tokens[row] for row in rows], [k for _, k in self.logprob_rows], logprobs) if rows else []
        return tokens, dict(zip(rows, entries))


class LLMEngine:
    """One model replica. Requests are submitted, then `step()` advances all of them by one batch.

    `fill` and `generate` are blocking conveniences that step until their own request ends, advancing every
    other request along the way; the server drives the engine through `AsyncEngine` instead.
    """

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings = settings or EngineSettings()
        device_name = settings.device
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device_name)
        dtype_name = settings.dtype
        if dtype_name == "auto":
            dtype_name = "float32" if self.device.type == "cpu" else "bfloat16"
        self.dtype = DTYPES[dtype_name]
        self.backend = select_backend(settings.attention_backend, self.device)
        try:
            loaded = load_model(
                settings.model, self.backend, self.dtype, self.device, settings.cache_dir, settings.seed,
                random_weights=settings.load_format == "dummy", cpu_weight_format=settings.cpu_weight_format,
            )
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(exc):
                raise
            # Said here, where it is known: a failure once the weights are in is the KV cache's (kv_cache_fits).
            raise ModelLoadError(
                f"model {settings.model!r}: its weights do not fit in {self.device} memory ({allocator_reason(exc)}), "
                f"before any KV cache was allocated; use a smaller model or --dtype, or a device with more memory"
            ) from None
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.weight_format = loaded.weight_format
        self.eos_token_ids = self.config.eos_token_ids
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids = tuple(sorted({*self.eos_token_ids, self.tokenizer.eos_token_id}))
        self._decode = text_decoder(self.tokenizer) if self.tokenizer is not None else None
        self._constraints = (ConstraintCompiler(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
                             if self.tokenizer is not None else None)

        self.runner = ModelRunner.create(self.model, self.config, self.backend, settings, self.device, self.dtype)
        self.allocator = BlockAllocator(self.runner.num_blocks, BlockCache() if settings.prefix_caching else None)
        self.tree = ContextTree(self.allocator, settings.block_size, self.runner.copy_block)
        self.scheduler = Scheduler(self.tree, settings.max_num_batched_tokens, settings.max_num_seqs,
                                   settings.background_prefill_tokens)
        self.sampler = Sampler(settings.seed, self.device)
        self.overlap_steps = self.device.type == "cuda" if settings.overlap_steps is None else settings.overlap_steps
        self._in_flight: InFlightStep | None = None  # the step launched last, its tokens not read back yet
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.num_steps = 0
        self._step_log = StepLog(settings.step_log) if settings.step_log is not None else None

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.settings.model, str(self.device), str(self.dtype).removeprefix("torch."),
                          self.weight_format, self.backend.name, self.capacity_tokens)

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.settings.block_size

    # ---- submission -------------------------------------------------------------------------------

    def submit_fill(
        self,
        token_ids: list[int],
        context_id: ContextId,
        parent_context_id: ContextId | None = None,
        priority: int = 0,
    ) -> Request:
        """Queues a prefill of `token_ids` into the context, creating it (forked from the parent) if new."""
        if not token_ids:
            raise InvalidRequestError("token_ids is empty: a fill needs at least one token")
        existing, parent = self._resolve(context_id, parent_context_id, create=True)
        self._check_fill(token_ids, existing or parent)
        context = existing or self.tree.create(context_id, parent)
        return self._add(Request(next(self._ids), RequestKind.FILL, context, priority, 0,
                                 fill_token_ids=list(token_ids), cached_from=existing.num_cached if existing else 0))

    def submit_generate(
        self,
        sampling: SamplingParams,
        context_id: ContextId,
        parent_context_id: ContextId | None = None,
        priority: int = 0,
        token_ids: list[int] | None = None,
    ) -> Request:
        """Queues decoding into the context (forked from the parent if new); tokens stream out of `step()`.
        `token_ids`: prompt tokens to fill first, in the same request (a step and a round trip fewer than a
        fill and then a generate)."""
        sampling.validate(self.config.vocab_size)
        token_ids = token_ids or []
        existing, parent = self._resolve(context_id, parent_context_id,
                                         create=parent_context_id is not None or bool(token_ids))
        self._check_fill(token_ids, existing or parent)
        if self._length(existing or parent) + len(token_ids) == 0:
            raise InvalidRequestError(f"context {context_id!r} is empty: fill a prompt before generating")
        generator = None
        if sampling.seed is not None:
            generator = self.sampler.generator(sampling.seed)
        text = StreamedText(self._decode, sampling.stop) if self._decode is not None else None
        prompt_logprobs = None
        if sampling.prompt_logprobs is not None and token_ids:
            prompt_logprobs = PromptLogprobs(list(token_ids), sampling.prompt_logprobs)
        grammar = None
        if sampling.constraint is not None:
            if self._constraints is None:
                raise InvalidRequestError("sampling.constraint needs a model with a tokenizer")
            grammar = self._constraints.start(sampling.constraint, sampling.constraint_prefix)
        context = existing or self.tree.create(context_id, parent)
        return self._add(Request(next(self._ids), RequestKind.GENERATE, context, priority, 0,
                                 fill_token_ids=list(token_ids), sampling=sampling, generator=generator, text=text,
                                 prompt_logprobs=prompt_logprobs, grammar=grammar,
                                 cached_from=existing.num_cached if existing else 0))

    def _check_fill(self, token_ids: list[int], context: Context | None) -> None:
        """Raises if the tokens are not in the vocabulary or would not fit the context (or the KV cache)."""
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequestError(f"token_ids holds {bad[0]!r}, outside the vocabulary [0, {self.config.vocab_size})")
        total = self._length(context) + len(token_ids)
        if total > self.config.max_position_embeddings:
            raise InvalidRequestError(
                f"the context would hold {total} tokens; the model's context is {self.config.max_position_embeddings}"
            )
        if total > self.capacity_tokens:
            raise ContextTooLargeError(
                f"the context would hold {total} tokens; the KV cache holds {self.capacity_tokens}"
            )

    def _resolve(
        self, context_id: ContextId, parent_context_id: ContextId | None, create: bool
    ) -> tuple[Context | None, Context | None]:
        """(the existing idle context, None) or (None, the parent of a context to create)."""
        if context_id in self.tree:
            if parent_context_id is not None:
                raise InvalidRequestError(f"context {context_id!r} already exists: it cannot be forked again")
            context = self.tree.get(context_id)
            if context.busy:
                raise ContextBusyError(f"context {context_id!r} is busy: a request runs in it or a fork waits for it")
            return context, None
        if not create:
            raise ContextNotFoundError(f"unknown context {context_id!r}")
        if parent_context_id is None:
            return None, None
        if parent_context_id not in self.tree:
            raise ContextNotFoundError(f"unknown parent context {parent_context_id!r}")
        return None, self.tree.get(parent_context_id)

    def _length(self, context: Context | None) -> int:
        """Tokens the context will hold once its pending fork and its queued request's tokens (if any) are in."""
        if context is None:
            return 0
        request = context.active_request
        queued = len(request.fill_token_ids) if request is not None and not request.started else 0
        return len(context.token_ids) + queued + (0 if context.forked else self._length(context.parent))

    def _add(self, request: Request) -> Request:
        request.arrival = request.request_id
        request.context.active_request = request
        self._requests[request.request_id] = request
        self.scheduler.add(request)
        return request

    # ---- control ----------------------------------------------------------------------------------

    def cancel(self, request_id: int) -> RequestOutput | None:
        """Stops a request; its context keeps what was computed so far."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        return self._finish(request, "cancelled", RequestCancelledError(f"request {request_id} was cancelled"))

    def abort_all(self, error: EngineError) -> list[RequestOutput]:
        """Ends every request with `error` (their contexts keep what was computed): what the engine does when a
        step fails, so that no caller waits forever and later requests start from a clean batch."""
        self._in_flight = None
        return [self._finish(request, "error", error) for request in list(self._requests.values())]

    def free_context(self, context_id: ContextId) -> RequestOutput | None:
        """Frees the context's blocks (shared ones stay while a fork holds them); cancels its request."""
        context = self.tree.get(context_id)
        output = None
        if context.active_request is not None:
            output = self.cancel(context.active_request.request_id)
        if not context.freed:  # cancelling a fork that never happened already removed it
            self.tree.free(context_id)
        return output

    def reset_prefix_cache(self) -> int:
        """Drops the block cache's blocks that no context holds (`--prefix-caching`), so that the next prompts
        compute what they do not inherit; returns how many. Contexts, forks and running requests keep their blocks
        (no step reads an unused block, so this may run between any two steps)."""
        return self.allocator.drop_cached()

    def has_work(self) -> bool:
        return bool(self._requests) or self._in_flight is not None

    def stats(self) -> EngineStats:
        return EngineStats(
            prefill_tokens=self.prefill_tokens,
            decode_tokens=self.decode_tokens,
            reused_tokens=self.tree.reused_tokens,
            cached_tokens=self.tree.cached_tokens,
            kv_blocks_used=self.allocator.num_used,
            kv_blocks_free=self.allocator.num_free,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_contexts=len(self.tree),
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            kv_capacity_tokens=self.capacity_tokens,
        )

    def context_logits(self, context_id: ContextId) -> torch.Tensor | None:
        """Next-token logits (V,) of a fully computed context, else None."""
        context = self.tree.get(context_id)
        return context.last_logits if context.num_pending == 0 else None

    # ---- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one batch: prefill chunks and decode tokens together, then samples. Returns its events. A step
        that fails (a bug, a device error) ends every request with EngineStepError; the engine serves on.

        With `overlap_steps` a step's sampled tokens are read back one call later: this call launches its batch
        on the device, then waits for the step before and turns its tokens into events while the device
        computes. A token still on the device is a placeholder in its context that the next batch can compute
        already; a request that turns out to have ended (a stop) computed one token for nothing. A step with
        prompt tokens reads the step before back first: its launch (eager, not a CUDA graph) is long host work
        that the step before's events, often first tokens, should not wait behind."""
        outputs: list[RequestOutput] = []
        started, counts = time.perf_counter(), (self.num_steps, self.prefill_tokens, self.decode_tokens)
        try:
            self._step(outputs)
        except Exception as exc:  # a bug or a device error: every request fails, with the events made so far
            log.exception("an engine step failed; the requests in the engine are stopped")
            outputs.extend(self.abort_all(EngineStepError(f"the engine failed in a step: {exc!r}")))
        if self._step_log is not None and (self.num_steps > counts[0] or outputs):
            self._step_log.write(started, time.perf_counter(), launched=self.num_steps - counts[0],
                                 prefill_tokens=self.prefill_tokens - counts[1],
                                 decode_tokens=self.decode_tokens - counts[2], events=len(outputs),
                                 running=self.scheduler.num_running, waiting=self.scheduler.num_waiting)
        return outputs

    def _step(self, outputs: list[RequestOutput]) -> None:
        chunks, failed = self.scheduler.schedule()
        outputs.extend(self._finish(request, "error", error) for request, error in failed)
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and any(c.num_tokens > 1 for c in chunks):
            outputs.extend(self._complete(in_flight))
            chunks = [c for c in chunks if not c.request.finished]  # ended by a token just read back
            in_flight = None  # its placeholders are tokens now
        in_flight_tokens = in_flight.tokens if in_flight is not None else None
        requests = self._launch(chunks, in_flight_tokens, outputs) if chunks else []
        if in_flight is not None and any(r.grammar is not None or r.sampling.penalized for r in requests):
            # A grammar's mask and a penalty need the token before: the step before is read back (while the device
            # computes this step's model run) and its tokens advance the grammars before this step samples.
            outputs.extend(self._complete(in_flight))
            requests = [r for r in requests if not r.finished]
            in_flight = None
        launched = self._sample(requests) if requests else None  # None: nothing sampled
        if in_flight is not None:
            outputs.extend(self._complete(in_flight))
        if launched is not None:
            if self.overlap_steps:
                self._in_flight = launched
            else:
                outputs.extend(self._complete(launched))

    def _launch(
        self, chunks: list[ScheduledChunk], in_flight_tokens: torch.Tensor | None, outputs: list[RequestOutput]
    ) -> list[Request]:
        """Queues the chunks' model run on the device; returns the requests that sample in this step. Appends the
        events of fills that end here to `outputs` (their KV is computed before any later step reads it).
        `in_flight_tokens`: the step before's sampled tokens, which placeholders stand for."""
        for chunk in chunks:
            # A generated token fed back is a chunk of one; a longer chunk of a request that has generated is the
            # recomputation of a preempted one (prompt and tokens): prefill.
            if chunk.request.kind is RequestKind.GENERATE and chunk.request.num_generated and chunk.num_tokens == 1:
                self.decode_tokens += chunk.num_tokens
            else:
                self.prefill_tokens += chunk.num_tokens
        self.num_steps += 1
        self.runner.run(chunks, in_flight_tokens)
        for chunk in chunks:
            self.tree.index_blocks(chunk.request.context)
        ready = [c.request for c in chunks if c.request.context.num_pending == 0]
        outputs.extend(self._finish(r, "filled") for r in ready if r.kind is RequestKind.FILL)
        # A request for its prompt's log-probabilities alone (max_tokens 0) ends with its prompt.
        outputs.extend(self._finish_prompt(r) for r in ready if r.kind is RequestKind.GENERATE
                       and r.sampling.max_tokens == 0)
        return [r for r in ready if r.kind is RequestKind.GENERATE and not r.finished]

    def _sample(self, requests: list[Request]) -> InFlightStep:
        """Queues the sampling of the requests' next tokens (and their log-probabilities) on the device."""
        logits = torch.stack([r.context.last_logits for r in requests])  # (B, V)
        params, generators = [r.sampling for r in requests], [r.generator for r in requests]
        masks = token_masks([r.grammar for r in requests], self.config.vocab_size, self.device)
        histories = [TokenHistory(r.context.token_ids, r.output_token_ids) if r.sampling.penalized else None
                     for r in requests]
        banned = [r.sampling.banned_tokens(r.num_generated, self.eos_token_ids) for r in requests]
        tokens = self.sampler.sample(logits, params, generators, masks, histories, banned)  # (B,) on the device
        logprob_rows = [(row, r.sampling.logprobs) for row, r in enumerate(requests) if r.sampling.logprobs is not None]
        logprobs = None
        if logprob_rows:
            rows = to_device([row for row, _ in logprob_rows], self.device)
            logprobs = token_logprobs(logits[rows], tokens[rows], max(k for _, k in logprob_rows))
        sampled = []
        for row, request in enumerate(requests):
            context = request.context
            index = None
            if request.num_generated + 1 < request.sampling.max_tokens:  # else it ends with this token
                index = len(context.token_ids)
                context.token_ids.append(in_flight_token(row))  # pending: computed if generation goes on
            request.num_in_flight += 1
            sampled.append((request, index))
        return InFlightStep(tokens, sampled, logprobs, logprob_rows)

    def _complete(self, step: InFlightStep) -> list[RequestOutput]:
        """Waits for the step's sampled tokens and turns them into events."""
        tokens, logprobs = step.host_results()
        outputs = []
        for row, ((request, index), token) in enumerate(zip(step.sampled, tokens)):
            request.num_in_flight -= 1
            if request.finished:  # cancelled, freed, or ended by a token of the step before
                continue
            context = request.context
            if index is None:
                context.token_ids.append(token)  # its last token: never computed
            else:
                context.token_ids[index] = token
            output = request.add_token(token, self.eos_token_ids, logprobs.get(row))
            if output.finished:
                self._release(request)
            outputs.append(output)
        return outputs

    def _finish(self, request: Request, reason: str, error: EngineError | None = None) -> RequestOutput:
        self._release(request)
        return RequestOutput(request.request_id, request.context.context_id, [], "", finished=True,
                             finish_reason=reason, error=error, cached_tokens=request.cached_tokens)

    def _finish_prompt(self, request: Request) -> RequestOutput:
        """Ends a request whose prompt is computed and that generates nothing: its event has its prompt's
        log-probabilities."""
        output = self._finish(request, "length")
        output.prompt_logprobs = request.take_prompt_logprobs()
        return output

    def _release(self, request: Request) -> None:
        request.finished = True
        self._requests.pop(request.request_id, None)
        self.scheduler.remove(request)
        context = request.context
        context.active_request = None
        while context.token_ids and context.token_ids[-1] < 0:  # a token of the step in flight, not to be had
            context.token_ids.pop()
        if context.num_computed > len(context.token_ids):
            # A failed step had computed the popped token's KV (its value never came back): the last token is
            # computed again, for logits of the tokens the context holds.
            self.tree.uncompute(context, len(context.token_ids) - 1)
        if not context.freed and (not context.forked or not context.token_ids):
            # It ended before its fork, or before its tokens reached the context it created: the context never
            # came to be. A fork that waited for it then fails (its parent is gone) rather than start from nothing.
            self.tree.free(context.context_id)
        elif not context.freed:
            self.tree.index_blocks(context)  # blocks whose last tokens were still on the device at their step

    # ---- blocking conveniences --------------------------------------------------------------------

    def run_until_done(self, requests: list[Request]) -> dict[int, list[RequestOutput]]:
        """Steps until the given requests finish; returns each one's events."""
        pending = {r.request_id for r in requests if not r.finished}
        events: dict[int, list[RequestOutput]] = {r.request_id: [] for r in requests}
        while pending:
            for output in self.step():
                if output.request_id in events:
                    events[output.request_id].append(output)
                    if output.finished:
                        pending.discard(output.request_id)
        return events

    def fill(
        self, token_ids: list[int], context_id: ContextId, parent_context_id: ContextId | None = None, priority: int = 0
    ) -> None:
        """Prefills and returns once the context's KV is computed."""
        request = self.submit_fill(token_ids, context_id, parent_context_id, priority)
        final = self.run_until_done([request])[request.request_id][-1]
        if final.error is not None:
            raise final.error

    def generate(
        self,
        sampling: SamplingParams,
        context_id: ContextId,
        parent_context_id: ContextId | None = None,
        priority: int = 0,
    ) -> Iterator[RequestOutput]:
        """Decodes into the context, yielding each token's event as it is sampled."""
        request = self.submit_generate(sampling, context_id, parent_context_id, priority)
        while True:
            for output in self.step():
                if output.request_id != request.request_id:
                    continue
                if output.error is not None:
                    raise output.error
                yield output
                if output.finished:
                    return
