"""Continuous batching: which requests run in the next step, and how many tokens each computes."""

from __future__ import annotations

from dataclasses import dataclass

from parrot_lc.engine.context import ContextTree
from parrot_lc.engine.errors import EngineError, OutOfMemoryError
from parrot_lc.engine.request import Request, RequestKind


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # pending tokens of the context computed this step; 0: only sample from its logits


class Scheduler:
    """Most important requests first, within a token budget and a sequence cap per step.

    Prefill chunks and decode tokens share one step. A step that decodes for a request prefills less important
    requests' prompts only up to a smaller budget (`background_prefill_tokens`): a step's time grows with its
    prefill tokens, and a latency-critical stream's pace is that time. When KV blocks run out, the least
    important request that holds blocks and is not in this step is preempted (its own KV dropped, recomputed
    later); when nothing can be preempted the request waits, and fails only if no request at all could run.

    With the block cache, a request whose next tokens fill blocks that the cache holds takes those instead, and one
    whose next block a request before it in this step completes waits a step and takes it then: requests that
    arrive together with a prompt in common compute its blocks once.
    """

    def __init__(
        self, tree: ContextTree, max_num_batched_tokens: int, max_num_seqs: int, background_prefill_tokens: int
    ) -> None:
        self.tree = tree
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.background_prefill_tokens = background_prefill_tokens
        self.requests: list[Request] = []
        self.num_running = 0  # requests in the last step
        self.num_waiting = 0  # requests left out of the last step
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.requests.append(request)

    def remove(self, request: Request) -> None:
        self.requests.remove(request)
        if not self.requests:  # the gauges count the last step's requests, but an idle engine runs none
            self.num_running = self.num_waiting = 0

    def schedule(self) -> tuple[list[ScheduledChunk], list[tuple[Request, EngineError]]]:
        """Returns this step's chunks and the requests that failed to start (with why)."""
        self.requests.sort(key=lambda r: r.order)
        budget = self.max_num_batched_tokens
        background = self.background_prefill_tokens
        decoding_priority: int | None = None  # the most important priority this step decodes for
        chunks: list[ScheduledChunk] = []
        failed: list[tuple[Request, EngineError]] = []
        blocked: list[Request] = []
        in_step: set[int] = set()
        filling: set[bytes] = set()  # keys of the blocks that this step's chunks complete
        for request in self.requests:
            if len(chunks) >= self.max_num_seqs:
                break
            context = request.context
            if not request.started:
                if not context.forked and context.parent.active_request is not None:
                    continue  # the fork waits for its parent's in-flight request
                try:
                    self._start(request)
                except OutOfMemoryError:
                    blocked.append(request)  # no block for the fork's partial copy yet
                    continue
                except EngineError as exc:
                    failed.append((request, exc))
                    continue
            if context.num_pending == 0:
                if request.num_in_flight:
                    continue  # its last token is on the device and ends it (max_tokens): nothing to compute
                chunks.append(ScheduledChunk(request, 0))
                in_step.add(request.request_id)
                continue
            # A request that gathers its prompt's log-probabilities computes its prompt itself: cached KV has no logits.
            if (context.num_pending > 1 and request.prompt_logprobs is None
                    and self.tree.take_cached_blocks(context) in filling):
                continue  # its next block is computed in this step: taken from the cache in the next
            # A preempted request recomputing its context is prefill, not decode, whatever it generated before.
            decoding = (request.kind is RequestKind.GENERATE and request.num_generated > 0
                        and context.num_pending == 1)
            if decoding and decoding_priority is None:
                decoding_priority = request.priority
            in_background = not decoding and decoding_priority is not None and request.priority < decoding_priority
            take = min(context.num_pending, min(budget, background) if in_background else budget)
            if take == 0:
                continue
            while self.tree.tokens_that_fit(context) < take and self._preempt_one(request, in_step):
                pass
            take = min(take, self.tree.tokens_that_fit(context))
            if take == 0:
                blocked.append(request)
                continue
            if take > 1:  # a prompt's chunk (a decode token's block is nobody's prompt yet)
                filling.update(self.tree.keys_completed(context, take))
            self.tree.reserve(context, take)
            chunks.append(ScheduledChunk(request, take))
            in_step.add(request.request_id)
            budget -= take
            background -= take if in_background else 0
        # Requests whose tokens are still on the device may end and free blocks once they are read back.
        if not chunks and blocked and not any(r.num_in_flight for r in self.requests):
            failed.append((blocked[0], OutOfMemoryError(
                "the KV cache is full of idle contexts and no request can be preempted: free contexts")))
        self.num_running = len(chunks)
        self.num_waiting = len(self.requests) - len(chunks)
        return chunks, failed

    def _start(self, request: Request) -> None:
        context = request.context
        if not context.forked:
            self.tree.fork(context)
        request.fill_start = len(context.token_ids)
        context.token_ids.extend(request.fill_token_ids)
        request.started = True

    def _preempt_one(self, for_request: Request, in_step: set[int]) -> bool:
        """Preempts the least important started request that is less important than `for_request`."""
        for victim in reversed(self.requests):
            if victim.order <= for_request.order:
                return False
            if victim.request_id in in_step or not victim.started:
                continue
            if self.tree.own_block_count(victim.context) == 0:
                continue
            self.tree.release_own_blocks(victim.context)
            self.num_preemptions += 1
            return True
        return False
