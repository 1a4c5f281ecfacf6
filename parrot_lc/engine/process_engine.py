"""An LLMEngine in a process of its own, for asyncio callers: AsyncEngine's interface, but the engine's Python
work (scheduling, building steps, sampling, detokenizing) takes no turns on the caller's interpreter lock, which
an HTTP server streaming to hundreds of clients needs for itself.

Commands go to the engine process over a pipe, each with a key the caller picked; the process answers a command
that failed at once, and sends each step's outputs (keyed the same way) and its counters in one message. A
thread here reads the pipe and hands outputs to their callers' event loops, one wake-up per loop and message.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import torch

from parrot_lc.engine.async_engine import EngineDriver, deliver
from parrot_lc.engine.context import ContextId
from parrot_lc.engine.engine import LLMEngine
from parrot_lc.engine.errors import EngineUnavailableError, InvalidRequestError
from parrot_lc.engine.loader import load_model_info
from parrot_lc.engine.request import RequestOutput
from parrot_lc.settings import EngineSettings
from parrot_lc.startup import freeze_startup_objects


@dataclass
class Answer(RequestOutput):
    """The engine process's answer to a command that returns a value rather than starting a request."""

    value: object = None


class ProcessEngine(EngineDriver):
    """fill / generate / free_context as coroutines over an engine process (started here, stopped by close)."""

    def __init__(self, settings: EngineSettings) -> None:
        config, self.tokenizer = load_model_info(settings.model, settings.cache_dir)
        self.vocab_size = config.vocab_size
        self.max_context = config.max_position_embeddings
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._pipe, child_pipe = context.Pipe()
        self._process = context.Process(target=serve_engine, args=(settings, child_pipe), name="parrot-engine",
                                        daemon=True)
        self._process.start()
        child_pipe.close()
        kind, payload = self._pipe.recv()
        if kind == "failed":
            self._process.join()
            raise payload
        self._stats, self.info = payload
        self._keys = itertools.count()
        self._listeners = {}
        self._gone_lock = threading.Lock()  # a caller registers before the reader's last sweep, or learns it is gone
        self._gone = False
        # Commands go out from a thread of their own, in order: a send blocks while the engine is inside a step
        # and the pipe's buffer is full (hundreds of prompts arriving at once), which the caller's event loop must
        # not wait for.
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._write, name="parrot-engine-send", daemon=True)
        self._sender.start()
        self._reader = threading.Thread(target=self._read, name="parrot-engine-pipe", daemon=True)
        self._reader.start()

    async def free_context(self, context_id: ContextId) -> None:
        async for _ in self._stream("free", context_id):
            pass

    async def reset_prefix_cache(self) -> int:
        [answer] = [output async for output in self._stream("reset_prefix_cache")]
        return answer.value

    def close(self) -> None:
        self._outbox.put(("stop",))
        self._outbox.put(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._sender.join(timeout=10)
        self._reader.join(timeout=10)  # it ends on the pipe's end, failing whoever still waits
        self._pipe.close()

    def _write(self) -> None:
        """Sends the outbox's commands until close() (None) or the pipe's end (the process is gone: the reader
        then fails whoever waits)."""
        while (message := self._outbox.get()) is not None:
            try:
                data = ForkingPickler.dumps(message)  # what Connection.send does, apart from the pipe's errors
            except Exception as exc:  # a command that cannot be pickled: its caller learns it, the rest go on
                error = InvalidRequestError(f"the command could not be sent to the engine process: {exc!r}")
                deliver(self._listeners, [RequestOutput(message[1], "", [], "", finished=True, finish_reason="error",
                                                        error=error)])
                continue
            try:
                self._pipe.send_bytes(data)
            except (OSError, ValueError):  # the pipe is closed
                return

    async def _start(self, command: str, args: tuple, outputs: asyncio.Queue) -> int:
        """Sends the command under a new key: the child answers under it (free_context too)."""
        key = next(self._keys)
        with self._gone_lock:
            if self._gone:
                raise EngineUnavailableError("the engine process exited")
            self._listeners[key] = (asyncio.get_running_loop(), outputs)  # before sending: nothing comes back first
        self._outbox.put((command, key, *args))
        return key

    def _stop(self, key: int) -> None:
        self._listeners.pop(key, None)
        self._outbox.put(("cancel", key))

    def _read(self) -> None:
        try:
            while True:
                try:
                    outputs, self._stats = self._pipe.recv()
                except (EOFError, OSError):
                    return
                deliver(self._listeners, outputs)
        finally:  # the process is gone (stopped, or died), or this thread failed: whoever still waits learns it
            with self._gone_lock:
                self._gone = True
                waiting = list(self._listeners)
            error = EngineUnavailableError("the engine process exited")
            deliver(self._listeners, [RequestOutput(key, "", [], "", finished=True, finish_reason="error",
                                                    error=error) for key in waiting])


def serve_engine(settings: EngineSettings, pipe: Connection) -> None:
    """The engine process: builds the engine, then takes commands between steps and sends each step's outputs.
    It stops on the parent's `stop` or when the pipe ends (the parent died), not on the signals that reach the
    whole process group: the server drains its requests first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = LLMEngine(settings)
    except Exception as exc:  # the parent raises it
        pipe.send(("failed", exc))
        return
    freeze_startup_objects()
    if engine.device.type == "cuda":
        # Past start-up this process's CPU work is a step's bookkeeping, on small tensors: a pool of threads as
        # wide as the machine only adds wake-up latency to it (a step of 128 sequences spent 3.8 ms comparing
        # their block tables with 16 threads on the H100's host).
        torch.set_num_threads(1)
    pipe.send(("ready", (engine.stats(), engine.info)))
    keys: dict[int, int] = {}  # request id -> the caller's key
    requests: dict[int, int] = {}  # the caller's key -> request id

    def send(outputs: list[RequestOutput]) -> None:
        pipe.send((outputs, engine.stats()))

    while True:
        while pipe.poll(0 if engine.has_work() else None):
            try:
                command, *args = pipe.recv()
            except EOFError:
                return
            if command == "stop":
                return
            key = args[0]
            try:
                if command == "fill":
                    request = engine.submit_fill(*args[1:])
                elif command == "generate":
                    request = engine.submit_generate(*args[1:])
                elif command == "cancel":
                    if key in requests:
                        output = engine.cancel(requests[key])
                        if output is not None and output.request_id in keys:
                            _keyed(output, keys, requests)  # forgets it: its caller went away
                    continue
                elif command == "reset_prefix_cache":
                    send([Answer(key, "", [], "", finished=True, finish_reason="reset",
                                 value=engine.reset_prefix_cache())])
                    continue
                else:  # free: it also ends the context's request, if one runs
                    output = engine.free_context(args[1])
                    ended = [output] if output is not None and output.request_id in keys else []
                    send([_keyed(o, keys, requests) for o in ended]
                         + [RequestOutput(key, "", [], "", finished=True, finish_reason="freed")])
                    continue
            except Exception as exc:  # typed engine errors, or a bug: for the caller, and the process serves on
                send([RequestOutput(key, "", [], "", finished=True, finish_reason="error", error=exc)])
                continue
            keys[request.request_id], requests[key] = key, request.request_id
        send([_keyed(o, keys, requests) for o in engine.step() if o.request_id in keys])


def _keyed(output: RequestOutput, keys: dict[int, int], requests: dict[int, int]) -> RequestOutput:
    """The output under its caller's key; a finished request's key is forgotten."""
    key = keys[output.request_id]
    if output.finished:
        del keys[output.request_id]
        del requests[key]
    output.request_id = key
    return output
