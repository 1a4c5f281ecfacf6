"""Faults on a real server (loopback): clients that go away, calls cancelled through the API, and a KV cache
filled to the brim. Work is never lost and KV blocks never leak. (An engine process killed or hung mid-graph:
tests/server/test_engine_failover.py.)"""

import time

import httpx

from conftest import hide_kv_capacity, wait_until
from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings

LONG = {"max_tokens": 3000, "temperature": 0, "ignore_eos": True}


def kv_blocks_used(server: LocalServer) -> int:
    return server.manager.engines[0].engine.stats().kv_blocks_used


def settled_kv_blocks_used(server: LocalServer) -> int:
    """The block count once earlier requests have let go of their contexts (a finished completion frees its
    context just after it is counted as done): the count when it stays the same for 0.3 s."""
    counts = [kv_blocks_used(server)]

    def unchanged() -> bool:
        time.sleep(0.3)
        counts.append(kv_blocks_used(server))
        return counts[-1] == counts[-2]

    wait_until(unchanged, 10, "the KV block count to settle")
    return counts[-1]


def test_a_client_that_disconnects_mid_stream_has_its_call_cancelled_and_its_kv_freed(client, local_server):
    body = {"model": "tiny", "prompt": "A story that goes on and on:", "max_tokens": 3000, "temperature": 0,
            "stream": True}
    client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 1})  # warms the prompt's prefix
    wait_until(lambda: local_server.manager.queued_calls == 0, 10, "the work of earlier tests to end")
    before, stats = settled_kv_blocks_used(local_server), local_server.manager.engines[0].engine.stats
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(5):  # a few tokens in: the call is decoding
            next(line for line in lines if line.startswith("data: "))
        assert kv_blocks_used(local_server) > before
    # Closed mid-stream: the server notices, cancels the call and frees its context.
    wait_until(lambda: local_server.manager.queued_calls == 0 and kv_blocks_used(local_server) == before, 10,
               "the call to stop and its blocks to be freed")
    decoded = stats().decode_tokens
    time.sleep(0.3)
    assert stats().decode_tokens == decoded  # nothing decodes any more


def test_a_client_that_gives_up_on_a_whole_response_has_its_call_cancelled_and_its_kv_freed(local_server):
    # The `openai` package times out and retries: the abandoned request must not go on generating.
    wait_until(lambda: local_server.manager.queued_calls == 0, 10, "the work of earlier tests to end")
    before, stats = settled_kv_blocks_used(local_server), local_server.manager.engines[0].engine.stats
    decoded = stats().decode_tokens
    body = {"model": "tiny", "prompt": "A story that goes on and on:", **LONG}
    with httpx.Client(base_url=local_server.base_url, timeout=0.5) as impatient:
        try:
            impatient.post("/v1/completions", json=body)
            raise AssertionError("3,000 tokens came back within the client's timeout")
        except httpx.ReadTimeout:
            pass
    wait_until(lambda: local_server.manager.queued_calls == 0 and kv_blocks_used(local_server) == before, 30,
               "the call to end and its blocks to be freed")
    # stopped before its end: a whole run decodes all its tokens but the first (the prefill samples that one)
    assert stats().decode_tokens - decoded < LONG["max_tokens"] - 1


def test_a_call_cancelled_through_the_api_frees_its_kv_and_fails_its_consumers(client, local_server):
    session = client.post("/api/sessions").json()
    headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
    draft, review = (client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"] for _ in range(2))
    before = settled_kv_blocks_used(local_server)
    calls = [{"template": [{"text": "Write a long essay on rivers:"}, {"output": draft, "sampling": LONG}]},
             {"template": [{"text": "Review this essay:"}, {"input": draft}, {"output": review}]}]
    writer, reviewer = client.post(f"{base}/calls", json={"calls": calls}, headers=headers).json()["call_ids"]
    wait_until(lambda: local_server.manager.engines[0].engine.stats().decode_tokens > 0
               and kv_blocks_used(local_server) > before + 1, 10, "the essay to be decoding")
    assert client.delete(f"{base}/calls/{writer}", headers=headers).status_code == 204
    response = client.get(f"{base}/variables/{review}", headers=headers, params={"timeout": 10})
    assert response.status_code == 424 and "cancelled" in response.json()["error"]["message"]
    states = {c["call_id"]: c["state"] for c in client.get(base, headers=headers).json()["graph"]}
    assert states == {writer: "failed", reviewer: "failed"}
    prefixes = local_server.manager.engines[0].prefixes
    wait_until(lambda: kv_blocks_used(local_server) <= before + len(prefixes), 10, "the essay's blocks to be freed")


def test_cancelling_an_unknown_call_is_404_naming_it(client):
    session = client.post("/api/sessions").json()
    response = client.delete(f"/api/sessions/{session['session_id']}/calls/c-nope",
                             headers={"X-Session-Token": session["session_token"]})
    assert response.status_code == 404 and response.json()["error"]["field"] == "call_id"


def test_many_long_prompts_that_overfill_the_kv_cache_wait_or_are_preempted_and_all_complete():
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=512 * 2**10)
    prompts = [f"Document {i}: " + " ".join(f"word{i}x{j}" for j in range(60)) for i in range(12)]
    sampling = {"max_tokens": 32, "temperature": 0, "ignore_eos": True}
    with LocalServer(settings) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        engine = server.manager.engines[0].engine.engine
        need = sum(len(engine.tokenizer(p).input_ids) + 32 for p in prompts)
        assert need > 3 * engine.capacity_tokens  # the brim: a third of the work fits at once
        session = client.post("/api/sessions").json()
        headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
        outputs = [client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"] for _ in prompts]
        calls = [{"template": [{"text": p}, {"output": o, "sampling": sampling}]} for p, o in zip(prompts, outputs)]
        assert client.post(f"{base}/calls", json={"calls": calls}, headers=headers).status_code == 201
        values = [client.get(f"{base}/variables/{o}", headers=headers).json().get("value") for o in outputs]
    reference = LLMEngine(settings)
    for i, (prompt, value) in enumerate(zip(prompts, values)):
        reference.fill(reference.tokenizer(prompt).input_ids, i)
        assert value == "".join(e.text for e in reference.generate(SamplingParams(**sampling), i))
        reference.free_context(i)


def test_a_prompt_longer_than_the_whole_kv_cache_fails_at_once_not_retried():
    # 256 tokens of KV cache (tiny: 512 bytes a token) against a prompt of about 1,500 tokens, well inside the
    # model's context: waiting for memory cannot help, so the answer must come at once. The engine keeps its cache's
    # size to itself: the engine refuses the prompt, not the server before it.
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=128 * 2**10)
    with LocalServer(settings) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        hide_kv_capacity(server.manager)
        started = time.monotonic()
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 1500, "max_tokens": 4})
        assert response.status_code in (400, 424) and "KV cache holds" in response.json()["error"]["message"]
        assert time.monotonic() - started < 5
        assert server.manager.engines[0].engine.stats().prefill_tokens == 0
