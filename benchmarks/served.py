"""A `parrot-lc serve` process for the benchmarks: the server in a process of its own, as a deployment runs it,
so that the benchmark's client (hundreds of streams parsed in Python) does not share its interpreter's lock.
Its engine counters are read from /metrics, as a scraper reads them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """`parrot-lc serve` with the given flags on a free loopback port; started on entering a `with` block (once
    /health answers) and stopped with SIGTERM (it drains, and a profiled run writes its stats) on leaving it."""

    def __init__(self, *flags: str, profile: Path | None = None, start_timeout: float = 900) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
        self.command = [sys.executable, *profiler, "-m", "parrot_lc.cli", "serve", *flags, "--port", str(self.port)]
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ServeProcess:
        # Its log goes to a file: a pipe that nobody reads would stop the server once the pipe's buffer is full.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.base_url}/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.log.seek(0)
        said = self.log.read()[-3000:]
        self.__exit__()
        raise RuntimeError(f"the server did not start: {said}")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.returncode not in (0, -signal.SIGTERM):  # it died or hung: its log says why
            self.log.seek(0)
            print(self.log.read()[-3000:], file=sys.stderr)
        self.log.close()

    def model(self) -> str:
        """The model name the server's OpenAI-compatible endpoints take."""
        return httpx.get(f"{self.base_url}/v1/models").json()["data"][0]["id"]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds of the whole process, of its main thread), user and system time together."""
    def read(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)

    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


def metrics(client: httpx.Client) -> dict[str, float]:
    """The server's /metrics samples by name, summed over their labels (engines)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


class EngineCounters:
    """Tokens prefilled, reused and generated and engine steps run while a `with` block runs, and the largest
    engine step seen (requests in one step, sampled from /metrics every `interval` seconds)."""

    def __init__(self, base_url: str, interval: float = 0.05) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=60)
        self.interval = interval
        self.max_running = 0
        self._stop = threading.Event()

    def __enter__(self) -> EngineCounters:
        self.before = metrics(self.client)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.max_running = max(self.max_running, int(metrics(self.client)["parrot_engine_running_requests"]))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        after = metrics(self.client)
        self.client.close()
        self.counts = {name: int(after[f"parrot_{name}_total"] - self.before[f"parrot_{name}_total"])
                       for name in ("prefill_tokens", "prefix_reused_tokens", "prefix_cached_tokens", "decode_tokens",
                                    "engine_steps")}

    def figures(self) -> dict[str, int]:
        return {"prefill_tokens": self.counts["prefill_tokens"], "reused_tokens": self.counts["prefix_reused_tokens"],
                "cached_tokens": self.counts["prefix_cached_tokens"],
                "decode_tokens": self.counts["decode_tokens"], "engine_steps": self.counts["engine_steps"],
                "max_running": self.max_running}
