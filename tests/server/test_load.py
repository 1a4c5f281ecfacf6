"""Load and backpressure on a real server (loopback, tiny model): many concurrent sessions, through the
functions of benchmarks/load.py, all complete and none is lost; a full queue answers 429 with Retry-After."""

import asyncio
import importlib.util
import sys
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from conftest import ROOT
from parrot_lc.frontend import ParrotClient, RateLimitError
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings, ServerSettings

# The script itself, not a copy of it: benchmarks/ is not a package, so it is loaded from its file.
SPEC = importlib.util.spec_from_file_location("benchmarks_load", ROOT / "benchmarks" / "load.py")
load = sys.modules["benchmarks_load"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(load)

QUEUE = 4


@pytest.fixture(scope="module")
def small_queue():
    """A server that queues at most QUEUE unfinished calls."""
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=32 * 2**20)
    with LocalServer(settings, ServerSettings(port=0, max_queued_calls=QUEUE)) as server:
        yield server


def test_60_concurrent_sessions_with_openai_requests_mixed_in_all_complete_and_none_is_lost(small_queue):
    report = asyncio.run(load.run_load(small_queue.base_url, sessions=60, openai_every=3, deadline=50,
                                       progress=False))
    assert (report["completed"], report["failed"], report["lost"]) == (60, 0, 0), report["errors"]
    assert report["rejected"] > 0  # the queue was full at times: those sessions waited their turn
    assert 0 < report["p50_s"] <= report["p99_s"]
    assert small_queue.manager.queued_calls == 0


def test_percentiles_are_nearest_rank():
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and load.percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert load.percentile([], 50) is None


# ---- backpressure ----------------------------------------------------------------------------------------


def fill_queue(client: httpx.Client) -> Callable[[], None]:
    """Fills the server's queue with calls that wait for an input never set; returns what empties it again."""
    session = client.post("/api/sessions").json()
    headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
    never = client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"]
    outputs = [client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"] for _ in range(QUEUE)]
    calls = [{"template": [{"text": "Wait for "}, {"input": never}, {"output": o}]} for o in outputs]
    assert client.post(f"{base}/calls", json={"calls": calls}, headers=headers).status_code == 201
    return lambda: client.delete(base, headers=headers)


@pytest.fixture
def full_queue(small_queue):
    """The queue filled with calls that wait for an input never set; emptied again afterwards."""
    client = httpx.Client(base_url=small_queue.base_url, timeout=30)
    empty = fill_queue(client)
    yield client
    empty()
    client.close()


def assert_429(response: httpx.Response, field: str | None = "calls") -> None:
    """A full queue's answer: on the Parrot API naming the graph's calls, on /v1 no field (as OpenAI's)."""
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["field"] == field and "max_queued_calls" in error["message"]


def test_a_graph_submitted_to_a_full_queue_gets_429_with_retry_after(full_queue):
    session = full_queue.post("/api/sessions").json()
    headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
    out = full_queue.post(f"{base}/variables", json={}, headers=headers).json()["var_id"]
    assert_429(full_queue.post(f"{base}/calls", json={"calls": [{"template": [{"text": "Hi"}, {"output": out}]}]},
                               headers=headers))


def test_openai_requests_to_a_full_queue_get_429_streamed_or_not(full_queue):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    assert_429(full_queue.post("/v1/completions", json=body), None)
    assert_429(full_queue.post("/v1/completions", json={**body, "stream": True}), None)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert_429(full_queue.post("/v1/chat/completions", json=chat), None)


def test_the_openai_client_sees_a_full_queue_as_rate_limit_error(full_queue, small_queue):
    client = openai.OpenAI(base_url=f"{small_queue.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    assert (refused.value.param, refused.value.code) == (None, "rate_limit_exceeded")


def test_the_frontend_retries_a_full_queue_after_retry_after_then_raises_rate_limit_error(full_queue, small_queue):
    with ParrotClient(small_queue.base_url, max_retries=1) as client:
        start = time.monotonic()
        with pytest.raises(RateLimitError) as refused:
            client.complete("Hello", max_tokens=2)
        assert time.monotonic() - start >= 1.0  # retried once, after the server's Retry-After of 1 s
    assert refused.value.status == 429 and refused.value.retry_after == 1


@pytest.mark.parametrize("streamed", [False, True])
def test_a_frontend_request_refused_by_a_full_queue_goes_through_once_the_queue_has_room(small_queue, streamed):
    rejected = small_queue.manager.rejected_calls
    with httpx.Client(base_url=small_queue.base_url, timeout=30) as holder:
        threading.Timer(0.5, fill_queue(holder)).start()  # full now, emptied in 0.5 s
        with ParrotClient(small_queue.base_url, max_retries=3) as client:
            if streamed:
                pieces = list(client.stream_complete("Hello", max_tokens=2, temperature=0))
                assert pieces[-1].usage["completion_tokens"] == 2
            else:
                assert client.complete("Hello", max_tokens=2, temperature=0).usage["completion_tokens"] == 2
    assert small_queue.manager.rejected_calls > rejected  # it was refused first


def test_a_graph_larger_than_the_whole_queue_is_400_naming_calls(small_queue):
    with httpx.Client(base_url=small_queue.base_url, timeout=30) as client:
        session = client.post("/api/sessions").json()
        headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
        outputs = [client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"] for _ in range(QUEUE + 1)]
        calls = [{"template": [{"text": "x"}, {"output": o}]} for o in outputs]
        response = client.post(f"{base}/calls", json={"calls": calls}, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["field"] == "calls"


@pytest.mark.parametrize("request_size, field", [({"prompt": ["x"] * (QUEUE + 1)}, "prompt"),
                                                 ({"prompt": "x", "n": QUEUE + 1}, "n")])
def test_an_openai_request_of_more_choices_than_the_queue_holds_is_400_naming_its_field(small_queue, request_size,
                                                                                          field):
    with httpx.Client(base_url=small_queue.base_url, timeout=30) as client:
        response = client.post("/v1/completions", json={"model": "tiny", "max_tokens": 1, **request_size})
    assert response.status_code == 400 and response.json()["error"]["field"] == field
