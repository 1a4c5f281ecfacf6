"""Prometheus counters of a real server (loopback) that only ever rise: the engines' token and step counters when a
remote engine is dropped, replaced or registers again, and calls that end because their client went away counted
apart from failed ones."""

import socket
import threading
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from parrot_lc.engine import LLMEngine
from parrot_lc.engine.async_engine import AsyncEngine
from parrot_lc.server.engine_service import LinkedServer, ManagerLink, create_engine_app
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineProcessSettings, EngineSettings, ServerSettings

ENGINE_KEY = "engine-key-for-counters-0123"
TINY = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
# The exported counter (without `_total`) and the field of EngineStats it sums.
ENGINE_COUNTERS = {"parrot_prefill_tokens": "prefill_tokens", "parrot_prefix_reused_tokens": "reused_tokens",
                   "parrot_prefix_cached_tokens": "cached_tokens", "parrot_decode_tokens": "decode_tokens",
                   "parrot_engine_steps": "num_steps"}
ENGINE_TIMEOUT = 1.0


def metrics(base_url: str) -> dict[str, dict[tuple, float]]:
    """Each family of /metrics: {its samples' labels (sorted items): value}, counters' `_total` samples only."""
    families = text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
    return {family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples
                          if family.type != "counter" or s.name.endswith("_total")}
            for family in families}


def engine_totals(base_url: str) -> dict[str, float]:
    scraped = metrics(base_url)
    return {name: scraped[name][()] for name in ENGINE_COUNTERS}


def counters_of(*engines: AsyncEngine) -> dict[str, float]:
    """What the exported counters are when they sum exactly these engines' own counters."""
    return {name: float(sum(getattr(e.stats(), field) for e in engines)) for name, field in ENGINE_COUNTERS.items()}


class EngineProcess:
    """What `parrot-lc engine` runs, in this process: a tiny engine's HTTP face on `port` (0: any) and its link
    to the manager (registration, then a heartbeat with its counters every 0.1 s). `kill()` stops both at once,
    as SIGKILL does; `pause_heartbeats()` stops only the link (a process hung or cut off), `resume_heartbeats()`
    starts a new one (which registers again, as the link does when the manager forgot it)."""

    def __init__(self, manager_url: str, port: int = 0) -> None:
        self.engine = AsyncEngine(LLMEngine(TINY))
        self.socket = socket.create_server(("127.0.0.1", port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = EngineProcessSettings(manager=manager_url, port=self.port, engine_key=ENGINE_KEY,
                                              heartbeat_interval=0.1)
        self.link = ManagerLink(self.engine, self.settings, self.url)
        self.server = LinkedServer(uvicorn.Config(create_engine_app(self.engine, ENGINE_KEY), log_level="warning"),
                                   self.link)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.link.name_at_manager is not None, 60, "the engine to register")

    def pause_heartbeats(self) -> None:
        self.link.stopped.set()
        self.link.join(timeout=10)

    def resume_heartbeats(self) -> None:
        self.link = ManagerLink(self.engine, self.settings, self.url)
        self.link.start()
        wait_until(lambda: self.link.name_at_manager is not None, 30, "the engine to register again")

    def kill(self) -> None:
        self.pause_heartbeats()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
        self.engine.close()


@pytest.fixture
def remote_only():
    """A server without local engines that takes remote ones with ENGINE_KEY and drops one silent for 1 s."""
    settings = ServerSettings(port=0, engines=0, engine_key=ENGINE_KEY, engine_timeout=ENGINE_TIMEOUT)
    with LocalServer(TINY, settings) as server:
        yield server


def run_work(base_url: str, count: int = 3) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for i in range(count):
            reply = client.post("/v1/completions", json={"model": "tiny", "prompt": f"Work item {i} for the engine:",
                                                         "max_tokens": 6, "ignore_eos": True, "temperature": 0})
            assert reply.status_code == 200, reply.text


def wait_for_totals(base_url: str, expected: dict[str, float], what: str) -> None:
    """Until a heartbeat has brought the engines' counters in."""
    wait_until(lambda: engine_totals(base_url) == expected, 10, what)


def wait_for_engines(server: LocalServer, count: int, what: str) -> None:
    wait_until(lambda: len(server.manager.engines) == count, 10 * ENGINE_TIMEOUT, what)


# ---- the engines' counters -----------------------------------------------------------------------------------


def test_engine_counters_keep_a_killed_engines_totals_after_it_is_dropped(remote_only):
    """Before: the sums were over the engines the server holds now, so they fell (56 -> 38 prefill tokens in a
    trial) when a killed engine was dropped, and Prometheus read that as a counter reset."""
    engine = EngineProcess(remote_only.base_url)
    try:
        run_work(remote_only.base_url)
        before = counters_of(engine.engine)
        assert before["parrot_decode_tokens"] > 0
        wait_for_totals(remote_only.base_url, before, "a heartbeat with the engine's counters")
    finally:
        engine.kill()
    wait_for_engines(remote_only, 0, "the killed engine to be dropped")
    assert engine_totals(remote_only.base_url) == before


def test_engine_counters_add_an_engine_restarted_at_the_same_url_to_its_earlier_totals(remote_only):
    """A restarted engine process registers at its old URL with counters from 0: its old slot is replaced, and
    what the old process counted stays in the sums, to which the new one's counts are added."""
    first = EngineProcess(remote_only.base_url)
    run_work(remote_only.base_url)
    earlier = counters_of(first.engine)
    wait_for_totals(remote_only.base_url, earlier, "a heartbeat with the first process's counters")
    first.kill()
    restarted = EngineProcess(remote_only.base_url, port=first.port)  # before the first is dropped for silence
    try:
        assert len(remote_only.manager.engines) == 1  # the registration replaced the first process's slot
        assert all(engine_totals(remote_only.base_url)[name] >= value for name, value in earlier.items())
        run_work(remote_only.base_url, count=2)
        now = counters_of(restarted.engine)
        assert now["parrot_decode_tokens"] > 0
        wait_for_totals(remote_only.base_url, {name: earlier[name] + now[name] for name in ENGINE_COUNTERS},
                        "the sums of both processes' counters")
    finally:
        restarted.kill()


def test_engine_counters_count_an_engine_that_registers_again_with_its_counters_going_on_once(remote_only):
    """An engine whose heartbeats stopped for a while (a network cut) is dropped, then registers again with the
    counters it had and more: the sums neither fall while it is away nor count its earlier work twice."""
    engine = EngineProcess(remote_only.base_url)
    try:
        run_work(remote_only.base_url)
        wait_for_totals(remote_only.base_url, counters_of(engine.engine), "a heartbeat with the engine's counters")
        engine.pause_heartbeats()
        wait_for_engines(remote_only, 0, "the silent engine to be dropped")
        assert engine_totals(remote_only.base_url) == counters_of(engine.engine)
        engine.resume_heartbeats()
        assert engine_totals(remote_only.base_url) == counters_of(engine.engine)
        run_work(remote_only.base_url, count=2)
        wait_for_totals(remote_only.base_url, counters_of(engine.engine), "the engine's counters, counted once")
    finally:
        engine.kill()


# ---- calls finished, by outcome ------------------------------------------------------------------------------

def calls_finished(base_url: str) -> dict[str, float]:
    return {dict(labels)["state"]: value for labels, value in metrics(base_url)["parrot_calls_finished"].items()}


def test_calls_finished_counts_a_stream_whose_client_disconnected_as_cancelled_not_failed(client, local_server):
    wait_until(lambda: local_server.manager.queued_calls == 0, 10, "the work of earlier tests to end")
    before = calls_finished(local_server.base_url)
    body = {"model": "tiny", "prompt": "A story that goes on and on:", "max_tokens": 3000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(3):  # a few tokens in: the call is decoding
            next(line for line in lines if line.startswith("data: "))
    # Closed mid-stream: the server notices and cancels the call.
    wait_until(lambda: local_server.manager.queued_calls == 0, 10, "the call to be cancelled")
    after = calls_finished(local_server.base_url)
    assert after.get("cancelled", 0) - before.get("cancelled", 0) == 1
    assert after["failed"] == before["failed"]


def test_calls_finished_counts_the_running_call_of_a_deleted_session_as_cancelled_not_failed(client, local_server):
    wait_until(lambda: local_server.manager.queued_calls == 0, 10, "the work of earlier tests to end")
    before = calls_finished(local_server.base_url)
    session = client.post("/api/sessions").json()
    headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
    out = client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"]
    call = {"template": [{"text": "An essay without end:"},
                         {"output": out, "sampling": {"max_tokens": 3000, "temperature": 0, "ignore_eos": True}}]}
    assert client.post(f"{base}/calls", json={"calls": [call]}, headers=headers).status_code == 201
    wait_until(lambda: client.get(base, headers=headers).json()["calls"]["running"] == 1, 10, "the call to run")
    assert client.delete(base, headers=headers).status_code == 204
    wait_until(lambda: local_server.manager.queued_calls == 0, 10, "the call to be cancelled")
    after = calls_finished(local_server.base_url)
    assert after.get("cancelled", 0) - before.get("cancelled", 0) == 1
    assert after["failed"] == before["failed"]
