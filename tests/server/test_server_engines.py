"""A server with two engines and an API key: prefix-aware placement, and the key guarding every endpoint."""

import httpx
import pytest

from parrot_lc.server.local import LocalServer, build_manager
from parrot_lc.server.prefix_cache import prefix_key
from parrot_lc.settings import EngineSettings, ServerSettings

KEY = "test-key-123"
PREFIX = "You are a careful reviewer of pull requests. Read the diff and list the risks you see. Diff: "


@pytest.fixture(scope="module")
def two_engines():
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=32 * 2**20)
    with LocalServer(settings, ServerSettings(port=0, engines=2, api_key=KEY)) as server:
        yield server


@pytest.fixture
def client(two_engines):
    with httpx.Client(base_url=two_engines.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def test_calls_sharing_a_prefix_land_on_the_engine_that_holds_it(client, two_engines):
    session = client.post("/api/sessions").json()
    headers = {"X-Session-Token": session["session_token"]}
    base = f"/api/sessions/{session['session_id']}"
    outputs = []
    calls = []
    for i in range(6):
        diff = client.post(f"{base}/variables", json={"value": f"- line {i}\n+ line {i} changed"}, headers=headers)
        out = client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"]
        outputs.append(out)
        calls.append({"template": [{"text": PREFIX}, {"input": diff.json()["var_id"]},
                                   {"output": out, "sampling": {"max_tokens": 3, "temperature": 0}}]})
    assert client.post(f"{base}/calls", json={"calls": calls}, headers=headers).status_code == 201
    for out in outputs:
        assert client.get(f"{base}/variables/{out}", headers=headers).status_code == 200
    tokenizer = two_engines.manager.tokenizer
    prompt_ids = tokenizer(PREFIX + "- line 0").input_ids
    holders = [slot.name for slot in two_engines.manager.engines
               if any(key in slot.prefixes for key in {prefix_key(prompt_ids[:n]) for n in range(10, len(prompt_ids))})]
    assert len(holders) == 1


def test_independent_calls_spread_over_both_engines(client, two_engines):
    for i in range(6):
        client.post("/v1/completions", json={"model": "tiny", "prompt": f"Unrelated prompt number {i} " * 3,
                                             "max_tokens": 12})
    assert all(slot.engine.stats().decode_tokens > 0 for slot in two_engines.manager.engines)


def test_every_endpoint_but_health_needs_the_api_key(two_engines):
    with httpx.Client(base_url=two_engines.base_url) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path in (("POST", "/api/sessions"), ("GET", "/v1/models"), ("GET", "/metrics")):
            response = anonymous.request(method, path)
            assert response.status_code == 401 and response.json()["error"]["field"] == "authorization"
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401


def test_the_right_api_key_opens_the_api(client):
    assert client.get("/v1/models").status_code == 200


def test_engine_names_are_never_reused_after_an_engine_is_dropped():
    """engine-0 dies and engine-1 survives: the engine added next is neither a second engine-1 (two engines'
    heartbeats then went into one slot, and the other was dropped) nor engine-0 again."""
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
    manager = build_manager(settings, ServerSettings(engines=2))
    try:
        dead, survivor = manager.engines
        manager.pool.drop(dead, "stopped by the test")
        restarted = manager.pool.add(dead.engine)
        assert restarted.name not in {dead.name, survivor.name}
        assert [slot.name for slot in manager.engines] == ["engine-1", "engine-2"]
    finally:
        manager.close()


def test_background_calls_are_capped_per_engine_while_latency_critical_ones_are_not():
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
    with LocalServer(settings, ServerSettings(port=0, max_background_calls_per_engine=1)) as server:
        client = httpx.Client(base_url=server.base_url, timeout=60)
        session = client.post("/api/sessions").json()
        headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"

        def new(body: dict) -> str:
            return client.post(f"{base}/variables", json=body, headers=headers).json()["var_id"]

        maps = [new({}) for _ in range(4)]
        final = new({})
        sampling = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
        calls = [{"template": [{"text": f"Part {i}: "}, {"input": new({"value": str(i)})}, {"output": m, "sampling": sampling}]}
                 for i, m in enumerate(maps)]
        calls.append({"template": [{"text": "All: "}] + [{"input": m} for m in maps] + [{"output": final, "sampling": sampling}]})
        slot = server.manager.engines[0]
        seen = []
        client.post(f"{base}/calls", json={"calls": calls}, headers=headers)
        while client.get(f"{base}", headers=headers).json()["calls"]["done"] < 4:
            seen.append(slot.running)
        assert max(seen) == 1  # the 4 map calls (a task group) ran one at a time
        assert client.get(f"{base}/variables/{final}", headers=headers).status_code == 200
