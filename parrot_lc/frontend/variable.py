"""Semantic Variables as the client sees them: handles to text values that live on the server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

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

    @property
    def var_id(self) -> str | None:
        """The server's id; None until the variable exists on the server."""
        return self._var_id

    @property
    def value(self) -> str | None:
        """The value if this client knows it (it set or fetched it), without asking the server."""
        return self._value

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
