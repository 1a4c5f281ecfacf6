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
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from langchain_core.output_parsers import BaseOutputParser, StrOutputParser
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

from parrot_lc.integrations.langchain._base import new_variables_body

__all__ = ["deferred"]

log = logging.getLogger("parrot_lc.deferred")
_MARK = "\u2063"  # an invisible separator: markers do not occur in real text
_MARKER = re.compile(f"{_MARK}sv(\\d+){_MARK}")
_TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("parrot_lc_trace", default=None)


class ValueNeeded(BaseException):
    """A step read a placeholder: it must run on real values (a BaseException, so that a step's own
    `except Exception` does not swallow it)."""


class Placeholder(str):
    """A marker that refuses to be read: reading it raises ValueNeeded (joins and formats still copy it)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueNeeded(str(self))

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __contains__ = __len__ = __getitem__ = __iter__ = _refuse
    __bool__ = __hash__ = __mul__ = __rmul__ = _refuse
    startswith = endswith = find = rfind = index = rindex = count = split = rsplit = splitlines = _refuse
    strip = lstrip = rstrip = lower = upper = title = capitalize = casefold = replace = partition = _refuse
    rpartition = isdigit = isalpha = isspace = isnumeric = encode = _refuse


@dataclass
class TracedCall:
    """One LLM call seen while tracing: its prompt (markers for other calls' outputs) and its settings."""

    llm: Any  # the ParrotLLM
    prompt: str
    sampling: dict[str, Any]
    shared_prefix: int = 0  # characters of the prompt shared with the other calls of its batch
    var_id: str | None = None


@dataclass
class Trace:
    """The calls of one deferred run and the server session that runs them."""

    calls: list[TracedCall] = field(default_factory=list)
    values: dict[int, str] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    url: str | None = None
    session: dict[str, str] | None = None
    submitted: int = 0
    waited: bool = False

    def add(self, llm: Any, prompts: list[str], sampling: dict[str, Any]) -> list[Placeholder]:
        """Records the calls of one invoke or batch; returns their placeholders."""
        prefix = len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0
        with self.lock:
            start = len(self.calls)
            self.calls += [TracedCall(llm, p, sampling, prefix) for p in prompts]
        return [Placeholder(f"{_MARK}sv{start + i}{_MARK}") for i in range(len(prompts))]

    # ---- on the server ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"X-Session-Token": self.session["session_token"]} if self.session else {}
        return self.calls[0].llm._request(self.url, method, path, headers=headers, **kwargs)

    def _path(self, *parts: str) -> str:
        return "/".join(("/api/sessions", self.session["session_id"], *parts))

    def submit(self) -> None:
        """Sends the calls recorded since the last submission, as one graph."""
        with self.lock:
            new = self.calls[self.submitted:]
            if not new:
                return
            if self.session is None:
                self.url = new[0].llm._server_url()
                self.session = self._request("POST", "/api/sessions")
            made = self._request("POST", self._path("variables:batchCreate"), json=new_variables_body(len(new)))
            for call, variable in zip(new, made["variables"]):
                call.var_id = variable["var_id"]
            self._request("POST", self._path("calls"), json={"calls": [self._template(c) for c in new]})
            self.submitted = len(self.calls)

    def _template(self, call: TracedCall) -> dict[str, Any]:
        pieces: list[dict[str, Any]] = []
        position = 0
        for match in _MARKER.finditer(call.prompt):
            if match.start() > position:
                pieces.append({"text": call.prompt[position:match.start()]})
            pieces.append({"input": self.calls[int(match.group(1))].var_id})
            position = match.end()
        if position < len(call.prompt):
            pieces.append({"text": call.prompt[position:]})
        first = pieces[0].get("text") if pieces else None
        if first is not None and 0 < call.shared_prefix < len(first):
            # The batch's common prefix as a piece of its own: the server fills it once and forks every call.
            pieces[:1] = [{"text": first[:call.shared_prefix]}, {"text": first[call.shared_prefix:]}]
        pieces.append({"output": call.var_id, "sampling": call.sampling})
        return {"template": pieces}

    def value(self, index: int) -> str:
        with self.lock:
            if index not in self.values:
                self.submit()
                reply = self._request("GET", self._path("variables", self.calls[index].var_id))
                self.values[index] = reply["value"]
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

    def close(self) -> dict[str, Any] | None:
        """Deletes the server session; returns the graph it ran as the server saw it (None if nothing ran)."""
        if self.session is None:
            return None
        graph = self._request("GET", self._path())["graph"]
        self._request("DELETE", self._path())
        return graph


def _as_placeholders(data: Any) -> Any:
    """Strings that hold markers become Placeholders, so that reading them is noticed."""
    if isinstance(data, str) and _MARKER.search(data):
        return Placeholder(data)
    if isinstance(data, (list, tuple)):
        return type(data)(_as_placeholders(item) for item in data)
    if isinstance(data, dict):
        return {key: _as_placeholders(item) for key, item in data.items()}
    return data


# While a deferred run is active (and only then), lambdas and parsers go through these.
_lambda_invoke: Callable = RunnableLambda.invoke
_parser_invoke: Callable = BaseOutputParser.invoke


def _deferred_lambda_invoke(self: RunnableLambda, input: Any, config: RunnableConfig | None = None, **kwargs: Any):
    trace = _TRACE.get()
    if trace is None:
        return _lambda_invoke(self, input, config, **kwargs)
    try:
        return _lambda_invoke(self, _as_placeholders(input), config, **kwargs)
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
            output = self.chain.invoke(input, config, **kwargs)
            trace.submit()
            return trace.resolve(output)
        finally:
            _TRACE.reset(token)
            self.last_graph = trace.close()


def deferred(chain: Runnable) -> Runnable:
    """The chain, run as one graph of Semantic Variables: every ParrotLLM call becomes a semantic-function
    call whose inputs are other calls' outputs, the graph is submitted at once, and the final output comes
    back with every placeholder replaced by its value."""
    return DeferredRunnable(chain)
