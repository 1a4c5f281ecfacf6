"""POST /reset_prefix_cache: the server empties its engines' block caches (and frees their idle warm prefix
contexts), so that a repeated prompt is computed again; it takes the API key, is refused while draining, and
reaches remote engines over their HTTP face and an OpenAI-compatible engine's own server."""

import asyncio

import httpx
import pytest

from conftest import assert_refused
from parrot_lc.server.local import LocalServer
from parrot_lc.server.openai_engine import OpenAIEngine
from parrot_lc.settings import EngineSettings, ServerSettings

KEY, ENGINE_KEY = "reset-client-key-0123", "reset-engine-key-4567"
AS_CLIENT = {"Authorization": f"Bearer {KEY}"}
ENGINE = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
# 62 tokens of the tiny tokenizer: three full blocks, then the last ones
PROMPT = "The harbour master reads the tide table aloud to the evening boats. " * 2


@pytest.fixture(scope="module")
def keyed():
    with LocalServer(ENGINE, ServerSettings(port=0, api_key=KEY)) as server:
        yield server


def cached_tokens(base_url: str, headers: dict) -> int:
    """The cached prompt tokens of a greedy completion of PROMPT."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    response = httpx.post(f"{base_url}/v1/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def reset(base_url: str, headers: dict) -> httpx.Response:
    return httpx.post(f"{base_url}/reset_prefix_cache", headers=headers, timeout=60)


def test_after_the_reset_a_repeated_prompt_is_computed_again(keyed):
    cached_tokens(keyed.base_url, AS_CLIENT)
    assert cached_tokens(keyed.base_url, AS_CLIENT) == 48
    response = reset(keyed.base_url, AS_CLIENT)
    assert response.status_code == 200 and response.json()["freed_blocks"] >= 3
    assert cached_tokens(keyed.base_url, AS_CLIENT) == 0


def test_the_reset_needs_the_api_key(keyed):
    assert_refused(reset(keyed.base_url, {}), 401, "authorization")
    assert_refused(reset(keyed.base_url, {"Authorization": "Bearer nope"}), 401, "authorization")


def test_the_reset_frees_idle_warm_prefix_contexts(keyed):
    with httpx.Client(base_url=keyed.base_url, headers=AS_CLIENT, timeout=60) as client:
        session = client.post("/api/sessions").json()
        headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
        given = client.post(f"{base}/variables", json={"value": "Who listens?"}, headers=headers).json()["var_id"]
        out = client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"]
        call = {"template": [{"text": PROMPT}, {"input": given},  # a template's text before an input: shared
                             {"output": out, "sampling": {"max_tokens": 2, "temperature": 0}}]}
        assert client.post(f"{base}/calls", json={"calls": [call]}, headers=headers).status_code == 201
        assert client.get(f"{base}/variables/{out}", headers=headers).status_code == 200
    [slot] = keyed.manager.engines
    assert len(slot.prefixes) == 1  # PROMPT, kept warm past its call

    assert reset(keyed.base_url, AS_CLIENT).json()["freed_blocks"] >= 3
    assert len(slot.prefixes) == 0 and slot.engine.stats().num_contexts == 0
    assert cached_tokens(keyed.base_url, AS_CLIENT) == 0


def test_a_draining_server_refuses_the_reset_with_503(keyed):
    keyed.manager.draining = True  # what a shutdown sets first
    try:
        assert_refused(reset(keyed.base_url, AS_CLIENT), 503, None)
    finally:
        keyed.manager.draining = False


@pytest.fixture(scope="module")
def remote_engine_url(engine_app_urls) -> str:
    [url] = engine_app_urls(ENGINE_KEY, 1)
    return url


def test_the_reset_reaches_a_registered_remote_engine(remote_engine_url):
    # No heartbeats come from this engine (it has no link to the manager): a long timeout keeps it registered.
    settings = ServerSettings(port=0, engines=0, engine_key=ENGINE_KEY, engine_timeout=600)
    with LocalServer(ENGINE, settings) as server:
        register = httpx.post(f"{server.base_url}/api/engines", json={"url": remote_engine_url},
                              headers={"Authorization": f"Bearer {ENGINE_KEY}"})
        assert register.status_code == 201, register.text
        cached_tokens(server.base_url, {})
        assert cached_tokens(server.base_url, {}) == 48
        assert reset(server.base_url, {}).json()["freed_blocks"] >= 3
        assert cached_tokens(server.base_url, {}) == 0


def test_the_engines_reset_route_needs_the_engine_key(remote_engine_url):
    assert_refused(reset(remote_engine_url, {}), 401, "authorization")
    assert_refused(reset(remote_engine_url, AS_CLIENT), 401, "authorization")


def test_an_openai_compatible_engine_forwards_the_reset_to_its_server(keyed):
    settings = ServerSettings(port=0, engines=0, openai_engine=keyed.base_url,
                              openai_engine_api_key=KEY)
    with LocalServer(ENGINE, settings) as front:
        cached_tokens(keyed.base_url, AS_CLIENT)
        assert cached_tokens(keyed.base_url, AS_CLIENT) == 48
        assert reset(front.base_url, {}).json()["freed_blocks"] >= 3  # the upstream's count
        assert cached_tokens(keyed.base_url, AS_CLIENT) == 0


def test_an_openai_compatible_server_without_the_route_has_nothing_to_reset(keyed):
    # Under /v1 the server has no /reset_prefix_cache: it answers 404.
    engine = OpenAIEngine(f"{keyed.base_url}/v1", "tiny", keyed.manager.tokenizer, api_key=KEY)
    assert asyncio.run(engine.reset_prefix_cache()) == 0
