"""The trace of one deferred run: the LLM calls recorded, their submission as graphs, and the values read.

ParrotLLM and ChatParrot record a call instead of making it while a trace is current (`current_trace`, a context
variable: threads and tasks that LangChain and LangGraph start for the run inherit it, other code does not see it)
and return marked text for its output. The calls recorded since the last submission are submitted together, as
one graph, when a value is first needed (the run waits for it, and goes on) or when the run ends.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langchain_core.caches import BaseCache
from langchain_core.exceptions import OutputParserException
from langchain_core.globals import get_llm_cache

from parrot_lc.frontend import MessageDict, ParrotClient, ParrotError, SemanticVariable, Session
from parrot_lc.integrations.langchain._chat_layout import ChatLayout, chat_layout
from parrot_lc.integrations.langchain._graph import (
    Prompt,
    add_call,
    leading_text,
    refused_as_requests,
    shared_prefix_lengths,
)
from parrot_lc.integrations.langchain._markers import MARK, DeferredText, Part, convert

if TYPE_CHECKING:
    from parrot_lc.integrations.langchain._base import ParrotParams

log = logging.getLogger("parrot_lc.deferred")

_TRACE: ContextVar[Trace | None] = ContextVar("parrot_lc_trace", default=None)
STEP: ContextVar[str] = ContextVar("parrot_lc_step", default="the chain")
"""The application's step running now (a RunnableLambda, a LangGraph node), named where a read makes it wait."""
IMMEDIATE: ContextVar[bool] = ContextVar("parrot_lc_immediate", default=False)
"""Whether LLM calls made now run at once: those of a stream that the application reads chunk by chunk."""


def current_trace() -> Trace | None:
    """The trace of the deferred run in progress in this context, if any."""
    return _TRACE.get()


@dataclass
class DeferredRun:
    """What a deferred run sent and waited for."""

    graph: list[dict[str, Any]] = field(default_factory=list)
    """Its calls as the server saw them: inputs, outputs, state, latency-critical, task group."""
    submissions: int = 0
    """Graphs submitted: the calls recorded before each wait for a value, and those recorded after the last."""
    waits: list[str] = field(default_factory=list)
    """The steps that read a value before the end of the run (each once, in order), and why steps ran eagerly."""


@dataclass
class _Call:
    parts: tuple[Part, ...]
    sampling: dict[str, Any]
    output: SemanticVariable


CALL_ERRORS = (ParrotError, OutputParserException)
"""What reading a call's value raises where its eager call would have raised: the server's refusal or failure, and
a cut structured reply (`Trace.record`'s `on_cut`)."""


@dataclass(frozen=True)
class _Output:
    """The output of a call recorded; `field`: the request field that an eager call's refusal of its prompt names;
    `on_cut`: the error that an eager call raises when `max_tokens` cuts its reply (from the cut text), if any."""

    variable: SemanticVariable
    field: str
    on_cut: Callable[[str], OutputParserException] | None = None


@dataclass(frozen=True)
class _FinishReason:
    """The finish reason of the call whose output has index `output`: known once that output is fetched."""

    output: int


class Trace:
    """The calls of one deferred run, in a frontend session on the server of the first model that records one."""

    def __init__(self) -> None:
        self.run = DeferredRun()
        self._tag = secrets.token_hex(4)
        self._marker = re.compile(f"{MARK}{self._tag}\\.(\\d+){MARK}")
        self._lock = threading.RLock()
        self._client: ParrotClient | None = None
        self._session: Session | None = None
        self._outputs: list[_Output | _FinishReason] = []  # what each index of a marker stands for
        self._finish_reasons: dict[int, int] = {}  # the index of an output's finish reason, by the output's
        self._pending: list[_Call] = []
        self._sent_heads: list[str] = []  # leading texts of the calls submitted, which later calls may share
        self._greedy: dict[tuple[Any, ...], int] = {}  # a greedy call repeated is the same call
        self._values: dict[int, str] = {}
        self._layouts: dict[tuple[Any, ...], ChatLayout | None] = {}
        self._ending = False
        self.handed_out = 0
        """DeferredTexts made so far: a step that fails after receiving some is run again on real values."""

    # ---- the run's context ------------------------------------------------------------------------------

    def __enter__(self) -> Trace:
        self._token = _TRACE.set(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Deletes the session (cancelling what still runs, after a failure)."""
        _TRACE.reset(self._token)
        if self._session is not None:
            self._session.close()

    def finish(self, output: Any, each: bool = False) -> Any:
        """The run's output with its real values. Every call's value is fetched (an error of any call is raised, as
        an eager run raises it), so that DeferredText the application kept can still be read after the run.
        `each`: the output is a batch's list, run with return_exceptions: an item whose values failed becomes the
        error, and no call's error is raised."""
        self._ending = True
        self.submit()
        if each:
            result = [self._resolved_or_error(item) for item in output]
        else:
            result = self.resolve(output)
        for index in range(len(self._outputs)):
            try:
                self.value(index)
            except CALL_ERRORS:
                if not each:
                    raise
        if self._session is not None and self._session.session_id is not None:
            # only a session that was opened has a graph: asking another's status would open it, on the server of a
            # model that may have made no call (one down, whose calls a fallback made at once)
            self.run.graph = self._session.status()["graph"]
        return result

    def _resolved_or_error(self, item: Any) -> Any:
        try:
            return self.resolve(item)
        except CALL_ERRORS as exc:
            return exc

    # ---- recording ----------------------------------------------------------------------------------------

    def can_record(self, model: ParrotParams, kwargs: dict[str, Any]) -> bool:
        """Whether a call of `model` (with the call's keyword arguments) can join the graph: no stream that the
        application reads is in progress (it gets the tokens as they come), the call names no model of its own
        (a graph call runs on the served one), no LLM cache is in play (it would keep marked text as the model's
        answer), and the model's requests reach the server of the run's session as its first model's do (the same
        headers, API key and query: the graph's calls are sent with the first's)."""
        if IMMEDIATE.get():
            return False
        name = type(model).__name__
        if kwargs.get("model"):
            self.note(name, "names a model in a call: the call runs at once, on real text")
            return False
        if isinstance(model.cache, BaseCache) or (model.cache is not False and get_llm_cache() is not None):
            self.note(name, "has an LLM cache: its calls run at once, on real text")
            return False
        client = model.parrot_client()
        with self._lock:
            if self._client is None:
                # the first model's timeout: how long the run may go without a value arriving
                self._client, self._session = client, client.session(idle_timeout=model.timeout)
            if self._client.sends_as(client):
                return True
            other_server = self._client.base_url != client.base_url
        if other_server:
            self.note(name, f"at {client.base_url} is not on the run's server: its calls run at once, on real text")
        else:
            self.note(name, "sends other headers, API key or query parameters than the run's first model: its calls "
                            "run at once, on real text")
        return False

    def record(self, prompts: list[str], sampling: dict[str, Any], field: str = "prompt",
               on_cut: Callable[[str], OutputParserException] | None = None) -> list[str]:
        """Records one call per prompt (marked text: other calls' outputs stand where their markers are); returns
        their outputs as marked text. `field`: the request field that an eager call's refusal of its prompt names
        (a prompt longer than the model's context raises InvalidRequestError naming it, see `refused_as_requests`).
        `on_cut`: the error that the eager call raises where `max_tokens` cuts its reply (a structured reply's),
        raised by every read of the output that ends so, and by the run's end."""
        prompts_parts = [self._reasons_read(self.parts(prompt)) for prompt in prompts]  # may wait: not in the lock
        with self._lock:
            assert self._session is not None, "can_record() opened it"
            greedy = sampling.get("temperature") == 0
            markers = []
            for parts in prompts_parts:
                key = (parts, tuple(sorted((k, str(v)) for k, v in sampling.items())), on_cut is not None)
                index = self._greedy.get(key) if greedy else None
                if index is None:
                    index = len(self._outputs)
                    variable = self._session.variable("text")
                    self._outputs.append(_Output(variable, field, on_cut))
                    self._pending.append(_Call(parts, sampling, variable))
                    if greedy:
                        self._greedy[key] = index
                markers.append(self.marker(index))
            return markers

    def finish_reason(self, output: str) -> str:
        """Marked text that stands for the finish reason of the call whose output is `output` (as `record` returned
        it): a value not known yet, as the output is, known once the output is fetched."""
        [index] = self.parts(output)
        with self._lock:
            reason = self._finish_reasons.get(index)
            if reason is None:
                reason = self._finish_reasons[index] = len(self._outputs)
                self._outputs.append(_FinishReason(index))
        return self.marker(reason)

    def _reasons_read(self, parts: tuple[Part, ...]) -> tuple[Part, ...]:
        """A prompt's parts with the finish reasons in them read (waiting for them): a call's prompt holds text and
        other calls' outputs only."""
        if not any(self._is_finish_reason(p) for p in parts):
            return parts
        return self.parts("".join(p if isinstance(p, str) else self.value(p) if self._is_finish_reason(p)
                                  else self.marker(p) for p in parts))

    def _is_finish_reason(self, part: Part) -> bool:
        return isinstance(part, int) and isinstance(self._outputs[part], _FinishReason)

    def chat_prompt(self, model: ParrotParams, messages: list[MessageDict]) -> str | None:
        """The prompt of a chat (marked text) as the model's chat template renders it; None if its template does not
        insert contents as they are (see `_chat_layout`)."""
        key = (model._requested_model(), tuple(m["role"] for m in messages))
        with self._lock:  # the calls of a fan-out wait for the one that asks the server
            if key not in self._layouts:
                self._layouts[key] = chat_layout(model.parrot_client(), key[0], key[1])
            layout = self._layouts[key]
        if layout is None:
            self.note(type(model).__name__, f"runs chats of roles {', '.join(key[1])} at once, on real text: the "
                                            "model's chat template does not insert message contents as they are")
            return None
        return layout.render([m["content"] for m in messages])

    def submit(self) -> None:
        """Sends the calls recorded and not yet sent, as one graph."""
        with self._lock:
            if not self._pending:
                return
            calls, self._pending = self._pending, []
            prompts = [self._prompt(call.parts) for call in calls]
            heads = [leading_text(prompt) for prompt in prompts]
            assert self._session is not None
            with self._session.graph():
                for call, prompt, shared in zip(calls, prompts, shared_prefix_lengths(heads, self._sent_heads)):
                    add_call(self._session, prompt, shared, call.sampling, call.output)
            self._sent_heads += heads
            self.run.submissions += 1

    def _prompt(self, parts: tuple[Part, ...]) -> Prompt:
        return [p if isinstance(p, str) else self._outputs[p].variable for p in parts]

    # ---- markers ------------------------------------------------------------------------------------------

    def marker(self, index: int) -> str:
        return f"{MARK}{self._tag}.{index}{MARK}"

    def parts(self, text: str) -> tuple[Part, ...]:
        """Marked text as text and the indices of the calls whose outputs stand in it."""
        parts: list[Part] = []
        position = 0
        for match in self._marker.finditer(text):
            parts += [text[position:match.start()], int(match.group(1))]
            position = match.end()
        parts.append(text[position:])
        return tuple(p for p in parts if p != "")

    # ---- values -------------------------------------------------------------------------------------------

    def value(self, index: int) -> str:
        """The output of call `index` (or its finish reason), waiting for it (the calls recorded so far are submitted
        first) as long as the run's values keep arriving: IdleTimeoutError once none of them arrived for the first
        model's `timeout`. A call whose prompt is longer than the model's context raises InvalidRequestError, as its
        eager request does, and one recorded with `on_cut` whose reply `max_tokens` cut raises that error."""
        text = self._fetched(index)
        source = self._outputs[index]
        if isinstance(source, _Output) and source.on_cut is not None and source.variable.finish_reason == "length":
            raise source.on_cut(text)
        return text

    def _fetched(self, index: int) -> str:
        """The value of `index` as the server gave it."""
        with self._lock:
            if index in self._values:
                return self._values[index]
            self.submit()
            if not self._ending:
                self.note(STEP.get(), "reads a value: it waits for it, and the run goes on")
            assert self._session is not None, "can_record() opened it"
            source = self._outputs[index]
        if isinstance(source, _FinishReason):
            self._fetched(source.output)  # the output's fetch tells how it ended
            output = self._outputs[source.output]
            assert isinstance(output, _Output)
            text = output.variable.finish_reason or ""
        else:
            with refused_as_requests(source.field):
                [text] = self._session.get_values([source.variable], idle_timeout=self._session.idle_timeout)
        with self._lock:
            self._values[index] = text
        return text

    def resolve(self, data: Any, step: str | None = None) -> Any:
        """`data` with real text for marked text and DeferredText in it (waiting for the values); `step` names what
        reads them, if not the step running."""
        token = STEP.set(step) if step is not None else None
        try:
            return convert(data, lambda text: text.text() if type(text) is DeferredText else "".join(
                p if isinstance(p, str) else self.value(p) for p in self.parts(text)))
        finally:
            if token is not None:
                STEP.reset(token)

    def lift(self, data: Any) -> Any:
        """`data` as the application gets it: marked text becomes DeferredText (real text where every value in it is
        known already)."""
        def change(text: str | DeferredText) -> Any:
            if type(text) is DeferredText:
                return text
            parts = self.parts(text)
            with self._lock:
                if all(isinstance(p, str) or p in self._values for p in parts):
                    return "".join(p if isinstance(p, str) else self._values[p] for p in parts)
                self.handed_out += 1
            return DeferredText(self, parts)

        return convert(data, change)

    def lower(self, data: Any) -> Any:
        """`data` as LangChain's code gets it: DeferredText becomes marked text (or its text, if read)."""
        return convert(data, lambda text: text.marked() if type(text) is DeferredText else text)

    def note(self, step: str, what: str) -> None:
        """Notes that a step waits or runs eagerly: logged at INFO the first time in the run, then at DEBUG."""
        entry = f"{step} {what}"
        with self._lock:
            if entry in self.run.waits:
                return
            first = not self.run.waits
            self.run.waits.append(entry)
        log.log(logging.INFO if first else logging.DEBUG, "deferred run: %s", entry)
