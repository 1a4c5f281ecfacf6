"""The two forms of a deferred run's values that are not known yet.

- *Marked text*, inside LangChain's own code: a plain `str` holding a marker for each unknown value (an invisible
  separator around the run's tag and the index of the LLM call that produces it). Prompt templates, joins, message
  and document fields carry it like any text, so that a later call's prompt shows where another call's output
  stands.
- `DeferredText`, in the application's code: not a str, so that no read of it can go unnoticed. Whatever Python
  lets an object answer (str(), f-strings, `len`, `in`, `==`, iteration, indexing, `+`, any str method) fetches the
  values and answers as the text would; what needs a real str (`"".join`, `re`, `json.loads`) raises TypeError.

`convert` walks the data that crosses between the two (lists, tuples, dicts, sets, pydantic models such as messages
and documents, dataclasses, LangGraph's `Send`) and rebuilds only what changes.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel

MARK = "\u2063"  # INVISIBLE SEPARATOR: a marker is MARK + tag + "." + index + MARK

Part = str | int
"""A piece of text, or the index of the LLM call whose output stands there."""


class ValueSource(Protocol):
    """Where DeferredText gets the values it stands for (the run's trace)."""

    def value(self, index: int) -> str: ...

    def marker(self, index: int) -> str: ...


class DeferredText:
    """Text holding outputs of LLM calls of a deferred run that the application has not read yet. Reading it
    fetches them (the calls recorded so far are submitted first, and the run goes on), and answers as the text
    would; `isinstance(x, str)` is true, so that code that checks it takes the text's path."""

    __slots__ = ("_source", "_parts", "_text")

    def __init__(self, source: ValueSource, parts: tuple[Part, ...]) -> None:
        self._source = source
        self._parts = parts
        self._text: str | None = None

    @property
    def __class__(self) -> type:  # noqa: D105 - isinstance(text, str), as the real text would be
        return str

    def text(self) -> str:
        """The real text (fetching the values it holds)."""
        if self._text is None:
            self._text = "".join(p if isinstance(p, str) else self._source.value(p) for p in self._parts)
        return self._text

    def marked(self) -> str:
        """The real text if read already, else the marked text (what LangChain's code carries)."""
        if self._text is not None:
            return self._text
        return "".join(p if isinstance(p, str) else self._source.marker(p) for p in self._parts)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return repr(self.text())

    def __format__(self, spec: str) -> str:
        return format(self.text(), spec)

    def __len__(self) -> int:
        return len(self.text())

    def __iter__(self):
        return iter(self.text())

    def __getitem__(self, key: Any) -> str:
        return self.text()[key]

    def __contains__(self, item: Any) -> bool:
        return _real(item) in self.text()

    def __eq__(self, other: object) -> bool:
        return self.text() == _real(other)

    def __ne__(self, other: object) -> bool:
        return self.text() != _real(other)

    def __lt__(self, other: Any) -> bool:
        return self.text() < _real(other)

    def __le__(self, other: Any) -> bool:
        return self.text() <= _real(other)

    def __gt__(self, other: Any) -> bool:
        return self.text() > _real(other)

    def __ge__(self, other: Any) -> bool:
        return self.text() >= _real(other)

    def __hash__(self) -> int:
        return hash(self.text())

    def __add__(self, other: Any) -> str:
        return self.text() + _real(other)

    def __radd__(self, other: Any) -> str:
        return _real(other) + self.text()

    def __mul__(self, count: Any) -> str:
        return self.text() * count

    __rmul__ = __mul__

    def __mod__(self, values: Any) -> str:
        return self.text() % values

    def __int__(self) -> int:
        return int(self.text())

    def __float__(self) -> float:
        return float(self.text())

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return str, (self.text(),)  # pickled (and so copied across processes) as its text

    def __copy__(self) -> DeferredText:
        return self

    def __deepcopy__(self, memo: dict) -> DeferredText:
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or not hasattr(str, name):  # what the text would not have either: no need to wait
            raise AttributeError(f"'str' object has no attribute {name!r}")
        return getattr(self.text(), name)


def _real(value: Any) -> Any:
    return value.text() if type(value) is DeferredText else value


def convert(data: Any, change: Callable[[str | DeferredText], Any]) -> Any:
    """`data` with `change` applied to every DeferredText and every str that holds a marker in it; containers and
    models are rebuilt only where something changed (else the same object comes back)."""
    kind = type(data)
    if kind is DeferredText:
        return change(data)
    if isinstance(data, str):
        return change(data) if MARK in data else data
    if kind in (int, float, bool) or data is None:
        return data
    if isinstance(data, dict):
        items = [(convert(k, change), convert(v, change)) for k, v in data.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, data.items())):
            return data
        if kind is dict:
            return dict(items)
        rebuilt = copy.copy(data)
        rebuilt.clear()
        rebuilt.update(items)
        return rebuilt
    if isinstance(data, (list, tuple, set, frozenset)):
        items = [convert(item, change) for item in data]
        if all(new is old for new, old in zip(items, data)):
            return data
        if hasattr(data, "_fields"):  # a named tuple
            return kind(*items)
        return kind(items)
    if isinstance(data, BaseModel):
        changed = {name: new for name in type(data).model_fields
                   if (new := convert(old := getattr(data, name, None), change)) is not old}
        return data.model_copy(update=changed) if changed else data
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changed = {field.name: new for field in dataclasses.fields(data)
                   if (new := convert(old := getattr(data, field.name), change)) is not old}
        return _with_attributes(data, changed)
    if _is_send(data):
        arg = convert(data.arg, change)
        return data if arg is data.arg else _with_attributes(data, {"arg": arg})
    return data


def _with_attributes(data: Any, changed: dict[str, Any]) -> Any:
    if not changed:
        return data
    rebuilt = copy.copy(data)
    for name, value in changed.items():
        object.__setattr__(rebuilt, name, value)  # frozen dataclasses too
    return rebuilt


def _is_send(data: Any) -> bool:
    """A LangGraph `Send` (a task's input), without importing LangGraph for applications that do not use it."""
    types = sys.modules.get("langgraph.types")
    return types is not None and isinstance(data, types.Send)
