"""An LLMEngine driven by a background thread, for asyncio callers (the server).

The engine's state is touched by its thread alone: callers send commands through a queue and await their
results; each request's outputs are handed back to the caller's event loop as they are produced.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import AsyncIterator, Callable, TypeVar

from transformers import PreTrainedTokenizerBase

from parrot_lc.engine.context import ContextId
from parrot_lc.engine.engine import EngineInfo, EngineStats, LLMEngine
from parrot_lc.engine.engine_client import EngineClient
from parrot_lc.engine.request import RequestOutput
from parrot_lc.engine.sampling import SamplingParams

T = TypeVar("T")


class EngineDriver(EngineClient, ABC):
    """The EngineClient of an LLMEngine that runs elsewhere (a thread, a process): fill / generate as coroutines. A
    subclass starts a request and registers its caller's queue in `_listeners` (`_start`), and stops one whose
    caller went away (`_stop`); outputs reach the queues through `deliver`."""

    tokenizer: PreTrainedTokenizerBase | None
    vocab_size: int
    max_context: int
    info: EngineInfo  # what the engine runs (its start-up log)
    _listeners: Listeners
    _stats: EngineStats

    async def fill(
        self, token_ids: list[int], context_id: ContextId, parent_context_id: ContextId | None = None, priority: int = 0,
        issued: asyncio.Future | None = None,
    ) -> int:
        """Prefills the tokens into the context and returns how many it took from the block cache; raises the
        engine's typed error if the request fails. `issued` (if given) gets its result once the command is on its
        way: the engine takes commands in the order they are sent, so a fork of the context sent from then on waits
        there for the fill, no round trip between."""
        cached = 0
        async for output in self._stream("fill", token_ids, context_id, parent_context_id, priority, issued=issued):
            cached = output.cached_tokens
        return cached

    def generate(
        self,
        sampling: SamplingParams,
        context_id: ContextId,
        parent_context_id: ContextId | None = None,
        priority: int = 0,
        token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Decodes into the context (after filling `token_ids`, if given), yielding each token's event; closing
        the iterator early cancels it."""
        return self._stream("generate", sampling, context_id, parent_context_id, priority, token_ids)

    def stats(self) -> EngineStats:
        """The counters as of the engine's last step (read without waiting for the engine)."""
        return self._stats

    @abstractmethod
    async def free_context(self, context_id: ContextId) -> None: ...

    @abstractmethod
    async def reset_prefix_cache(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    async def _start(self, command: str, args: tuple, outputs: asyncio.Queue) -> int:
        """Starts the request (`fill` or `generate`, the engine's submit arguments) with `outputs` as its
        listener; returns the key its outputs come under. Raises the engine's typed error if it is refused."""

    @abstractmethod
    def _stop(self, key: int) -> None:
        """Cancels the request whose caller went away, letting its blocks go."""

    async def _stream(self, command: str, *args, issued: asyncio.Future | None = None) -> AsyncIterator[RequestOutput]:
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        key = await self._start(command, args, outputs)
        if issued is not None and not issued.done():
            issued.set_result(None)
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                if output.error is not None:
                    raise output.error
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._stop(key)


class AsyncEngine(EngineDriver):
    """fill / generate / free_context as coroutines over one engine thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.config.vocab_size
        self.max_context = engine.config.max_position_embeddings
        self.info = engine.info
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._listeners = {}
        self._stats = engine.stats()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="parrot-engine", daemon=True)
        self._thread.start()

    async def _call(self, fn: Callable[[], T]) -> T:
        future: Future = Future()
        self._commands.put((fn, future))
        return await asyncio.wrap_future(future)

    async def free_context(self, context_id: ContextId) -> None:
        await self._call(lambda: self.engine.free_context(context_id))

    async def reset_prefix_cache(self) -> int:
        return await self._call(self.engine.reset_prefix_cache)

    def close(self) -> None:
        self._stopped.set()
        self._commands.put((lambda: None, Future()))
        self._thread.join(timeout=10)

    async def _start(self, command: str, args: tuple, outputs: asyncio.Queue) -> int:
        loop = asyncio.get_running_loop()
        submit = self.engine.submit_fill if command == "fill" else self.engine.submit_generate

        def submit_and_listen() -> int:  # on the engine thread
            request = submit(*args)  # raises typed errors straight to the caller
            self._listeners[request.request_id] = (loop, outputs)
            return request.request_id

        return await self._call(submit_and_listen)

    def _stop(self, key: int) -> None:
        self._commands.put((lambda: self.engine.cancel(key), Future()))

    def _loop(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_work()
            try:
                while True:
                    fn, future = self._commands.get(block=block)
                    block = False
                    self._run_command(fn, future)
            except queue.Empty:
                pass
            if self.engine.has_work():
                outputs = self.engine.step()
                # The counters first: a caller woken by its request's last event reads them with that step in.
                self._stats = self.engine.stats()
                self._deliver_all(outputs)

    def _run_command(self, fn: Callable[[], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():  # its caller was cancelled before it ran: nothing to do
            return
        try:
            result = fn()
        except Exception as exc:  # handed to the awaiting caller, typed as the engine raised it
            future.set_exception(exc)
            return
        self._stats = self.engine.stats()  # before any caller wakes: it reads the counters with its command done
        if isinstance(result, RequestOutput):  # a cancel or free that ended a request
            self._deliver_all([result])
        future.set_result(result)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        deliver(self._listeners, outputs)


Listeners = dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]]  # request id -> its caller's loop and queue


def deliver(listeners: Listeners, outputs: list[RequestOutput]) -> None:
    """Outputs (a step's) to their listeners, from the engine's thread, with one wake-up per event loop rather
    than one per output: at hundreds of streams, a call_soon_threadsafe per output kept the loop busy waking
    up. A finished output's listener is forgotten."""
    batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
    for output in outputs:
        listener = listeners.get(output.request_id)
        if listener is None:
            continue
        loop, listener_outputs = listener
        if output.finished:
            listeners.pop(output.request_id, None)  # its caller, on another thread, may have dropped it already
        batches.setdefault(loop, []).append((listener_outputs, output))
    for loop, batch in batches.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the caller's event loop is gone; the engine serves on
            pass


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for listener_outputs, output in batch:
        listener_outputs.put_nowait(output)
