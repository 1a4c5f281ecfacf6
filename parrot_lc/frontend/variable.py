"""Semantic Variables as the client sees them: handles to text values that live on the server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from parrot_lc.frontend.errors import ParrotError

if TYPE_CHECKING:
    from parrot_lc.frontend.session import BaseSession, GraphCall

Criterion = Literal["latency", "throughput"]
CRITERIA = ("latency", "throughput")


class SemanticVariable:
    """A named text value of a session: set by the client or produced by a call, fetched with `get()`.

    It is created on the server when first needed (when set, fetched, or used by a submitted call), so that
    building a graph costs no round trip per variable until the graph is submitted.
    """

    def __init__(self, session: BaseSession, name: str = "", value: str | None = None) -> None:
        self.session = session
        self.name = name
        self._var_id: str | None = None
        self._value = value
        self._producer: GraphCall | None = None
        self._error: ParrotError | None = None  # the submission of the producing call failed
        self._generated: dict[str, Any] = {}  # how its call generated it, as its fetch told

    @property
    def var_id(self) -> str | None:
        """The server's id; None until the variable exists on the server."""
        return self._var_id

    @property
    def value(self) -> str | None:
        """The value if this client knows it (it set or fetched it), without asking the server."""
        return self._value

    @property
    def finish_reason(self) -> str | None:
        """Once fetched, why its call's generation of it ended, as an OpenAI choice's: `"stop"` (the end of the text,
        a stop string or token) or `"length"` (`max_tokens`, or the end of the model's context); None for a value
        set by a client, or not fetched yet."""
        return self._generated.get("finish_reason")

    @property
    def stop_reason(self) -> str | int | None:
        """Once fetched, the stop string or stop token id that ended it (vLLM's `stop_reason`), if one did."""
        return self._generated.get("stop_reason")

    @property
    def usage(self) -> dict[str, int] | None:
        """Once fetched, its tokens as a completion's usage counts them: `prompt_tokens` (the call's context before
        it: its prompt, for its first output), `completion_tokens` (its own), `total_tokens`, and `cached_tokens`
        (of the prompt tokens, those whose KV the call did not compute); None for a value set by a client."""
        return self._generated.get("usage")

    def set(self, value: str) -> None:
        """Gives the variable its value (once; a variable that a call produces cannot be set)."""
        self.session._set_value(self, _text(value))

    async def aset(self, value: str) -> None:
        """`set()` for async code."""
        await self.session._aset_value(self, _text(value))

    def get(self, criterion: Criterion = "latency", timeout: float | None = None) -> str:
        """The value, waiting for it to be produced. `criterion` tells the server what the wait is for:
        `latency` (run its producers as fast as possible) or `throughput` (a batch job: group them).
        Raises CallFailedError if the producing call failed, VariableTimeoutError after `timeout` seconds."""
        return self.session._get_value(self, check_criterion(criterion), timeout)

    async def aget(self, criterion: Criterion = "latency", timeout: float | None = None) -> str:
        """`get()` for async code."""
        return await self.session._aget_value(self, check_criterion(criterion), timeout)

    def __repr__(self) -> str:
        return f"SemanticVariable(name={self.name!r}, var_id={self._var_id!r})"


def check_criterion(criterion: str) -> str:
    """`criterion` if it is one of CRITERIA, else ValueError."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, not {criterion!r}")
    return criterion


def _text(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a variable's value is a str, not {type(value).__name__}")
    return value
