"""Security promises: loopback by default, API keys (flag or file, constant-time) on every endpoint but /health,
/metrics optionally open, sessions isolated by their own tokens with unguessable ids, and limits on bodies and
prompts. (The key on every endpoint: tests/test_server_engines.py; another session's token is 403 and an
oversized declared body is 413: tests/test_server_api.py.)"""

import httpx
import pytest

from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineProcessSettings, EngineSettings, ServerSettings

ENGINE = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)


def test_servers_and_engines_bind_loopback_by_default():
    assert ServerSettings().host == "127.0.0.1" and EngineProcessSettings().host == "127.0.0.1"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server with one key from --api-key and two from a keys file, /metrics open."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("# operators\nkey-from-file-1\n\n  key-from-file-2  \n")
    settings = ServerSettings(port=0, api_key="flag-key", api_keys_file=keys_file, metrics_need_api_key=False)
    with LocalServer(ENGINE, settings) as server:
        yield server


@pytest.mark.parametrize("key", ["flag-key", "key-from-file-1", "key-from-file-2"])
def test_every_key_of_the_flag_and_the_keys_file_opens_the_api(keyed, key):
    response = httpx.get(f"{keyed.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200


@pytest.mark.parametrize("key", ["# operators", "key-from-file", "flag-key-and-more"])
def test_comments_blank_lines_and_near_misses_are_not_keys(keyed, key):
    response = httpx.get(f"{keyed.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 401 and response.json()["error"]["field"] == "authorization"


def test_metrics_can_be_opened_to_scrapers_without_the_key(keyed):
    assert httpx.get(f"{keyed.base_url}/metrics").status_code == 200
    assert httpx.post(f"{keyed.base_url}/api/sessions").status_code == 401


def test_an_empty_keys_file_is_refused_rather_than_opening_the_api(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# no keys yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        ServerSettings(api_keys_file=keys_file).api_keys()


# ---- sessions ---------------------------------------------------------------------------------------------


def new_session(client: httpx.Client) -> tuple[str, dict]:
    body = client.post("/api/sessions").json()
    return f"/api/sessions/{body['session_id']}", {"X-Session-Token": body["session_token"]}


def test_session_ids_and_tokens_are_long_random_strings(client):
    bodies = [client.post("/api/sessions").json() for _ in range(20)]
    ids, tokens = {b["session_id"] for b in bodies}, {b["session_token"] for b in bodies}
    assert len(ids) == len(tokens) == 20
    assert all(len(i) >= 16 for i in ids) and all(len(t) >= 32 for t in tokens)  # >= 96 and >= 192 random bits


def test_a_session_cannot_read_another_sessions_variable_through_its_own_id(client):
    theirs, their_token = new_session(client)
    secret = client.post(f"{theirs}/variables", json={"value": "their secret"}, headers=their_token).json()["var_id"]
    mine, my_token = new_session(client)
    response = client.get(f"{mine}/variables/{secret}", headers=my_token)
    assert response.status_code == 404 and "their secret" not in response.text


def test_a_session_cannot_feed_another_sessions_variable_into_its_calls(client):
    theirs, their_token = new_session(client)
    secret = client.post(f"{theirs}/variables", json={"value": "their secret"}, headers=their_token).json()["var_id"]
    mine, my_token = new_session(client)
    out = client.post(f"{mine}/variables", json={}, headers=my_token).json()["var_id"]
    calls = [{"template": [{"text": "Repeat: "}, {"input": secret}, {"output": out}]}]
    response = client.post(f"{mine}/calls", json={"calls": calls}, headers=my_token)
    assert response.status_code == 422 and "unknown variable" in response.json()["error"]["message"]


def test_a_session_without_its_token_is_403(client):
    base, _ = new_session(client)
    assert client.get(base).status_code == 403


# ---- limits -----------------------------------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_413_too(client):
    def chunks():  # no Content-Length: the body arrives in pieces
        for _ in range(3):
            yield b"x" * 2**20

    response = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["field"] == "body"


def test_a_chat_longer_than_the_context_is_400_naming_messages(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 9000}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["field"] == "messages"


def test_max_tokens_beyond_what_the_prompt_leaves_of_the_context_is_400_naming_it(client):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 9000})
    assert response.status_code == 400 and response.json()["error"]["field"] == "max_tokens"


def test_an_empty_prompt_is_400_naming_it(client):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": ""})
    assert response.status_code == 400 and response.json()["error"]["field"] == "prompt"


def test_a_graph_call_asking_for_more_tokens_than_the_context_is_400_naming_the_field(client):
    base, token = new_session(client)
    out = client.post(f"{base}/variables", json={}, headers=token).json()["var_id"]
    calls = [{"template": [{"text": "x"}, {"output": out, "sampling": {"max_tokens": 10**6}}]}]
    response = client.post(f"{base}/calls", json={"calls": calls}, headers=token)
    assert response.status_code == 400 and response.json()["error"]["field"] == "calls.0.sampling.max_tokens"


def test_without_an_engine_key_only_engines_on_this_host_may_register(local_server):
    import asyncio

    from parrot_lc.server.app import create_app

    app = create_app(local_server.manager, ServerSettings())  # the shared server's manager, reached from afar

    async def register_from_another_host() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://parrot") as remote_host:
            return await remote_host.post("/api/engines", json={"url": "http://203.0.113.7:9100"})

    refused = asyncio.run(register_from_another_host())
    assert refused.status_code == 403 and refused.json()["error"]["field"] == "client"
    assert all(slot.engine.url != "http://203.0.113.7:9100" for slot in local_server.manager.engines
               if hasattr(slot.engine, "url"))


def test_a_heartbeat_for_an_engine_inside_the_server_is_404(parrot_server):
    response = httpx.post(f"{parrot_server}/api/engines/engine-0/heartbeat", json={})
    assert response.status_code == 404 and response.json()["error"]["field"] == "name"
