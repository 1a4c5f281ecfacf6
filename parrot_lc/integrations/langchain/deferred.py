"""The Runnable adapter: run an unchanged LangChain chain (LCEL, a langchain-classic chain, a LangGraph graph) as
graphs of Semantic Variables, with the result an eager run gives.

`deferred(chain)` returns a Runnable. While it runs the chain, every call of ParrotLLM and ChatParrot (invoke,
batch, generate, stream, and their async forms) is recorded instead of made, and its output is a value not known
yet. LangChain's code carries such values into later prompts, so each call becomes a semantic-function call whose
inputs are other calls' outputs (a chat call's messages are rendered with the model's chat template around them),
and calls that begin with the same text share that prefix on the server. The calls recorded go to the server as one
graph when a value is first read (the run waits for it and goes on) or when the run ends; the output comes back
with real text.

No code reads a value that is not known yet as if it were text (see `_boundaries`): the application's functions
get values whose every read waits for the real text, and where that cannot be made to hold (C code that wants a
real str, a model on another server, an LLM cache, a chat template that edits contents) the step runs eagerly, on
real text. A run's waits and eager steps are logged (the first at INFO) and listed in `last_run.waits`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig

from parrot_lc.frontend.errors import ParrotError
from parrot_lc.integrations.langchain._boundaries import installed
from parrot_lc.integrations.langchain._errors import as_langchain_error, raises_langchain_errors
from parrot_lc.integrations.langchain._trace import DeferredRun, Trace, current_trace

__all__ = ["DeferredRun", "DeferredRunnable", "deferred"]


class DeferredRunnable(Runnable):
    """`runnable`, run as graphs on the Parrot server (see the module docstring). Inside another deferred run it is
    part of that run's graph."""

    def __init__(self, runnable: Runnable) -> None:
        self.runnable = runnable
        self.last_run: DeferredRun | None = None
        """What the last run sent and waited for: its calls as the server saw them, the graphs submitted, the
        steps that waited or ran eagerly."""

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._run(lambda: self.runnable.invoke(input, config, **kwargs))

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """The inputs' runs as one: their calls go to the server together. With `return_exceptions`, an input
        whose run failed (one of its calls, on the server too) gets its error, the others their outputs."""
        return self._run(lambda: self.runnable.batch(inputs, config, return_exceptions=return_exceptions, **kwargs),
                         each=return_exceptions)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._arun(lambda: self.runnable.ainvoke(input, config, **kwargs))

    async def abatch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        return await self._arun(lambda: self.runnable.abatch(inputs, config, return_exceptions=return_exceptions,
                                                             **kwargs), each=return_exceptions)

    # The streams are the chain's own (a LangGraph graph's per-node updates, its messages as (chunk, metadata)...),
    # with real text: they come once the run ends, when the values they hold are known.
    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from self._run(lambda: list(self.runnable.stream(input, config, **kwargs)))

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        async def chunks() -> list[Any]:
            return [chunk async for chunk in self.runnable.astream(input, config, **kwargs)]

        for chunk in await self._arun(chunks):
            yield chunk

    async def astream_events(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
                             ) -> AsyncIterator[Any]:
        """The chain's events (its models' tokens, each step's start and end) with real text."""
        async def events() -> list[Any]:
            return [event async for event in self.runnable.astream_events(input, config, **kwargs)]

        for event in await self._arun(events):
            yield event

    @raises_langchain_errors
    def _run(self, run: Callable[[], Any], each: bool = False) -> Any:
        """`run`'s output with real text (`each`: a batch's, each output on its own, see Trace.finish)."""
        if current_trace() is not None:
            return run()
        with installed(), Trace() as trace:
            try:
                return _with_langchain_errors(trace.finish(run(), each), each)
            finally:
                self.last_run = trace.run

    @raises_langchain_errors
    async def _arun(self, run: Callable[[], Awaitable[Any]], each: bool = False) -> Any:
        if current_trace() is not None:
            return await run()
        with installed(), Trace() as trace:
            try:
                output = await run()
                return _with_langchain_errors(await asyncio.to_thread(trace.finish, output, each), each)
            finally:
                self.last_run = trace.run


def _with_langchain_errors(output: Any, each: bool) -> Any:
    """A run's output; `each` (a batch's outputs, errors among them): its frontend errors as LangChain's too, as
    the eager batch's (which ChatParrot and ParrotLLM raised) are."""
    if not each:
        return output
    return [as_langchain_error(item) if isinstance(item, ParrotError) else item for item in output]


def deferred(chain: Runnable) -> DeferredRunnable:
    """The chain, run as graphs of Semantic Variables on the Parrot server: its ParrotLLM and ChatParrot calls are
    recorded as calls of a graph whose inputs are other calls' outputs, submitted together, and the output comes back
    with real text (the text of an eager run, with greedy sampling). `last_run` tells what a run sent and waited
    for."""
    return DeferredRunnable(chain)
