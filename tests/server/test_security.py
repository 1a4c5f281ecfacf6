"""Security promises: loopback by default, API keys (flag or file, constant-time) on every endpoint but /health,
/metrics optionally open, sessions isolated by their own tokens with unguessable ids, limits on bodies and
prompts, and remote engines only with the engine key, at URLs that answer as engines. (The key on every endpoint: tests/server/test_server_engines.py; another session's token is 403 and an
oversized declared body is 413: tests/server/test_server_api.py.)"""

import socket
import time

import httpx
import openai
import pytest

from conftest import ERROR_KEYS, assert_refused, free_port
from parrot_lc.server.local import LocalServer
from parrot_lc.server.remote_engine import RemoteEngine
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


def test_the_openai_client_sees_a_wrong_key_as_openais_invalid_api_key(keyed):
    client = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.models.list()
    assert (refused.value.param, refused.value.code) == ("authorization", "invalid_api_key")


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


def test_a_non_ascii_session_token_is_403_naming_it(client):
    """A header's bytes reach the server as Latin-1 text, which a constant-time comparison of strings refuses."""
    base, _ = new_session(client)
    assert_refused(client.get(base, headers={"X-Session-Token": "clé-ü".encode()}), 403, "session_token")


# ---- slow clients -----------------------------------------------------------------------------------------

HEADER_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def strict_headers():
    """A server that gives clients HEADER_TIMEOUT seconds to send a request's headers."""
    with LocalServer(ENGINE, ServerSettings(port=0, header_timeout=HEADER_TIMEOUT)) as server:
        yield server


def connect(server: LocalServer) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes the connection (having sent nothing more)."""
    started = time.monotonic()
    assert sock.recv(1024) == b""
    return time.monotonic() - started


def health_exchange(sock: socket.socket) -> None:
    """Sends a whole GET /health and reads its answer, up to the end of its JSON body."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: parrot\r\n\r\n")
    answer = b""
    while not answer.endswith(b"}"):
        received = sock.recv(65536)
        assert received, answer  # not closed halfway
        answer += received
    assert answer.startswith(b"HTTP/1.1 200"), answer


def test_a_connection_with_half_sent_headers_is_closed_after_the_header_timeout(strict_headers):
    connections = [connect(strict_headers) for _ in range(50)]
    for sock in connections:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: parrot\r\nX-Slow: ")
    waits = [closed_after(sock) for sock in connections]
    assert max(waits) < HEADER_TIMEOUT + 3
    for sock in connections:
        sock.close()


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(strict_headers):
    with connect(strict_headers) as sock:
        assert HEADER_TIMEOUT - 0.1 < closed_after(sock) < HEADER_TIMEOUT + 3


def test_a_kept_alive_connection_is_not_cut_between_requests_but_its_next_requests_headers_must_come_in_time(
        strict_headers):
    with connect(strict_headers) as sock:
        health_exchange(sock)
        time.sleep(3 * HEADER_TIMEOUT)  # idle between requests: the keep-alive timeout's, not the header timeout's
        health_exchange(sock)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        assert closed_after(sock) < HEADER_TIMEOUT + 3


def test_a_request_whose_headers_came_in_time_is_served_however_long_it_takes(strict_headers):
    with httpx.Client(base_url=strict_headers.base_url, timeout=30) as slow:
        base, token = new_session(slow)
        never = slow.post(f"{base}/variables", json={}, headers=token).json()["var_id"]
        waited = slow.get(f"{base}/variables/{never}", params={"timeout": 4 * HEADER_TIMEOUT}, headers=token)
    assert_refused(waited, 408, "timeout")


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


# ---- engines ----------------------------------------------------------------------------------------------

CLIENT_KEY, ENGINE_KEY = "client-key-0123456789", "engine-key-9876543210"
AS_ENGINE = {"Authorization": f"Bearer {ENGINE_KEY}"}


@pytest.fixture
def engine_keyed():
    """A server with a client key and an engine key, one local engine, and room for two remote engines (which
    send no heartbeats here: they are not dropped within a test)."""
    settings = ServerSettings(port=0, api_key=CLIENT_KEY, engine_key=ENGINE_KEY, max_remote_engines=2,
                              engine_timeout=600)
    with LocalServer(ENGINE, settings) as server:
        yield server


def remote_urls(server: LocalServer) -> list[str]:
    return [slot.engine.url for slot in server.manager.engines if isinstance(slot.engine, RemoteEngine)]


def test_a_server_without_an_engine_key_takes_no_remote_engines(local_server, engine_app_urls):
    [url] = engine_app_urls(ENGINE_KEY, 1)  # a real engine: only the server's missing key refuses it
    for headers in ({}, AS_ENGINE):  # from loopback, with or without a key
        refused = httpx.post(f"{local_server.base_url}/api/engines", json={"url": url}, headers=headers)
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert set(error) == ERROR_KEYS and "--engine-key" in error["message"]
    heartbeat = httpx.post(f"{local_server.base_url}/api/engines/engine-0/heartbeat", json={}, headers=AS_ENGINE)
    assert heartbeat.status_code == 403
    assert remote_urls(local_server) == []


def test_engine_registration_without_the_engine_key_is_refused_even_from_loopback(engine_keyed, engine_app_urls):
    [url] = engine_app_urls(ENGINE_KEY, 1)
    register = f"{engine_keyed.base_url}/api/engines"
    for headers in ({}, {"Authorization": f"Bearer {CLIENT_KEY}"}, {"Authorization": "Bearer nope"}):
        refused = httpx.post(register, json={"url": url}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["field"] == "authorization"
    assert httpx.post(f"{engine_keyed.base_url}/api/engines/engine-0/heartbeat", json={}).status_code == 401
    assert remote_urls(engine_keyed) == []
    assert httpx.post(register, json={"url": url}, headers=AS_ENGINE).status_code == 201  # the key: taken
    assert remote_urls(engine_keyed) == [url]


@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1:9100", "file:///etc/passwd", "http://user:secret@127.0.0.1:9100", "http://token@127.0.0.1:9100",
    "http://127.0.0.1:9100/?next=x", "http://127.0.0.1:9100/#x", "http://127.0.0.1:99999", "http://127.0.0.1:0",
    "http://", "127.0.0.1:9100",
])
def test_registered_engine_urls_must_be_http_with_a_host(engine_keyed, url):
    refused = httpx.post(f"{engine_keyed.base_url}/api/engines", json={"url": url}, headers=AS_ENGINE)
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "url"
    assert remote_urls(engine_keyed) == []


def test_a_registered_url_must_answer_as_an_engine_of_the_servers_key(engine_keyed, engine_app_urls):
    """Nothing listening, a server that is no engine (the manager itself), an engine of another key: each is
    refused at once, naming the URL, rather than taken and sent calls."""
    [other_key] = engine_app_urls("another-engine-key", 1)
    for url in (f"http://127.0.0.1:{free_port()}", engine_keyed.base_url, other_key):
        refused = httpx.post(f"{engine_keyed.base_url}/api/engines", json={"url": url}, headers=AS_ENGINE)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "url", url
        assert "does not answer as an engine" in refused.json()["error"]["message"]
        assert refused.json()["error"]["code"] == "engine_unreachable"  # the engine asks again (it may come up)
    assert remote_urls(engine_keyed) == []


def test_an_engine_of_another_model_is_refused_naming_what_differs(engine_keyed, engine_app_urls, hf_checkpoint):
    """Its token ids would be read as other text by this server's tokenizer, and answered as 200."""
    path, _ = hf_checkpoint("llama")  # vocabulary 512, no tokenizer, 512-token context; the server's is tiny
    [url] = engine_app_urls(ENGINE_KEY, 1, model=str(path))
    refused = httpx.post(f"{engine_keyed.base_url}/api/engines", json={"url": url}, headers=AS_ENGINE)
    error = refused.json()["error"]
    assert refused.status_code == 422 and error["field"] == "url" and "serves another model" in error["message"]
    assert "vocab_size: 512 against 1024" in error["message"] and "tokenizer" in error["message"]
    assert error["code"] == "model_mismatch"  # the engine stops: asking again gets the same answer
    assert remote_urls(engine_keyed) == []

def test_a_registration_at_a_registered_url_replaces_it_and_the_server_holds_at_most_max_remote_engines(
        engine_keyed, engine_app_urls):
    first, second, third = engine_app_urls(ENGINE_KEY, 3)
    register = f"{engine_keyed.base_url}/api/engines"
    names = [httpx.post(register, json={"url": url}, headers=AS_ENGINE).json()["name"]
             for url in (first, first + "/", second)]
    assert remote_urls(engine_keyed) == [first, second]  # the second registration of `first` replaced the first
    assert len(set(names)) == 3 and names[0] not in {slot.name for slot in engine_keyed.manager.engines}
    refused = httpx.post(register, json={"url": third}, headers=AS_ENGINE)
    assert refused.status_code == 409 and "max_remote_engines" in refused.json()["error"]["message"]
    assert remote_urls(engine_keyed) == [first, second]
    assert httpx.post(register, json={"url": second}, headers=AS_ENGINE).status_code == 201  # a refresh fits


def test_a_heartbeat_for_an_engine_inside_the_server_is_404(engine_keyed):
    response = httpx.post(f"{engine_keyed.base_url}/api/engines/engine-0/heartbeat", json={}, headers=AS_ENGINE)
    assert response.status_code == 404 and response.json()["error"]["field"] == "name"


def test_an_engines_own_errors_have_the_documented_shape(engine_app_urls):
    [url] = engine_app_urls(ENGINE_KEY, 1)
    bad_fill = httpx.post(f"{url}/fill", json={"token_ids": "many", "context_id": "c"}, headers=AS_ENGINE)
    assert_refused(bad_fill, 400, "token_ids")
    assert_refused(httpx.get(f"{url}/no-such-route", headers=AS_ENGINE), 404, "path")
