"""The Runnable adapter: run an unchanged LangChain chain as one graph of Semantic Variables.

`deferred(chain)` returns a Runnable. Invoking it runs the chain with every ParrotLLM call returning a
placeholder: a marker string that stands for the call's output variable. Prompt templates, f-strings and
string joins carry markers along like any text, so each call's prompt becomes a template whose inputs are
other calls' outputs. Nothing is sent while the chain runs; at the end the whole graph goes to the server in
one request, the final output is fetched (latency), and every marker is replaced by its value, so the caller
gets what an eager run returns (greedy).

A step that needs a real value waits for it, and the run goes on: an output parser other than
StrOutputParser gets its input's values, and a RunnableLambda is first run on placeholders that refuse to be
read (joins and formats pass them through); if it reads one (`in`, `==`, `len`, `.strip()`...), the values
it was given are fetched and it runs again on them. Such a wait is logged once per run. Only `invoke` of
ParrotLLM is deferred (chat models run eagerly, on their inputs' values); the adapter is synchronous.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

from langchain_core.output_parsers import BaseOutputParser, StrOutputParser
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

from parrot_lc.frontend import SemanticVariable, Session
from parrot_lc.integrations.langchain._base import ParrotParams
from parrot_lc.integrations.langchain._graph import Prompt, add_calls

__all__ = ["deferred"]

log = logging.getLogger("parrot_lc.deferred")
_MARK = "\u2063"  # an invisible separator: markers do not occur in real text
_MARKER = re.compile(f"{_MARK}sv(\\d+){_MARK}")
_TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("parrot_lc_trace", default=None)


class ValueNeeded(BaseException):
    """A step read a placeholder: it must run on real values (a BaseException, so that a step's own
    `except Exception` does not swallow it)."""


class MarkedText(str):
    """Text holding markers, that refuses to be read: reading it raises ValueNeeded (joins and formats still copy
    it)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueNeeded(str(self))

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __contains__ = __len__ = __getitem__ = __iter__ = _refuse
    __bool__ = __hash__ = __mul__ = __rmul__ = _refuse
    startswith = endswith = find = rfind = index = rindex = count = split = rsplit = splitlines = _refuse
    strip = lstrip = rstrip = lower = upper = title = capitalize = casefold = replace = partition = _refuse
    rpartition = isdigit = isalpha = isspace = isnumeric = encode = _refuse


@dataclass
class Trace:
    """The calls of one deferred run: the outputs of the LLM calls, in a frontend session whose graph block lasts
    the run (a call is submitted with the others when a value is first needed, or at the end)."""

    outputs: list[SemanticVariable] = field(default_factory=list)
    values: dict[int, str] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    session: Session | None = None
    graph: list[dict[str, Any]] | None = None
    """The calls as the server saw them, once the run has ended (None if nothing ran)."""
    waited: bool = False
    _blocks: ExitStack = field(default_factory=ExitStack)

    def add(self, llm: ParrotParams, prompts: list[str], sampling: dict[str, Any]) -> list[MarkedText]:
        """Adds the calls of one invoke or batch of a ParrotLLM to the graph (in a session of the first LLM's
        server); returns their markers."""
        with self.lock:
            if self.session is None:
                self.session = llm.parrot_client().session()
                self._blocks.enter_context(self.session.graph())
            start = len(self.outputs)
            self.outputs += add_calls(self.session, [self._prompt(p) for p in prompts], sampling)
        return [MarkedText(f"{_MARK}sv{start + i}{_MARK}") for i in range(len(prompts))]

    def _prompt(self, text: str) -> Prompt:
        """The prompt's text, with the output of an earlier call where its marker stands."""
        prompt: list[str | SemanticVariable] = []
        position = 0
        for match in _MARKER.finditer(text):
            prompt += [text[position:match.start()], self.outputs[int(match.group(1))]]
            position = match.end()
        return [*prompt, text[position:]]

    def submit(self) -> None:
        """Sends the calls not yet sent, as one graph."""
        with self.lock:
            if self.session is not None:
                self.session.flush()

    def value(self, index: int) -> str:
        with self.lock:
            if index not in self.values:
                self.submit()  # all the calls known so far: the server runs them while this one waits
                self.values[index] = self.outputs[index].get()
            return self.values[index]

    def resolve(self, data: Any) -> Any:
        """`data` (strings, lists, tuples, dicts of them) with every marker replaced by its value."""
        if isinstance(data, str):
            return _MARKER.sub(lambda m: self.value(int(m.group(1))), str.__str__(data))
        if isinstance(data, (list, tuple)):
            return type(data)(self.resolve(item) for item in data)
        if isinstance(data, dict):
            return {key: self.resolve(item) for key, item in data.items()}
        return data

    def note_wait(self, step: str) -> None:
        if not self.waited:
            self.waited = True
            log.info("deferred run: %s needs real values; it waits for them and the run goes on", step)

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Ends the graph block (a run that raised drops the calls not yet sent), keeps the graph as the server
        saw it, and deletes the session."""
        if self.session is None:
            return
        try:
            self._blocks.__exit__(*exc_info)
            self.graph = self.session.status()["graph"]
        finally:
            self.session.close()


def _as_marked_text(data: Any) -> Any:
    """Strings that hold markers become MarkedText, so that reading them is noticed."""
    if isinstance(data, str) and _MARKER.search(data):
        return MarkedText(data)
    if isinstance(data, (list, tuple)):
        return type(data)(_as_marked_text(item) for item in data)
    if isinstance(data, dict):
        return {key: _as_marked_text(item) for key, item in data.items()}
    return data


# While a deferred run is active (and only then), lambdas and parsers go through these.
_lambda_invoke: Callable = RunnableLambda.invoke
_parser_invoke: Callable = BaseOutputParser.invoke


def _deferred_lambda_invoke(self: RunnableLambda, input: Any, config: RunnableConfig | None = None, **kwargs: Any):
    trace = _TRACE.get()
    if trace is None:
        return _lambda_invoke(self, input, config, **kwargs)
    try:
        return _lambda_invoke(self, _as_marked_text(input), config, **kwargs)
    except ValueNeeded:
        trace.note_wait(f"RunnableLambda {self.get_name()}")
        return _lambda_invoke(self, trace.resolve(input), config, **kwargs)


def _deferred_parser_invoke(self: BaseOutputParser, input: Any, config: RunnableConfig | None = None, **kwargs: Any):
    trace = _TRACE.get()
    if trace is not None and not isinstance(self, StrOutputParser):
        trace.note_wait(type(self).__name__)
        input = trace.resolve(input)
    return _parser_invoke(self, input, config, **kwargs)


_patch_lock = threading.Lock()
_patched = False


def _install_hooks() -> None:
    global _patched
    with _patch_lock:
        if not _patched:
            RunnableLambda.invoke = _deferred_lambda_invoke
            BaseOutputParser.invoke = _deferred_parser_invoke
            _patched = True


def current_trace() -> Trace | None:
    """The trace of the deferred run in progress in this context (ParrotLLM records its calls there)."""
    return _TRACE.get()


class DeferredRunnable(Runnable):
    """`chain`, run as one graph on the Parrot server (see the module docstring)."""

    def __init__(self, chain: Runnable) -> None:
        self.chain = chain
        self.last_graph: list[dict[str, Any]] | None = None
        """The calls of the last run as the server saw them: inputs, outputs, latency-critical, task group."""

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        _install_hooks()
        trace = Trace()
        token = _TRACE.set(trace)
        try:
            with trace:
                output = self.chain.invoke(input, config, **kwargs)
                trace.submit()
                return trace.resolve(output)
        finally:
            _TRACE.reset(token)
            self.last_graph = trace.graph


def deferred(chain: Runnable) -> Runnable:
    """The chain, run as one graph of Semantic Variables: every ParrotLLM call becomes a semantic-function
    call whose inputs are other calls' outputs, the graph is submitted at once, and the final output comes
    back with every placeholder replaced by its value."""
    return DeferredRunnable(chain)
