"""A remote engine process registers with the manager, takes work, and when it is SIGKILLed mid-graph its
calls complete on the other engine."""

import os
import signal
import subprocess
import sys

import httpx
import pytest

from conftest import free_port, wait_until
from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.server.local import LocalServer
from parrot_lc.server.remote_engine import RemoteEngine
from parrot_lc.settings import EngineSettings, ServerSettings


CLIENT_KEY, ENGINE_KEY = "client-key-0123456789", "engine-key-9876543210"


@pytest.fixture
def manager_and_remote(request):
    """A manager with one local engine and a remote engine process registered with it. Parametrized
    indirectly with True: the manager has a client API key and an engine key, the engine the engine key."""
    keyed = getattr(request, "param", False)
    keys = {"api_key": CLIENT_KEY, "engine_key": ENGINE_KEY} if keyed else {}
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
    with LocalServer(settings, ServerSettings(port=0, engines=1, engine_timeout=3.0, **keys)) as server:
        port = free_port()
        remote = subprocess.Popen(
            [sys.executable, "-m", "parrot_lc.cli", "engine", "--manager", server.base_url, "--port", str(port),
             "--model", "tiny", "--device", "cpu", "--kv-cache-bytes", str(16 * 2**20),
             *(["--engine-key", ENGINE_KEY] if keyed else [])],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: len(server.manager.engines) == 2, 60, "the remote engine to register")
            yield server, remote
        finally:
            remote.kill()
            remote.wait()


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_graph_completes_after_its_remote_engine_dies_or_hangs_mid_run(manager_and_remote, fault):
    """Killed: its connections break at once. Hung: it stops sending heartbeats and is dropped after the
    engine timeout, which also drops its connections."""
    server, remote = manager_and_remote
    client = httpx.Client(base_url=server.base_url, timeout=120)
    session = client.post("/api/sessions").json()
    headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"

    def var(value=None):
        return client.post(f"{base}/variables", json={} if value is None else {"value": value},
                           headers=headers).json()["var_id"]

    outputs = [var() for _ in range(6)]
    calls = [{"template": [{"text": f"Independent task {i}: "}, {"input": var(f"topic {i}")},
                           {"output": out, "sampling": {"max_tokens": 200, "temperature": 0, "ignore_eos": True}}]}
             for i, out in enumerate(outputs)]
    assert client.post(f"{base}/calls", json={"calls": calls}, headers=headers).status_code == 201
    remote_slot = next(s for s in server.manager.engines if isinstance(s.engine, RemoteEngine))
    wait_until(lambda: remote_slot.running > 0, 60, "work on the remote engine")
    remote.send_signal(fault)
    values = [client.get(f"{base}/variables/{out}", headers=headers).json()["value"] for out in outputs]
    assert remote_slot not in server.manager.engines
    reference = LLMEngine(EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20))
    sampling = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i, value in enumerate(values):  # what an undisturbed run gives
        reference.fill(reference.tokenizer(f"Independent task {i}: topic {i}").input_ids, i)
        assert value == "".join(e.text for e in reference.generate(sampling, i))


@pytest.mark.parametrize("manager_and_remote", [True], indirect=True)
def test_a_keyed_engine_process_serves_its_manager_and_refuses_callers_without_the_key(manager_and_remote):
    server, _ = manager_and_remote
    remote = next(s.engine for s in server.manager.engines if isinstance(s.engine, RemoteEngine))
    assert httpx.get(f"{remote.url}/health").status_code == 200
    refused = httpx.post(f"{remote.url}/fill", json={"token_ids": [5, 6], "context_id": "x"})
    assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
    client_key = {"Authorization": f"Bearer {CLIENT_KEY}"}  # a client's key opens no engine
    assert httpx.get(f"{remote.url}/stats", headers=client_key).status_code == 401
    # The manager calls the engine with the key it registered with: with the local engine gone, a completion
    # runs on the remote one.
    server.manager.drop_engine(next(s for s in server.manager.engines if s.engine is not remote))
    completion = httpx.post(f"{server.base_url}/v1/completions", headers=client_key, timeout=60, json={
        "model": "tiny", "prompt": "Hello there", "max_tokens": 3, "temperature": 0})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 3
    assert httpx.post(f"{remote.url}/fill", headers={"Authorization": f"Bearer {ENGINE_KEY}"},
                      json={"token_ids": [5, 6], "context_id": "x"}).status_code == 200


@pytest.mark.parametrize("manager_and_remote", [True], indirect=True)
def test_only_the_engine_key_registers_an_engine_and_a_client_key_does_not(manager_and_remote):
    server, _ = manager_and_remote
    body = {"url": "http://127.0.0.1:1"}
    as_client = httpx.post(f"{server.base_url}/api/engines", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert as_client.status_code == 401 and as_client.json()["error"]["field"] == "authorization"
    assert len(server.manager.engines) == 2  # the local one and the keyed remote one, nothing more
