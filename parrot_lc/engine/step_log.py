"""A timeline of the engine's steps (`EngineSettings.step_log`): one JSON line a step, to see where an engine's
time goes under a real load (how many steps, what each computed, how long each took on the host)."""

from __future__ import annotations

import json
import time
from pathlib import Path


class StepLog:
    """Appends one JSON object a step: `t` (the step's start, in seconds since the epoch: a client's own clock
    lines its requests up with the steps), `ms` (the step's wall time on the host; with overlapped steps it
    includes waiting for the step before, so in a steady stream it is the device's step time), and the step's own
    figures (tokens prefilled and decoded, events, requests)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # a line at a time: a killed engine loses none
        # The epoch at perf_counter's zero: steps are timed with perf_counter and placed on the wall clock.
        self._epoch = time.time() - time.perf_counter()

    def write(self, started: float, ended: float, **figures: int) -> None:
        record = {"t": round(self._epoch + started, 6), "ms": round((ended - started) * 1e3, 3), **figures}
        self._file.write(json.dumps(record) + "\n")
