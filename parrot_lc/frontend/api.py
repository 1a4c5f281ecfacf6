"""The Parrot server's HTTP API as the frontend speaks it: each operation is written once, as request steps that
a sync driver (ParrotClient) or an async one (AsyncParrotClient) runs."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


@dataclass(frozen=True)
class ApiRequest:
    """One HTTP request to the server, as data; `timeout` None means the client's default."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: httpx.Timeout | None = None


# Yields batches of requests, receives the JSON bodies of each batch (in order), returns the result.
Steps = Generator[list[ApiRequest], list[Any], T]
