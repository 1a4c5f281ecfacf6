"""A remote engine process registers with the manager, takes work, and when it is SIGKILLed mid-graph its
calls complete on the other engine. One that the manager dropped registers again; one that cannot bind its port
never registers; one that the manager refuses exits; one that cannot reach it yet tries again."""

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import free_port, wait_until
from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.server.local import LocalServer
from parrot_lc.server.remote_engine import RemoteEngine
from parrot_lc.settings import EngineSettings, ServerSettings


CLIENT_KEY, ENGINE_KEY = "client-key-0123456789", "engine-key-9876543210"
AS_ENGINE = {"Authorization": f"Bearer {ENGINE_KEY}"}
ENGINE = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
ENGINE_TIMEOUT = 3.0


def engine_argv(manager_url: str, port: int, key: str = ENGINE_KEY) -> list[str]:
    """The command line of a `parrot-lc engine` process on `port` that registers with the manager with `key`."""
    return [sys.executable, "-m", "parrot_lc.cli", "engine", "--manager", manager_url, "--port", str(port),
            "--model", "tiny", "--device", "cpu", "--kv-cache-bytes", str(16 * 2**20), "--engine-key", key]


def start_engine(manager_url: str, port: int) -> subprocess.Popen:
    """A `parrot-lc engine` process on `port` that registers with the manager with the engine key."""
    return subprocess.Popen(engine_argv(manager_url, port), env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def remote_slots(server: LocalServer) -> list:
    return [slot for slot in server.manager.engines if isinstance(slot.engine, RemoteEngine)]


def is_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def manager_and_remote(request):
    """A manager with one local engine and a remote engine process registered with it (with the engine key,
    which every registration needs). Parametrized indirectly with True: the manager has a client API key too."""
    keyed = getattr(request, "param", False)
    keys = {"engine_key": ENGINE_KEY} | ({"api_key": CLIENT_KEY} if keyed else {})
    with LocalServer(ENGINE, ServerSettings(port=0, engines=1, engine_timeout=ENGINE_TIMEOUT, **keys)) as server:
        remote = start_engine(server.base_url, free_port())
        try:
            wait_until(lambda: len(server.manager.engines) == 2, 60, "the remote engine to register")
            yield server, remote
        finally:
            remote.kill()
            remote.wait()


def test_streams_on_an_engine_that_dies_resume_on_another_without_repeating_text(manager_and_remote):
    """Before: a stream whose engine died received `reference[:k] + reference` with no error. Now the call resumes
    on the other engine after the tokens it had, and each stream is the undisturbed text exactly once."""
    server, remote = manager_and_remote
    prompts = [f"Stream number {i} tells a story:" for i in range(6)]
    texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    usage: dict[int, int] = {}

    async def stream(i: int) -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        assert "error" not in event, event
                        texts[i] += [c["text"] for c in event["choices"]]
                        usage[i] = (event.get("usage") or {}).get("completion_tokens", usage.get(i))

    async def streams_and_a_kill() -> None:
        running = [asyncio.ensure_future(stream(i)) for i in range(len(prompts))]
        slot = remote_slots(server)[0]
        while not (slot.running and sum(map(len, texts.values())) > 20):
            await asyncio.sleep(0.01)
        remote.send_signal(signal.SIGKILL)
        await asyncio.gather(*running)

    asyncio.run(streams_and_a_kill())
    assert not remote_slots(server)  # it died under its streams, which went on elsewhere
    reference = LLMEngine(ENGINE)
    sampling = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        reference.fill(reference.tokenizer(prompt).input_ids, i)
        assert "".join(texts[i]) == "".join(e.text for e in reference.generate(sampling, i))
        assert usage[i] == 200


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


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_an_engine_lost_mid_call_is_logged_once_naming_it_and_the_calls_it_had(manager_and_remote, fault, caplog):
    server, remote = manager_and_remote
    client = httpx.Client(base_url=server.base_url, timeout=120)
    session = client.post("/api/sessions").json()
    headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
    outputs = [client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"] for _ in range(6)]
    calls = [{"template": [{"text": f"Independent task {i}: "},
                           {"output": out, "sampling": {"max_tokens": 200, "temperature": 0, "ignore_eos": True}}]}
             for i, out in enumerate(outputs)]
    assert client.post(f"{base}/calls", json={"calls": calls}, headers=headers).status_code == 201
    [remote_slot] = remote_slots(server)
    wait_until(lambda: sum(len(s.calls) for s in server.manager.engines) == 6 and remote_slot.running > 0, 60,
               "every call placed, and work on the remote engine")
    on_remote = sorted(remote_slot.calls)
    remote.send_signal(fault)
    for out in outputs:  # every call completes, on the other engine
        assert client.get(f"{base}/variables/{out}", headers=headers).status_code == 200
    [lost] = [r for r in caplog.records if r.name == "parrot_lc.engines" and remote_slot.name in r.getMessage()]
    assert lost.levelname == "WARNING" and remote_slot.registration.engine.url in lost.getMessage()
    assert lost.calls == on_remote and all(call in lost.getMessage() for call in on_remote)
    assert all(call.startswith(f"{session['session_id']}/") for call in on_remote)


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
    local = next(s for s in server.manager.engines if s.engine is not remote)
    server.manager.pool.drop(local, "stopped by the test")
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


def test_a_heartbeat_for_an_unknown_engine_gets_404_and_the_engine_registers_again(manager_and_remote):
    """An engine that stops past the engine timeout is dropped; once it runs again its heartbeat gets 404 and it
    registers again, under a name of its own, and keeps that registration with its heartbeats. The old
    registration's name and token open nothing."""
    server, remote = manager_and_remote
    [old] = remote_slots(server)
    remote.send_signal(signal.SIGSTOP)
    wait_until(lambda: old not in server.manager.engines, 30, "the silent engine to be dropped")
    remote.send_signal(signal.SIGCONT)
    wait_until(lambda: len(remote_slots(server)) == 1, 30, "the engine to register again")
    [new] = remote_slots(server)
    assert new.name != old.name and new.engine.url == old.engine.url
    time.sleep(ENGINE_TIMEOUT + 1)  # its heartbeats reach the new registration: it is not dropped
    assert remote_slots(server) == [new]
    for name, headers in ((old.name, {"X-Engine-Token": old.registration.token}), (new.name, {"X-Engine-Token": old.registration.token}),
                          (new.name, {})):
        stale = httpx.post(f"{server.base_url}/api/engines/{name}/heartbeat", json={}, headers={**AS_ENGINE, **headers})
        assert stale.status_code == 404 and stale.json()["error"]["field"] == "name"


def test_an_engine_registers_only_once_its_port_is_bound():
    """An engine whose port is taken exits without registering: the manager, which probes a registered URL
    before it takes the engine, never knocks at that port."""
    with LocalServer(ENGINE, ServerSettings(port=0, engine_key=ENGINE_KEY)) as server, \
            socket.create_server(("127.0.0.1", 0)) as taken:  # listening, never accepting
        remote = start_engine(server.base_url, taken.getsockname()[1])
        try:
            assert remote.wait(60) != 0
        finally:
            remote.kill()
        readable, _, _ = select.select([taken], [], [], 1.0)  # a connection waiting to be accepted: a probe
        assert readable == [] and remote_slots(server) == []


@pytest.mark.parametrize("manager_key, status", [(ENGINE_KEY, 401), (None, 403)],
                         ids=["a-wrong-key", "a-manager-without-an-engine-key"])
def test_an_engine_whose_key_the_manager_refuses_exits_2_with_one_line_naming_engine_key(manager_key, status):
    with LocalServer(ENGINE, ServerSettings(port=0, engine_key=manager_key)) as server:
        refused = subprocess.run(engine_argv(server.base_url, free_port(), key="not-the-engine-key"),
                                 capture_output=True, text=True, timeout=90)
    assert refused.returncode == 2, refused.stderr
    [line] = refused.stderr.splitlines()
    assert line.startswith("parrot-lc: error: --engine-key (or PARROT_ENGINE_ENGINE_KEY): engine_key: "
                           f"{server.base_url} refused this engine: {status} ")


def test_an_engine_of_another_model_exits_2_with_one_line_naming_model(hf_checkpoint):
    path, _ = hf_checkpoint("llama")  # vocabulary 512; the manager's tiny has 1024
    with LocalServer(ENGINE, ServerSettings(port=0, engine_key=ENGINE_KEY)) as server:
        argv = engine_argv(server.base_url, free_port())
        refused = subprocess.run(argv[:argv.index("--model") + 1] + [str(path)] + argv[argv.index("--model") + 2:],
                                 capture_output=True, text=True, timeout=90)
    assert refused.returncode == 2, refused.stderr
    [line] = refused.stderr.splitlines()
    assert line.startswith("parrot-lc: error: --model (or PARROT_MODEL): model: ") and "422" in line


def test_an_engine_the_manager_cannot_reach_yet_keeps_asking():
    """A probe that failed (a Service without ready endpoints, a slow start) may succeed later: no exit."""
    with LocalServer(ENGINE, ServerSettings(port=0, engine_key=ENGINE_KEY)) as server:
        unreachable = f"http://127.0.0.1:{free_port()}"
        remote = subprocess.Popen(engine_argv(server.base_url, free_port()) + [
            "--advertise-url", unreachable, "--heartbeat-interval", "0.2"], stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(8)  # the model loads, then it asks several times
            assert remote.poll() is None and remote_slots(server) == []
        finally:
            remote.kill()
            _, stderr = remote.communicate()
    assert stderr.count("engine_unreachable") + stderr.count("does not answer as an engine") >= 2, stderr


def test_an_engine_started_before_its_manager_registers_once_the_manager_listens():
    manager_port, engine_port = free_port(), free_port()
    remote = start_engine(f"http://127.0.0.1:{manager_port}", engine_port)
    try:
        # Serving, so its link has tried to register: the connection was refused.
        wait_until(lambda: is_up(f"http://127.0.0.1:{engine_port}"), 60, "the engine to serve")
        with LocalServer(ENGINE, ServerSettings(port=manager_port, engine_key=ENGINE_KEY)) as server:
            wait_until(lambda: len(remote_slots(server)) == 1, 30, "the engine to register")
    finally:
        remote.kill()
        remote.wait()


def test_a_request_that_no_engine_can_take_is_503_which_the_openai_package_retries():
    settings = ServerSettings(port=0, engines=0, engine_key=ENGINE_KEY, engine_timeout=ENGINE_TIMEOUT)
    with LocalServer(ENGINE, settings) as server:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
        refused = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30)
        error = refused.json()["error"]
        assert refused.status_code == 503 and "no engine is serving" in error["message"], error
        assert error["code"] == "engine_unavailable"
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**body, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: {")]
        assert "no engine is serving" in json.loads(events[-1][len("data: "):])["error"]["message"]
