"""Server-sent events of the OpenAI-compatible API's streams: `data: {...}` lines of JSON, ended by `data: [DONE]`.

A stream that ends without `[DONE]` was cut off (the server or the connection went away mid-answer): it raises
ParrotConnectionError, so that a cut answer is never taken for a whole one.
"""

from __future__ import annotations

import json
from typing import Any

from parrot_lc.frontend.errors import ParrotConnectionError


class EventParser:
    """Reads the lines of one stream, as the sync or the async client receives them."""

    def __init__(self) -> None:
        self.done = False

    def feed(self, line: str) -> list[dict[str, Any]]:
        """The events of a line: that of a `data: {...}` line, none of other lines; `data: [DONE]` sets `done`."""
        if not line.startswith("data:"):
            return []
        data = line[len("data:"):].strip()
        self.done = data == "[DONE]"
        return [] if self.done else [json.loads(data)]

    def end(self) -> None:
        """At the end of the stream: raises if it was cut off before `[DONE]`."""
        if not self.done:
            raise ParrotConnectionError("the server's event stream ended before `data: [DONE]`")

