"""The server's queue and sessions under requests that are too large, malformed or abandoned: limits are checked
before anything is counted, every counted queue slot comes back on every path, sessions and their variables are
bounded, and abandoned sessions expire (a real server on a loopback port, tiny model)."""

import asyncio
import threading
from contextlib import contextmanager

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import SMALL_KV_CACHE_BYTES, SMALL_KV_CONTEXT, assert_refused, wait_until
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings, ServerSettings, SettingsError

ENGINE = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=16 * 2**20)
KEYS = ("key-a-0123456789", "key-b-0123456789")
LIMITS = dict(max_queued_calls=4096, max_queued_calls_per_session=4096, max_queued_calls_per_key=4096,
              max_variables_per_session=4097)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("\n".join(KEYS) + "\n")
    with LocalServer(ENGINE, ServerSettings(port=0, api_keys_file=keys_file, **LIMITS)) as server:
        yield server


class Session:
    """A session of the server, opened with `key`."""

    def __init__(self, server: LocalServer, key: str = KEYS[0]) -> None:
        self.client = httpx.Client(base_url=server.base_url, timeout=60, headers={"Authorization": f"Bearer {key}"})
        body = self.client.post("/api/sessions").json()
        self.base, self.headers = f"/api/sessions/{body['session_id']}", {"X-Session-Token": body["session_token"]}

    def variables(self, count: int, value: str | None = None) -> list[str]:
        body = {"variables": [{} if value is None else {"value": value} for _ in range(count)]}
        reply = self.client.post(f"{self.base}/variables:batchCreate", json=body, headers=self.headers)
        assert reply.status_code == 201, reply.text
        return [v["var_id"] for v in reply.json()["variables"]]

    def submit(self, calls: list[dict]) -> httpx.Response:
        return self.client.post(f"{self.base}/calls", json={"calls": calls}, headers=self.headers)

    def delete(self) -> None:
        assert self.client.delete(self.base, headers=self.headers).status_code == 204


def call(reads: list[str], writes: str, max_tokens: int = 2) -> dict:
    template = [{"text": "Read "}] + [{"input": v} for v in reads]
    return {"template": template + [{"output": writes, "sampling": {"max_tokens": max_tokens, "temperature": 0}}]}


@pytest.fixture
def idle(server):
    """Asserts after the test that the server went back to idle: no queued call, no request on the engine."""
    yield
    engine = server.manager.engines[0].engine
    wait_until(lambda: server.manager.queued_calls == 0, 30, "the queue to empty")
    wait_until(lambda: (engine.stats().num_running, engine.stats().num_waiting) == (0, 0), 30, "the engine to idle")
    assert server.manager.queued_by_client == {}


def test_a_chain_of_4096_calls_is_admitted_and_returns_its_queue_slots_when_its_session_is_deleted(server, idle):
    """Before: a chain of about 1,000 calls or more hit RecursionError after its calls were counted, and every
    later request of every client got 429 until a restart."""
    session = Session(server)
    chain = session.variables(1) + session.variables(4096)  # an input never set, then 4096 outputs
    reply = session.submit([call([chain[i]], chain[i + 1]) for i in range(4096)])
    assert reply.status_code == 201, reply.text
    assert server.manager.queued_calls == 4096
    graph = session.client.get(session.base, headers=session.headers).json()["graph"]
    assert all(node["latency_critical"] for node in graph)  # deduced along the whole chain
    session.delete()
    assert server.manager.queued_calls == 0


def test_a_cycle_across_two_submissions_is_refused_and_holds_no_queue_slot(server, idle):
    session = Session(server)
    x, y = session.variables(2)
    assert session.submit([call([x], y)]).status_code == 201  # reads x (the client's to set), writes y
    cycle = session.submit([call([y], x)])  # writes x from y: each would wait for the other
    assert cycle.status_code == 422 and cycle.json()["error"]["field"] == "calls.0"  # the new call in the cycle
    assert "cycle" in cycle.json()["error"]["message"]
    assert server.manager.queued_calls == 1
    session.delete()


@pytest.mark.parametrize("case", ["unknown variable", "produced twice", "bad sampling", "larger than the queue"])
def test_a_refused_graph_counts_no_queue_slot(server, idle, case):
    session = Session(server)
    a, b = session.variables(2)
    calls = {
        "unknown variable": [call(["v-none"], a)],
        "produced twice": [call([], a), call([], a)],
        "bad sampling": [{"template": [{"text": "x"}, {"output": a, "sampling": {"max_tokens": 10**6}}]}],
        "larger than the queue": [call([], a)] * 4097,
    }[case]
    assert session.submit(calls).status_code in (400, 413, 422)
    assert server.manager.queued_calls == 0
    session.delete()


@contextmanager
def limit(server: LocalServer, **settings):
    """The server's settings changed for the block."""
    before = {name: getattr(server.manager.settings, name) for name in settings}
    for name, value in settings.items():
        setattr(server.manager.settings, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(server.manager.settings, name, value)


def test_one_session_gets_429_past_max_queued_calls_per_session(server, idle):
    with limit(server, max_queued_calls_per_session=2):
        session = Session(server)
        never, *outputs = session.variables(4)
        assert session.submit([call([never], outputs[0]), call([never], outputs[1])]).status_code == 201
        refused = session.submit([call([never], outputs[2])])
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        assert "max_queued_calls_per_session" in refused.json()["error"]["message"]
        other = Session(server)  # another session of the same key has room
        [out] = other.variables(1)
        assert other.submit([call([], out)]).status_code == 201
        other.delete()
        session.delete()


def test_one_api_key_gets_429_past_max_queued_calls_per_key_while_another_key_gets_in(server, idle):
    with limit(server, max_queued_calls_per_key=2):
        first, second = Session(server, KEYS[0]), Session(server, KEYS[0])
        for session in (first, second):
            never, out = session.variables(2)
            assert session.submit([call([never], out)]).status_code == 201
        [out] = first.variables(1)
        refused = first.submit([call([], out)])
        assert refused.status_code == 429 and "max_queued_calls_per_key" in refused.json()["error"]["message"]
        other_key = Session(server, KEYS[1])
        [out] = other_key.variables(1)
        assert other_key.submit([call([], out)]).status_code == 201
        for session in (first, second, other_key):
            session.delete()


def test_a_new_session_is_told_the_least_limit_of_the_queues_its_calls_join(server):
    with limit(server, max_queued_calls_per_session=40, max_queued_calls_per_key=30):
        reply = httpx.post(f"{server.base_url}/api/sessions", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert reply.status_code == 201 and reply.json()["call_limit"] == 30


def test_a_room_request_waits_until_the_sessions_earlier_calls_end(server, idle):
    with limit(server, max_queued_calls_per_session=2):
        session = Session(server)
        held, *outputs = session.variables(4)
        assert session.submit([call([held], outputs[0]), call([held], outputs[1])]).status_code == 201
        room = f"{session.base}/room"
        now = session.client.get(room, params={"calls": 1, "timeout": 0}, headers=session.headers)
        assert now.status_code == 200 and now.json() == {"room": 0, "limit": 2}
        replies = []
        waiter = threading.Thread(target=lambda: replies.append(session.client.get(
            room, params={"calls": 2, "timeout": 30}, headers=session.headers)))
        waiter.start()
        state = server.manager.sessions[session.base.rsplit("/", 1)[1]]
        wait_until(lambda: state.waiting == 1, 10, "the room request to wait")
        assert not replies  # still waiting: both calls wait for `held`
        reply = session.client.put(f"{session.base}/variables/{held}", json={"value": "x"}, headers=session.headers)
        assert reply.status_code == 204
        waiter.join(30)
        assert replies[0].status_code == 200 and replies[0].json() == {"room": 2, "limit": 2}
        session.delete()


def test_a_room_request_longer_than_the_servers_longest_wait_is_refused_naming_timeout(server):
    session = Session(server)
    reply = session.client.get(f"{session.base}/room", params={"timeout": 3600}, headers=session.headers)
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "timeout"
    session.delete()


def test_variables_past_max_variables_per_session_are_refused_naming_the_limit(server):
    session = Session(server)
    with limit(server, max_variables_per_session=64):
        session.variables(60)
        too_many = session.client.post(f"{session.base}/variables:batchCreate", json={"variables": [{}] * 5},
                                       headers=session.headers)
        assert too_many.status_code == 400 and too_many.json()["error"]["field"] == "variables"
        assert "max_variables_per_session=64" in too_many.json()["error"]["message"]
        assert len(session.variables(4)) == 4  # up to the limit exactly; none of the refused batch was made
        one_more = session.client.post(f"{session.base}/variables", json={}, headers=session.headers)
        assert one_more.status_code == 400
    session.delete()


def test_deleting_a_session_fails_the_fetches_that_wait_in_it(server):
    session = Session(server)
    [never] = session.variables(1)
    replies = []
    fetch = threading.Thread(target=lambda: replies.append(session.client.get(
        f"{session.base}/variables/{never}", headers=session.headers)))
    fetch.start()
    wait_until(lambda: any(s.waiting for s in server.manager.sessions.values()), 10, "the fetch to wait")
    session.delete()
    fetch.join(10)
    assert replies[0].status_code == 424 and "deleted" in replies[0].json()["error"]["message"]


def test_a_session_left_idle_past_the_idle_timeout_is_deleted_unless_it_has_work():
    with LocalServer(ENGINE, ServerSettings(port=0, session_idle_timeout=0.4)) as server:
        abandoned, working = Session(server), Session(server)
        never, out = working.variables(2)
        assert working.submit([call([never], out)]).status_code == 201  # an unfinished call: not idle
        wait_until(lambda: len(server.manager.sessions) == 1, 10, "the abandoned session to expire")
        assert abandoned.client.get(abandoned.base, headers=abandoned.headers).status_code == 404
        assert working.client.get(working.base, headers=working.headers).status_code == 200
        working.delete()


# ---- the invariant: any sequence of submissions, cancels and deletions leaves the server idle ----------------

OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("chain"), st.integers(1, 4), st.booleans()),  # length, whether it waits for a set input
    st.tuples(st.just("fan_in"), st.integers(2, 4), st.booleans()),
    st.tuples(st.just("set"), st.integers(0, 7), st.none()),
    st.tuples(st.just("cancel"), st.integers(0, 7), st.none()),
    st.tuples(st.just("delete"), st.integers(0, 3), st.none()),
    st.tuples(st.just("bad"), st.integers(0, 3), st.none()),
), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
          phases=(Phase.explicit, Phase.generate))  # a failing sequence is short already: no slow shrinking
@given(operations=OPERATIONS)
def test_any_sequence_of_submissions_cancels_and_deletions_leaves_no_queued_call_context_or_kv_block(
        server, operations):
    manager, engine = server.manager, server.manager.engines[0]
    sessions = [Session(server) for _ in range(2)]
    waiting_inputs: list[tuple[Session, str]] = []
    calls: list[tuple[Session, str]] = []
    for kind, n, flag in operations:
        session = sessions[n % len(sessions)]
        if kind in ("chain", "fan_in"):
            inputs = session.variables(1)
            if flag:
                waiting_inputs.append((session, inputs[0]))
            else:
                session.client.put(f"{session.base}/variables/{inputs[0]}", json={"value": "ready"},
                                   headers=session.headers)
            outs = session.variables(n + 1)
            graph = ([call([inputs[0] if i == 0 else outs[i - 1]], outs[i]) for i in range(n)] if kind == "chain"
                     else [call([inputs[0]], outs[i]) for i in range(n)] + [call(outs[:n], outs[n])])
            reply = session.submit(graph)
            assert reply.status_code == 201, reply.text
            calls += [(session, c) for c in reply.json()["call_ids"]]
        elif kind == "set" and waiting_inputs:
            owner, var = waiting_inputs.pop(n % len(waiting_inputs))
            owner.client.put(f"{owner.base}/variables/{var}", json={"value": "now"}, headers=owner.headers)
        elif kind == "cancel" and calls:
            owner, call_id = calls[n % len(calls)]
            owner.client.delete(f"{owner.base}/calls/{call_id}", headers=owner.headers)
        elif kind == "delete":
            session.delete()
            sessions[n % len(sessions)] = Session(server)
        elif kind == "bad":
            [out] = session.variables(1)
            assert session.submit([call(["v-unknown"], out)]).status_code == 422
    for session in sessions:
        session.delete()
    wait_until(lambda: manager.queued_calls == 0, 30, "every call to leave the queue")
    # A prefix fill outlives the calls that waited for it, when they are cancelled: until it ends, the engine
    # holds its context (with no block yet, before its step) and the prefix is not idle, so no eviction frees it.
    wait_until(lambda: engine.prefixes.num_filling == 0, 30, "the prefixes' fills to end")
    wait_until(lambda: engine.engine.stats().num_contexts == len(engine.prefixes), 30, "the calls' contexts to go")
    wait_until(lambda: (engine.engine.stats().num_running, engine.engine.stats().num_waiting) == (0, 0), 30,
               "the engine to idle")
    # What is left in use is the warm prefix contexts', and freeing them (all idle now) frees every block.
    asyncio.run(engine.prefixes.evict())
    # The engine's counters come as of its last command: the frees may still be on their way there.
    wait_until(lambda: (engine.engine.stats().num_contexts, engine.engine.stats().kv_blocks_used) == (0, 0), 10,
               "every context and KV block to be freed")


@pytest.mark.parametrize("prompts, n, field", [(4, 20, "n"), (65, 1, "prompt")])
def test_a_completion_of_more_choices_than_a_session_holds_is_refused_naming_its_field(server, prompts, n, field):
    with limit(server, max_variables_per_session=64):
        reply = httpx.post(f"{server.base_url}/v1/completions", headers={"Authorization": f"Bearer {KEYS[0]}"},
                           json={"model": "tiny", "prompt": ["a"] * prompts, "n": n, "max_tokens": 1})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["field"] == field, error
    assert error["message"].startswith(f"{prompts * n} choices ({prompts} prompts x n={n}) are more than a request")


def test_a_request_longer_than_the_kv_cache_but_within_the_context_is_400_context_length_exceeded(caplog):
    """The engine's cache (2,048 tokens, 2,032 for one context, of tiny's 8,192-token context) cannot hold it: the
    start-up log says so, and the request is refused as OpenAI refuses a prompt too long (a 400 with its code), not
    424."""
    small = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=2**20)
    with caplog.at_level("WARNING", logger="parrot_lc.server"), LocalServer(small, ServerSettings(port=0)) as server:
        reply = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": [7] * 2100, "max_tokens": 1})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["code"] == "context_length_exceeded", error
    assert "KV cache holds 2032 tokens for one context, fewer than the model's context of 8192" in caplog.text


# ---- a KV cache smaller than the model's context bounds every request, as vLLM's max_model_len is ----------------


def prefill_tokens(server: LocalServer) -> int:
    return server.manager.engines[0].engine.stats().prefill_tokens


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3000, "ignore_eos": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3000, "ignore_eos": True, "stream": True}, "max_tokens"),
    ("/v1/completions", {"prompt": [7] * SMALL_KV_CONTEXT, "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 500}], "max_tokens": 1}, "messages"),
], ids=["completion", "streamed", "completion-prompt", "chat", "chat-prompt"])
def test_a_request_the_kv_cache_cannot_hold_is_refused_before_it_runs_naming_what_does_not_fit(
        small_kv_server, route, body, field):
    """Within the model's context (8,192 tokens) but not the KV cache: a 400 with OpenAI's code, its status before
    any token (not a stream cut by an error event, nor an answer thrown away after the cache filled)."""
    before = prefill_tokens(small_kv_server)
    reply = httpx.post(f"{small_kv_server.base_url}{route}", json={"model": "tiny", **body}, timeout=60)
    error = assert_refused(reply, 400, field)
    assert error["code"] == "context_length_exceeded" and f"KV cache holds {SMALL_KV_CONTEXT}" in error["message"]
    assert prefill_tokens(small_kv_server) == before


SYSTEM = {"role": "system", "content": "You are a helpful assistant that answers briefly and well."}


@pytest.mark.parametrize("messages, n", [
    ([{"role": "user", "content": "hi"}], 1),
    ([SYSTEM, {"role": "user", "content": "hi"}], 1),
    ([{"role": "user", "content": "hi"}], 2),
], ids=["alone", "forked-from-its-system-prompt", "2-choices-forked-from-their-prompt"])
def test_a_chat_that_does_not_say_may_take_what_the_kv_cache_leaves(small_kv_server, messages, n):
    """Every choice runs to the end of the context that the cache holds, its context forked from a shared prefix or
    not (before the copy of a partly filled prefix block was left room for, such a fork waited for memory forever)."""
    body = {"model": "tiny", "messages": messages, "n": n, "ignore_eos": True}
    answer = httpx.post(f"{small_kv_server.base_url}/v1/chat/completions", json=body, timeout=60).json()
    assert [choice["finish_reason"] for choice in answer["choices"]] == ["length"] * n
    usage = answer["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] // n == SMALL_KV_CONTEXT


def test_the_longest_context_a_client_is_told_of_is_what_the_kv_cache_holds(small_kv_server):
    """vLLM's max_model_len, in the model's card and /tokenize's answer, and /tokenizer_info's model_max_length."""
    with httpx.Client(base_url=small_kv_server.base_url, timeout=60) as client:
        [card] = client.get("/v1/models").json()["data"]
        tokenized = client.post("/tokenize", json={"model": "tiny", "prompt": "hi"}).json()
        info = client.get("/tokenizer_info").json()
    assert card["max_model_len"] == tokenized["max_model_len"] == info["model_max_length"] == SMALL_KV_CONTEXT


def test_a_graph_call_asking_for_more_tokens_than_the_kv_cache_holds_is_400_naming_the_field(small_kv_server):
    session = Session(small_kv_server)
    [out] = session.variables(1)
    error = assert_refused(session.submit([call([], out, SMALL_KV_CONTEXT)]), 400, "calls.0.sampling.max_tokens")
    assert error["code"] == "context_length_exceeded" and f"KV cache holds {SMALL_KV_CONTEXT}" in error["message"]
    session.delete()


def test_a_graph_call_whose_prompt_and_max_tokens_pass_the_kv_cache_fails_before_it_generates(small_kv_server):
    """Its prompt is known once its inputs are: the call fails as it starts, with OpenAI's code, not once the cache
    has filled with what it generated."""
    before = prefill_tokens(small_kv_server)
    session = Session(small_kv_server)
    [given] = session.variables(1, "word " * 100)
    [out] = session.variables(1)
    assert session.submit([call([given], out, SMALL_KV_CONTEXT - 50)]).status_code == 201
    fetched = session.client.get(f"{session.base}/variables/{out}", headers=session.headers)
    assert fetched.status_code == 424 and fetched.json()["error"]["code"] == "context_length_exceeded"
    assert prefill_tokens(small_kv_server) == before
    session.delete()


def test_a_request_that_a_remote_engines_kv_cache_cannot_hold_is_refused_before_it_runs(engine_app_urls):
    """The engine tells its cache's size as it registers (and in each heartbeat)."""
    engine_key = "small-engine-key-0123"
    [url] = engine_app_urls(engine_key, 1, kv_cache_bytes=SMALL_KV_CACHE_BYTES)
    # No heartbeats come from this engine (it has no link to the manager): a long timeout keeps it registered.
    settings = ServerSettings(port=0, engines=0, engine_key=engine_key, engine_timeout=600)
    with LocalServer(ENGINE, settings) as server:
        register = httpx.post(f"{server.base_url}/api/engines", json={"url": url},
                              headers={"Authorization": f"Bearer {engine_key}"})
        assert register.status_code == 201, register.text
        reply = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "hi", "max_tokens": 3000, "ignore_eos": True})
    assert assert_refused(reply, 400, "max_tokens")["code"] == "context_length_exceeded"


def test_a_kv_cache_of_one_block_refuses_every_request_at_once():
    """Its one block is what a fork copies: no context fits (none is bounded by the model's context instead)."""
    one_block = SMALL_KV_CACHE_BYTES // 24
    with LocalServer(EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=one_block)) as server:
        assert httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["max_model_len"] == 0
        refused = httpx.post(f"{server.base_url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert_refused(refused, 400, "prompt")


def test_serving_without_any_engine_or_a_way_to_get_one_is_a_settings_error_naming_engines():
    with pytest.raises(SettingsError, match=r"^--engines \(or PARROT_ENGINES\): engines: 0 local engines"):
        LocalServer(ENGINE, ServerSettings(port=0, engines=0))


def test_health_is_503_once_every_local_engine_is_lost_and_none_can_register():
    """Local engines are not restarted; without an engine key no remote one can come: send traffic elsewhere."""
    with LocalServer(ENGINE, ServerSettings(port=0)) as server:
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        [slot] = server.manager.engines
        server.manager.pool.drop(slot, "killed in a test")
        lost = httpx.get(f"{server.base_url}/health")
    assert lost.status_code == 503 and lost.json() == {"status": "no_engine", "engines": 0}
