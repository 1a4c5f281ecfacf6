"""Where a deferred run's values cross between LangChain's code and the application's, so that no code ever reads a
value that is not known yet as if it were text.

During a deferred run, LangChain's code that only passes text along (sequences, parallels, bindings, branches,
prompt templates, StrOutputParser, LangGraph's graphs and channels, the combine-documents chains of
langchain-classic, ParrotLLM and ChatParrot themselves) carries such values as marked text (`_markers`). Everywhere
else they are read for real:

- A function of the application that LangChain calls (a RunnableLambda, a RunnableGenerator, a RunnablePassthrough's
  function, a LangGraph node or edge) gets DeferredText: reading it waits for the value and the run goes on; what it
  returns goes back as marked text, but for the destinations a LangGraph edge or Command names, which LangGraph
  reads. If it fails after receiving DeferredText (C code such as `"".join`, `json.loads` or `re` wants a real
  str), it runs again on the real values, and what it gets from runnables is then real too: the step runs eagerly.
  Streamed, such a function runs eagerly from the start. A LangGraph reducer of the application's gets real text.
- What the application gets back from a runnable it calls (a node's `chain.invoke(...)`) is DeferredText, and what
  it passes in goes as marked text.
- Code that reads text gets the real text: other models, retrievers, tools and any other runnable, output parsers
  other than StrOutputParser (however LangChain calls them), jinja2 and mustache templates and f-string templates
  that format a value (a spec, `!r`, an attribute or an index, a value that is not text), the pydantic models the
  application makes (a message, a document), and what keeps values beyond the run (chat message histories, classic
  chains' memories, LangGraph checkpointers).

The entry points (`invoke`, `batch`, `stream`, `transform`, `generate`... and their async forms) of every Runnable
class and those readers are wrapped while at least one deferred run is in progress (`installed`); the wrappers look
at the run's context variables, so other threads and code outside a run get stock LangChain, and the originals are
put back when the last run ends. A Runnable class defined while a run is in progress is not wrapped: its code gets
what LangChain's code gets.
"""

from __future__ import annotations

import copy
import enum
import functools
import inspect
import string
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar, Token, copy_context
from dataclasses import dataclass, replace
from types import FunctionType
from typing import Any, Literal

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.output_parsers import BaseLLMOutputParser, StrOutputParser
from langchain_core.prompts import string as prompt_strings
from langchain_core.runnables import Runnable, RunnableBinding, RunnableGenerator, RunnableLambda, RunnablePassthrough
from pydantic import BaseModel

from parrot_lc.integrations.langchain._base import ParrotParams
from parrot_lc.integrations.langchain._trace import IMMEDIATE, STEP, Trace, current_trace

__all__ = ["installed"]


class Scope(enum.Enum):
    """Whose code runs now, in a deferred run."""

    LANGCHAIN = "LangChain's code: unknown values travel as marked text"
    APPLICATION = "the application's code: unknown values are DeferredText"
    EAGER = "the application's code run again on real values: what it gets from runnables is real"


_SCOPE: ContextVar[Scope] = ContextVar("parrot_lc_scope", default=Scope.LANGCHAIN)

# Modules whose runnables pass text along; of langchain-classic, the chains that combine documents.
_CARRYING_MODULES = ("langchain_core.runnables.", "langchain_core.prompts.", "langchain_core.output_parsers.",
                     "langgraph.", "parrot_lc.", "langchain_classic.chains.combine_documents.",
                     "langchain_classic.chains.llm")
_CALLS = ("invoke", "batch", "generate", "generate_prompt")
_AWAITS = ("ainvoke", "abatch", "agenerate", "agenerate_prompt")
_ITERATES = ("stream", "transform", "batch_as_completed")
_AITERATES = ("astream", "atransform", "abatch_as_completed")
# Readers that are not entry points, by the module and class that define them: (module, class, methods).
_READERS = (
    ("langchain_classic.base_memory", "BaseMemory", ("save_context", "asave_context")),
    ("langgraph.checkpoint.base", "BaseCheckpointSaver", ("put", "aput", "put_writes", "aput_writes")),
)


# ---- what a call of an entry point converts ------------------------------------------------------------------


@dataclass(frozen=True)
class _Crossing:
    """How one call of an entry point, in a deferred run, converts its input and output, and whose code it runs as
    (`scope` None: the caller's)."""

    trace: Trace
    step: str
    scope: Scope | None
    convert_in: Callable[[Any], Any]
    convert_out: Callable[[Any], Any]
    runs_application: bool = False  # from LangChain's code into the application's: run again eagerly if it fails
    immediate: bool = False  # a stream the application reads chunk by chunk: its LLM calls are made at once

    def inside(self):
        return _scoped(self.scope, self.step, self.immediate) if self.scope is not None else nullcontext()

    def eagerly(self) -> _Crossing:
        """The application's function run on real values from the start (streamed: it cannot be run again)."""
        return replace(self, scope=Scope.EAGER, convert_in=self._resolve, runs_application=False)

    def attempts(self) -> Iterator[_Attempt]:
        """The runs of the call: this one, and if the application's function failed on DeferredText, one on real
        values (run each `with` the attempt, returning from the block: a failure that calls for another run ends
        the block quietly)."""
        attempt = _Attempt(self)
        yield attempt
        if attempt.failed:
            yield _Attempt(self.eagerly())

    def _resolve(self, data: Any) -> Any:
        return self.trace.resolve(data, self.step)


class _Attempt:
    """One run of an entry point's call, as a context: whose code runs, and whether the run failed in a way that
    calls for running the application's function again on real values."""

    _AGAIN_ON = (TypeError, ValueError, AttributeError)  # what DeferredText, not being a str, makes code raise

    def __init__(self, crossing: _Crossing) -> None:
        self.crossing = crossing
        self.convert_in, self.convert_out = crossing.convert_in, crossing.convert_out
        self.failed = False

    def __enter__(self) -> _Attempt:
        self._handed_out = self.crossing.trace.handed_out
        self._inside = self.crossing.inside()
        self._inside.__enter__()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> bool:
        self._inside.__exit__(kind, error, traceback)
        crossing = self.crossing
        # Only if DeferredText was handed out during this run: else the failure is the function's own.
        if crossing.runs_application and isinstance(error, self._AGAIN_ON) and \
                crossing.trace.handed_out != self._handed_out:
            crossing.trace.note(crossing.step, f"failed on values not known yet ({type(error).__name__}: {error}); "
                                               "it runs again on their values")
            self.failed = True
        return self.failed


def _crossing(runnable: Runnable, streamed: bool = False) -> _Crossing | None:
    """The conversions of a call of `runnable`'s entry point now (`streamed`: a stream's); None where there are none
    (outside a deferred run, or between code that holds values in the same form)."""
    trace = current_trace()
    if trace is None:
        return None
    caller, role = _SCOPE.get(), _role(runnable)
    if role == "application":
        if caller is not Scope.LANGCHAIN:
            return None
        step = runnable.get_name()
        returned = functools.partial(_langgraph_returned, trace, step) if _is_langgraph_callable(runnable) else \
            trace.lower
        return _Crossing(trace, step, Scope.APPLICATION, trace.lift, returned, runs_application=True)
    if caller is Scope.LANGCHAIN and role == "carries":
        return None
    step = runnable.get_name()
    convert_in = functools.partial(trace.resolve, step=step) if role == "reads" else trace.lower
    if caller is Scope.LANGCHAIN:
        return _Crossing(trace, step, None, convert_in, _same)
    return _Crossing(trace, step, Scope.LANGCHAIN, convert_in,
                     trace.lift if caller is Scope.APPLICATION else trace.resolve, immediate=streamed)


def _role(runnable: Runnable) -> Literal["application", "carries", "reads"]:
    """Whether the runnable runs a function of the application, is LangChain's code that passes text along, or
    anything else (which may read text)."""
    if isinstance(runnable, (RunnableLambda, RunnableGenerator)):
        return "application"
    if isinstance(runnable, RunnablePassthrough):
        return "application" if runnable.func is not None or runnable.afunc is not None else "carries"
    if _is_langgraph_callable(runnable):
        return "carries" if _langgraph_function(runnable.func or runnable.afunc) else "application"
    if getattr(runnable, "example_selector", None) is not None:  # a few-shot prompt picks examples by the input
        return "reads"
    # A binding (a chat model's `bind_tools`, `bind`: a class of langchain_core.language_models) passes its input to
    # the runnable it binds, whose own entry converts it.
    if isinstance(runnable, (ParrotParams, RunnableBinding)) or type(runnable).__module__.startswith(_CARRYING_MODULES):
        return "carries"
    return "reads"


def _langgraph_returned(trace: Trace, step: str, result: Any) -> Any:
    """What a LangGraph node or edge returns, as LangGraph gets it: the destinations it names (an edge's node names,
    a Command's `goto`) are read, so they are real text; the rest (state updates, `Send` inputs) stays deferred."""
    types = sys.modules["langgraph.types"]

    def destinations(names: Any) -> Any:
        if isinstance(names, str):  # DeferredText too
            return trace.resolve(names, step)
        if isinstance(names, types.Send) and type(names.node) is not str:
            send = copy.copy(names)
            send.node = trace.resolve(names.node, step)
            return send
        if isinstance(names, types.Command):
            return replace(names, goto=destinations(names.goto))
        if isinstance(names, (list, tuple)):
            return type(names)(destinations(name) for name in names)
        return names

    return trace.lower(destinations(result))


def _is_langgraph_callable(runnable: Runnable) -> bool:
    """A LangGraph node, edge or internal step (RunnableCallable), without importing LangGraph."""
    module = sys.modules.get("langgraph._internal._runnable")
    return module is not None and isinstance(runnable, module.RunnableCallable)


def _langgraph_function(function: Any) -> bool:
    """Whether `function` is LangGraph's own (a graph's internal step, a reducer such as `add_messages`) or a
    builtin operator (`operator.add`), rather than the application's."""
    while isinstance(function, functools.partial):
        function = function.func
    module = getattr(function, "__module__", None) or ""
    return module in ("_operator", "operator", "builtins") or module.startswith("langgraph.")


def _same(data: Any) -> Any:
    return data


@contextmanager
def _scoped(scope: Scope, step: str, immediate: bool = False) -> Iterator[None]:
    tokens = _enter(scope, step, immediate)
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def _enter(scope: Scope, step: str, immediate: bool) -> list[tuple[ContextVar, Token]]:
    """Sets the context's variables for code of `scope`; returns what resets them."""
    tokens: list[tuple[ContextVar, Token]] = [(_SCOPE, _SCOPE.set(scope)), (STEP, STEP.set(step))]
    if immediate:
        tokens.append((IMMEDIATE, IMMEDIATE.set(True)))
    return tokens


# ---- the wrappers ---------------------------------------------------------------------------------------------

Taker = Callable[[tuple, dict], "tuple[Any, tuple, dict] | None"]


def _call_entry(original: Callable[..., Any]) -> Callable[..., Any]:
    takes = _input_taker(original)

    @functools.wraps(original)
    def entry(self: Runnable, *args: Any, **kwargs: Any) -> Any:
        started = _start(self, takes, args, kwargs)
        if started is None:
            return original(self, *args, **kwargs)
        crossing, data, args, kwargs = started
        for attempt in crossing.attempts():
            with attempt:
                return attempt.convert_out(original(self, attempt.convert_in(data), *args, **kwargs))

    return entry


def _await_entry(original: Callable[..., Any]) -> Callable[..., Any]:
    takes = _input_taker(original)

    @functools.wraps(original)
    async def entry(self: Runnable, *args: Any, **kwargs: Any) -> Any:
        started = _start(self, takes, args, kwargs)
        if started is None:
            return await original(self, *args, **kwargs)
        crossing, data, args, kwargs = started
        for attempt in crossing.attempts():
            with attempt:
                return attempt.convert_out(await original(self, attempt.convert_in(data), *args, **kwargs))

    return entry


def _stream_entry(original: Callable[..., Any], chunks_of: Callable[..., Any],
                  steps: Callable[[_Crossing, Callable[[], Any]], Any]) -> Callable[..., Any]:
    """The wrapper of a stream's entry point, sync or async: `chunks_of` maps over an input stream (`transform`'s),
    `steps` runs the stream."""
    takes = _input_taker(original)
    lazy_input = original.__name__ in ("transform", "atransform")  # its input is a stream of chunks

    @functools.wraps(original)
    def entry(self: Runnable, *args: Any, **kwargs: Any) -> Any:
        started = _start(self, takes, args, kwargs, streamed=True)
        if started is None:
            return original(self, *args, **kwargs)
        crossing, data, args, kwargs = started
        data = chunks_of(crossing.convert_in, data) if lazy_input else crossing.convert_in(data)
        return steps(crossing, lambda: original(self, data, *args, **kwargs))

    return entry


def _start(runnable: Runnable, takes: Taker, args: tuple, kwargs: dict,
           streamed: bool = False) -> tuple[_Crossing, Any, tuple, dict] | None:
    """The crossing of an entry point's call, with the call's input taken out of its arguments; None if nothing
    converts. A stream of the application's function runs on real values from the start (it cannot run again)."""
    crossing = _crossing(runnable, streamed)
    taken = takes(args, kwargs) if crossing is not None else None
    if taken is None:
        return None
    if streamed and crossing.runs_application:
        crossing = crossing.eagerly()
    return (crossing, *taken)


def _steps(crossing: _Crossing, start: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """The chunks of a stream, each computed as the crossing's code (in a copy of this context that has its scope)
    and converted."""
    context = copy_context()
    if crossing.scope is not None:
        context.run(_enter, crossing.scope, crossing.step, crossing.immediate)
    chunks = context.run(lambda: iter(start()))
    try:
        yield from map(crossing.convert_out, iter(lambda: context.run(next, chunks, _END), _END))
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


_END = object()


async def _asteps(crossing: _Crossing, start: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """The chunks of an async stream, each computed as the crossing's code (in this task: the stream may hold what
    belongs to the task) and converted."""
    with crossing.inside():
        chunks = start().__aiter__()
    try:
        while True:
            with crossing.inside():
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            yield crossing.convert_out(chunk)
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


async def _amap(convert: Callable[[Any], Any], chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for chunk in chunks:
        yield convert(chunk)


def _input_taker(original: Callable[..., Any]) -> Callable[[tuple, dict], tuple[Any, tuple, dict] | None]:
    """Takes an entry point's input (its first parameter, given by position or by name) out of its arguments."""
    name = list(inspect.signature(original).parameters)[1]

    def take(args: tuple, kwargs: dict) -> tuple[Any, tuple, dict] | None:
        if args:
            return args[0], args[1:], kwargs
        if name in kwargs:
            rest = dict(kwargs)
            return rest.pop(name), args, rest
        return None  # the call is wrong: the original says how

    return take


def _reader(original: Callable[..., Any], reads: Callable[[Any], bool] = lambda owner: True) -> Callable[..., Any]:
    """A method that reads its arguments' text, where `reads(self)`."""
    def real(self: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        trace = current_trace()
        if trace is None or not reads(self):
            return args, kwargs
        return trace.resolve((args, kwargs), f"{type(self).__name__}.{original.__name__}")

    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def aread(self: Any, *args: Any, **kwargs: Any) -> Any:
            args, kwargs = real(self, args, kwargs)
            return await original(self, *args, **kwargs)

        return aread

    @functools.wraps(original)
    def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = real(self, args, kwargs)
        return original(self, *args, **kwargs)

    return read


def _constructor(original: Callable[..., Any]) -> Callable[..., Any]:
    """pydantic's `BaseModel.__init__`: a model that the application makes gets real text. (pydantic would take
    DeferredText, being iterable, for a list where a field may be one: a message's content would become a list of
    characters.)"""
    @functools.wraps(original)
    def __init__(self: BaseModel, /, **data: Any) -> None:
        trace = current_trace()
        if trace is not None and _SCOPE.get() is not Scope.LANGCHAIN:
            data = trace.resolve(data, f"{type(self).__name__}()")
        original(self, **data)

    return __init__


def _reducer(original: Callable[..., Any]) -> Callable[..., Any]:
    """A LangGraph channel's update: the application's reducer gets real text (the channel's value and the
    updates); `operator.add`, `add_messages` and the like only pass text along."""
    @functools.wraps(original)
    def update(self: Any, values: Any) -> Any:
        trace = current_trace()
        if trace is not None and not _langgraph_function(self.operator):
            step = f"the reducer {getattr(self.operator, '__name__', type(self.operator).__name__)}"
            self.value = trace.resolve(self.value, step)
            values = trace.resolve(values, step)
        return original(self, values)

    return update


def _formatter(original: Callable[..., str], template_format: str) -> Callable[..., str]:
    """A prompt template format's formatter (langchain_core's DEFAULT_FORMATTER_MAPPING), reading the values it
    formats, but for text that an f-string template of plain `{name}` fields only inserts (a list or a message is
    formatted by its repr, which would not keep a marker)."""
    @functools.wraps(original)
    def format_(template: str, /, *args: Any, **kwargs: Any) -> str:
        trace = current_trace()
        if trace is not None:
            step = f"a {template_format} prompt template"
            inserts = template_format == "f-string" and _inserts_only(template)
            args = trace.resolve(args, step)
            kwargs = {name: value if inserts and isinstance(value, str) else trace.resolve(value, step)
                      for name, value in kwargs.items()}
        return original(template, *args, **kwargs)

    return format_


@functools.lru_cache(maxsize=512)
def _inserts_only(template: str) -> bool:
    """Whether an f-string template inserts its variables as they are: plain `{name}` fields (or `!s`)."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:
        return False
    return all(name is None or (name.isidentifier() and not spec and conversion in (None, "s"))
               for _, name, spec, conversion in fields)


# ---- installing them while deferred runs are in progress --------------------------------------------------------

_lock = threading.Lock()
_runs = 0
_originals: list[tuple[Any, str, Any]] = []  # (class or mapping, name, original)


@contextmanager
def installed() -> Iterator[None]:
    """The wrappers in place for the block (one deferred run); the originals are back when the last run ends."""
    global _runs
    with _lock:
        if _runs == 0:
            _originals.extend(_install())
        _runs += 1
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0:
                for owner, name, original in reversed(_originals):
                    if isinstance(owner, dict):
                        owner[name] = original
                    else:
                        setattr(owner, name, original)
                _originals.clear()


def _install() -> list[tuple[Any, str, Any]]:
    done: list[tuple[Any, str, Any]] = []

    def wrap(owner: type, names: tuple[str, ...], wrapper: Callable[[Callable[..., Any]], Callable[..., Any]],
             subclasses: bool = True) -> None:
        for cls in _subclasses(owner) if subclasses else [owner]:
            for name in names:
                original = cls.__dict__.get(name)
                if isinstance(original, FunctionType) and not getattr(original, "__isabstractmethod__", False):
                    setattr(cls, name, wrapper(original))
                    done.append((cls, name, original))

    wrap(Runnable, _CALLS, _call_entry)
    wrap(Runnable, _AWAITS, _await_entry)
    wrap(Runnable, _ITERATES, lambda original: _stream_entry(original, map, _steps))
    wrap(Runnable, _AITERATES, lambda original: _stream_entry(original, _amap, _asteps))
    wrap(BaseLLMOutputParser, ("parse_result", "aparse_result"),
         lambda original: _reader(original, lambda parser: not isinstance(parser, StrOutputParser)))
    wrap(BaseChatMessageHistory, ("add_message", "add_messages", "aadd_messages"), _reader)
    wrap(BaseModel, ("__init__",), _constructor, subclasses=False)  # the others' call it (messages' do)
    for module, name, methods in _READERS:
        if module in sys.modules:
            wrap(getattr(sys.modules[module], name), methods, _reader)
    if "langgraph.channels.binop" in sys.modules:
        wrap(sys.modules["langgraph.channels.binop"].BinaryOperatorAggregate, ("update",), _reducer)
    mapping = prompt_strings.DEFAULT_FORMATTER_MAPPING
    for template_format, original in list(mapping.items()):
        mapping[template_format] = _formatter(original, template_format)
        done.append((mapping, template_format, original))
    return done


def _subclasses(cls: type) -> list[type]:
    found, stack = {cls}, [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return list(found)
