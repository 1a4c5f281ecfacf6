"""The Parrot HTTP API on a real uvicorn server: graphs run inside the server, share prefixes, and every bad
request gets a 4xx JSON error while the server keeps serving."""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import assert_refused, wait_until
from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.server.executor import GROUP_PRIORITY, LATENCY_PRIORITY
from parrot_lc.settings import EngineSettings

GREEDY = {"max_tokens": 6, "temperature": 0.0}
MAP_PREFIX = "Summarize the following part of a long report in one short sentence, keeping its key facts. Part: "


class Session:
    """A thin test helper over the raw HTTP API (the real clients live in parrot_lc.frontend)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        body = client.post("/api/sessions").json()
        self.id, self.headers = body["session_id"], {"X-Session-Token": body["session_token"]}

    def var(self, value: str | None = None) -> str:
        body = {} if value is None else {"value": value}
        return self.client.post(f"/api/sessions/{self.id}/variables", json=body, headers=self.headers).json()["var_id"]

    def submit(self, *templates) -> httpx.Response:
        calls = [{"template": t} for t in templates]
        return self.client.post(f"/api/sessions/{self.id}/calls", json={"calls": calls}, headers=self.headers)

    def get(self, var_id: str, **params) -> httpx.Response:
        return self.client.get(f"/api/sessions/{self.id}/variables/{var_id}", params=params, headers=self.headers)


@pytest.fixture(scope="module")
def reference_engine():
    return LLMEngine(EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=32 * 2**20))


def run_alone(engine: LLMEngine, prompt: str, max_tokens: int) -> str:
    """What one call gives when run by itself through the engine (greedy)."""
    context = object()
    engine.fill(engine.tokenizer(prompt).input_ids, context)
    events = engine.generate(SamplingParams(max_tokens=max_tokens, temperature=0.0), context)
    text = "".join(e.text for e in events)
    engine.free_context(context)
    return text


def test_map_reduce_graph_equals_calls_run_one_by_one_and_fills_the_shared_prefix_once(
    client, local_server, reference_engine
):
    session = Session(client)
    chunks = [f"Section {i} reports that sales in region {i} grew by {i * 3} percent." for i in range(8)]
    chunk_vars = [session.var(c) for c in chunks]
    summaries = [session.var() for _ in chunks]
    final = session.var()
    maps = [[{"text": MAP_PREFIX}, {"input": c}, {"text": "\nSummary:"}, {"output": s, "sampling": GREEDY}]
            for c, s in zip(chunk_vars, summaries)]
    reduce = [{"text": "Combine these summaries into one:\n"}]
    for s in summaries:
        reduce += [{"input": s}, {"text": "\n"}]
    reduce.append({"output": final, "sampling": GREEDY})
    before = local_server.manager.engines[0].engine.stats().prefill_tokens
    assert session.submit(*maps, reduce).status_code == 201
    value = session.get(final).json()["value"]

    expected_maps = [run_alone(reference_engine, MAP_PREFIX + c + "\nSummary:", 6) for c in chunks]
    expected = run_alone(reference_engine, "Combine these summaries into one:\n" + "".join(m + "\n" for m in expected_maps), 6)
    assert value == expected
    def tokens(text: str) -> int:
        return len(reference_engine.tokenizer(text).input_ids)

    prefilled = local_server.manager.engines[0].engine.stats().prefill_tokens - before
    map_tokens = sum(tokens(MAP_PREFIX + c + "\nSummary:") for c in chunks)
    reduce_tokens = tokens("Combine these summaries into one:\n" + "".join(m + "\n" for m in expected_maps))
    # The prefix (less at most a boundary token) was filled once, not 8 times.
    assert prefilled <= map_tokens - 7 * (tokens(MAP_PREFIX) - 1) + reduce_tokens


def test_each_prefix_is_filled_at_its_calls_priority_the_maps_as_a_group_the_reduce_as_latency(
    client, prefix_fill_priorities
):
    session = Session(client)
    summaries = [session.var() for _ in range(3)]
    maps = [[{"text": "Summarize this harbour log entry in five words. Entry: "}, {"input": session.var(f"Ship {i} left.")},
             {"text": "\nSummary:"}, {"output": s, "sampling": GREEDY}] for i, s in enumerate(summaries)]
    final = session.var()
    reduce = [{"text": "Join these:\n"}, *({"input": s} for s in summaries), {"output": final, "sampling": GREEDY}]
    assert session.submit(*maps, reduce).status_code == 201
    assert session.get(final).status_code == 200
    assert prefix_fill_priorities == [GROUP_PRIORITY, LATENCY_PRIORITY]


def test_calls_that_read_the_same_variable_first_fill_its_text_once(client, local_server, reference_engine):
    session = Session(client)
    role = "You are an engineer of a small team. Write the file the design asks for, and nothing else.\nDesign: "
    design_text = " ".join(f"Module {i} keeps the ledger of harbour {i} and reports to the council." for i in range(6))
    design = session.var(design_text)
    files = [session.var(f"ledger_{i}.py") for i in range(4)]
    codes = [session.var() for _ in files]
    engineers = [[{"text": role}, {"input": design}, {"text": "\nFile: "}, {"input": f},
                  {"output": c, "sampling": GREEDY}] for f, c in zip(files, codes)]
    before = local_server.manager.engines[0].engine.stats().prefill_tokens
    assert session.submit(*engineers).status_code == 201
    values = [session.get(c).json()["value"] for c in codes]

    shared = role + design_text + "\nFile: "
    assert values == [run_alone(reference_engine, shared + f"ledger_{i}.py", 6) for i in range(4)]
    prefilled = local_server.manager.engines[0].engine.stats().prefill_tokens - before
    prompts = sum(len(reference_engine.tokenizer(shared + f"ledger_{i}.py").input_ids) for i in range(4))
    shared_tokens = len(reference_engine.tokenizer(shared).input_ids)
    # The role and the design's value (less at most a boundary token) were filled once, not 4 times.
    assert prefilled <= prompts - 3 * (shared_tokens - 1)


def test_calls_sharing_a_variable_share_one_prefix_whatever_text_follows_it(client, local_server):
    """The design's last token merges with "s of …" and not with ", then": one prefix context all the same."""
    session = Session(client)
    design = session.var(" ".join(f"Module {i} keeps the ledger of harbour {i}." for i in range(20))
                         + " The ledger keeps accounts")
    outputs = [session.var() for _ in range(4)]
    calls = [[{"text": "You are an engineer.\nDesign: "}, {"input": design}, {"text": tail},
              {"output": out, "sampling": GREEDY}] for tail, out in zip(["s of harbours", "s of ships", ", then", ", and"], outputs)]
    prefixes = local_server.manager.engines[0].prefixes
    before = prefixes.keys()  # the server is shared: others' idle prefixes may be evicted meanwhile
    assert session.submit(*calls).status_code == 201
    assert all(session.get(out).status_code == 200 for out in outputs)
    assert len(prefixes.keys() - before) == 1


def test_a_prefix_made_of_a_sessions_variables_is_freed_with_the_session(client, local_server):
    session = Session(client)
    design = session.var("The harbour ledger keeps every ship's cargo, berth and fees, by day.")
    outputs = [session.var() for _ in range(3)]
    calls = [[{"text": "You are a reviewer.\nDesign: "}, {"input": design}, {"text": f"\nReview part {i}:"},
              {"output": out, "sampling": GREEDY}] for i, out in enumerate(outputs)]
    prefixes = local_server.manager.engines[0].prefixes
    before = prefixes.keys()  # the server is shared: others' idle prefixes may be evicted meanwhile
    assert session.submit(*calls).status_code == 201
    assert all(session.get(out).status_code == 200 for out in outputs)
    new = prefixes.keys() - before
    assert len(new) == 1  # the role and the design, filled once for the three calls
    assert client.delete(f"/api/sessions/{session.id}", headers=session.headers).status_code == 204
    assert not new & prefixes.keys()


def test_a_chain_of_4_calls_runs_with_one_submission_and_one_fetch(client, reference_engine):
    session = Session(client)
    variables = [session.var("Once upon a time")] + [session.var() for _ in range(4)]
    steps = [[{"text": "Continue the story: "}, {"input": a}, {"output": b, "sampling": GREEDY}]
             for a, b in zip(variables, variables[1:])]
    assert session.submit(*steps).status_code == 201
    value = session.get(variables[-1]).json()["value"]
    text = "Once upon a time"
    for _ in range(4):
        text = run_alone(reference_engine, "Continue the story: " + text, 6)
    assert value == text


def test_a_fetch_tells_how_each_output_ended_and_its_tokens_counted_after_what_came_before(client, local_server):
    """Each output of a call comes with its finish reason, stop reason and usage, whose `prompt_tokens` are the
    call's context before it: the prompt; for the second, the prompt, the first output and the text between. A value
    the client set has none."""
    tokenizer = local_server.manager.tokenizer
    session = Session(client)
    first, second, given = session.var(), session.var(), session.var("given")
    prompt, between = "Topic: parrots\nTitle:", "\nFirst line:"
    cut = {"max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
    session.submit([{"text": prompt}, {"output": first, "sampling": cut}, {"text": between},
                    {"output": second, "sampling": cut}])
    one, two = session.get(first).json(), session.get(second).json()
    before_one = len(tokenizer(prompt).input_ids)
    before_two = before_one + 3 + len(tokenizer(between, add_special_tokens=False).input_ids)
    for fetched, before in ((one, before_one), (two, before_two)):
        assert (fetched["finish_reason"], fetched["stop_reason"]) == ("length", None)
        usage = fetched["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (before, 3, before + 3)
    assert session.get(given).json() == {"var_id": given, "value": "given", "finish_reason": None,
                                         "stop_reason": None, "usage": None}


def test_session_status_counts_calls_by_state(client):
    session = Session(client)
    a, b = session.var("x"), session.var()
    session.submit([{"text": "Say "}, {"input": a}, {"output": b, "sampling": GREEDY}])
    session.get(b)
    status = client.get(f"/api/sessions/{session.id}", headers=session.headers).json()
    assert status["calls"]["done"] == 1 and status["variables"] == 2


def test_deleting_a_session_frees_its_contexts(client, local_server):
    session = Session(client)
    a, b = session.var("never used"), session.var()
    waiting = session.var()  # never set: its consumer waits forever
    session.submit([{"text": "Echo "}, {"input": a}, {"output": b, "sampling": GREEDY}],
                   [{"text": "Later "}, {"input": waiting}, {"output": session.var(), "sampling": GREEDY}])
    session.get(b)
    assert client.delete(f"/api/sessions/{session.id}", headers=session.headers).status_code == 204
    engine = local_server.manager.engines[0]
    # The calls are cancelled at once; their contexts' frees reach the engine's thread just after (only warm
    # prefixes stay).
    wait_until(lambda: engine.engine.stats().num_contexts == len(engine.prefixes), 5, "the session's contexts freed")
    assert client.get(f"/api/sessions/{session.id}", headers=session.headers).status_code == 404


# ---- bad input -----------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] or words == error["field"], error


def test_variables_made_in_one_request_come_back_in_order_with_their_values(client):
    session = Session(client)
    body = {"variables": [{"name": "a", "value": "first"}, {"name": "b"}, {"value": "third"}]}
    response = client.post(f"/api/sessions/{session.id}/variables:batchCreate", json=body, headers=session.headers)
    assert response.status_code == 201
    made = response.json()["variables"]
    assert [v["name"] for v in made] == ["a", "b", ""]
    assert session.get(made[0]["var_id"]).json()["value"] == "first"
    assert session.get(made[2]["var_id"]).json()["value"] == "third"
    assert session.get(made[1]["var_id"], timeout=0.1).status_code == 408  # made without a value


def test_an_empty_batch_of_variables_is_400_naming_the_field(client):
    session = Session(client)
    response = client.post(f"/api/sessions/{session.id}/variables:batchCreate", json={"variables": []},
                           headers=session.headers)
    assert response.status_code == 400 and "variables" in response.text


def test_malformed_json_is_400(client):
    assert_error(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "malformed JSON")


def test_unknown_session_is_404(client):
    assert_error(client.get("/api/sessions/nope", headers={"X-Session-Token": "x"}), 404, "session_id")


def test_another_sessions_token_is_403(client):
    mine, theirs = Session(client), Session(client)
    secret = theirs.var("their secret")
    response = client.get(f"/api/sessions/{theirs.id}/variables/{secret}", headers=mine.headers)
    assert_error(response, 403, "session_token")


def test_unknown_variable_is_404(client):
    session = Session(client)
    assert_error(session.get("v-does-not-exist"), 404, "var_id")


def test_a_cycle_is_422_naming_it(client):
    session = Session(client)
    a, b = session.var(), session.var()
    response = session.submit([{"text": "A "}, {"input": a}, {"output": b}], [{"text": "B "}, {"input": b}, {"output": a}])
    assert_error(response, 422, "cycle")


def test_a_variable_produced_twice_is_422(client):
    session = Session(client)
    a = session.var()
    assert_error(session.submit([{"text": "x"}, {"output": a}], [{"text": "y"}, {"output": a}]), 422, "produced twice")



def test_a_refused_graph_names_its_calls_by_their_place_in_the_request(client):
    """Not by ids the server gave them: a refused submission's calls are never returned to the client."""
    session = Session(client)
    a, b, c = session.var(), session.var(), session.var()
    unknown = session.submit([{"text": "x"}, {"output": a}], [{"text": "y"}, {"input": "v-nope"}, {"output": b}])
    assert_error(unknown, 422, "calls.1.template.1.input")
    cycle = session.submit([{"text": "x"}, {"output": c}], [{"text": "A "}, {"input": a}, {"output": b}],
                           [{"text": "B "}, {"input": b}, {"output": a}])
    assert_error(cycle, 422, "calls.1")
    assert "calls.1 -> calls.2 -> calls.1" in cycle.json()["error"]["message"]
    assert_error(session.submit([{"text": "x"}, {"output": c}], [{"text": "y"}, {"output": c}]), 422,
                 "calls.1.template.1.output")

def test_an_input_never_set_times_out_with_408(client):
    session = Session(client)
    never, out = session.var(), session.var()
    session.submit([{"text": "Use "}, {"input": never}, {"output": out, "sampling": GREEDY}])
    assert_error(session.get(out, timeout=0.2), 408, "timeout")
    client.delete(f"/api/sessions/{session.id}", headers=session.headers)  # its call would wait on, in a shared server


def test_a_prompt_longer_than_the_context_is_400(client):
    assert_error(client.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 9000}), 400, "prompt")


def test_an_oversized_body_is_413(client):
    assert_error(client.post("/v1/completions", json={"model": "tiny", "prompt": "x" * (3 * 2**20)}), 413, "bytes")


def test_invalid_sampling_values_are_400_naming_the_field(client):
    session = Session(client)
    out = session.var()
    response = session.submit([{"text": "x"}, {"output": out, "sampling": {"top_p": 0}}])
    assert_error(response, 400, "calls.0.template.1.sampling.top_p")


def test_a_boolean_where_a_graphs_sampling_takes_a_number_is_400_naming_the_field(client):
    session = Session(client)
    response = session.submit([{"text": "x"}, {"output": session.var(), "sampling": {"max_tokens": True}}])
    assert_refused(response, 400, "calls.0.template.1.sampling.max_tokens")


def test_stop_token_ids_outside_the_vocabulary_are_400(client):
    session = Session(client)
    out = session.var()
    assert_error(session.submit([{"text": "x"}, {"output": out, "sampling": {"stop_token_ids": [10**6]}}]),
                 400, "stop_token_ids")


def test_a_fetch_with_a_zero_timeout_returns_a_value_that_is_there(client):
    session = Session(client)
    reply = session.get(session.var("a value"), timeout=0)
    assert reply.status_code == 200 and reply.json()["value"] == "a value"


def test_the_server_answers_good_requests_after_bad_ones(client):
    client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    client.get("/api/sessions/nope")
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


# ---- malformed requests: each a 4xx in the documented shape, naming the field -----------------------------

JSON = {"content-type": "application/json"}


def post_raw(client: httpx.Client, path: str, body: bytes, headers: dict | None = None) -> httpx.Response:
    """A request with a body exactly as given (JSON escapes and literals that a client's encoder would not write)."""
    return client.post(path, content=body, headers={**JSON, **(headers or {})})


@pytest.mark.parametrize("timeout", ["nan", "inf", "-inf", "-1"])
def test_a_nan_timeout_is_refused_naming_the_field(client, timeout):
    session = Session(client)
    assert_refused(session.get(session.var("a value"), timeout=timeout), 400, "timeout")


def test_nan_and_infinite_numbers_in_a_body_are_refused_naming_the_field(client):
    """Python's JSON parser takes `NaN` and `Infinity` literals: the schemas must refuse them themselves."""
    session = Session(client)
    out = session.var()
    calls = b'{"calls": [{"template": [{"text": "x"}, {"output": "%s", "sampling": {"temperature": NaN}}]}]}'
    response = post_raw(client, f"/api/sessions/{session.id}/calls", calls % out.encode(), session.headers)
    assert_refused(response, 400, "calls.0.template.1.sampling.temperature")
    completion = b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "top_p": Infinity}'
    assert_refused(post_raw(client, "/v1/completions", completion), 400, "top_p")


def test_a_lone_surrogate_in_a_variable_name_gets_400_naming_the_field(client):
    session = Session(client)
    response = post_raw(client, f"/api/sessions/{session.id}/variables", b'{"name": "x\\ud800"}', session.headers)
    assert_refused(response, 400, "name")


def test_a_lone_surrogate_in_a_prompt_gets_400_naming_the_field(client):
    assert_refused(post_raw(client, "/v1/completions", b'{"model": "tiny", "prompt": "hi \\udc00"}'), 400, "prompt")
    session = Session(client)
    out = session.var()
    calls = b'{"calls": [{"template": [{"text": "\\ud83d"}, {"output": "%s"}]}]}' % out.encode()
    response = post_raw(client, f"/api/sessions/{session.id}/calls", calls, session.headers)
    assert_refused(response, 400, "calls.0.template.0.text")


def test_a_lone_surrogate_in_a_field_name_gets_400(client):
    session = Session(client)
    response = post_raw(client, f"/api/sessions/{session.id}/variables", b'{"\\ud800": 1}', session.headers)
    assert_refused(response, 400, "body")


def test_deeply_nested_json_gets_the_documented_error_shape(client):
    error = assert_refused(post_raw(client, "/v1/completions", b"[" * 100_000 + b"]" * 100_000), 400, "body")
    assert "recursion" in error["message"]


def test_a_body_that_is_not_utf8_gets_the_documented_error_shape(client):
    error = assert_refused(post_raw(client, "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}'), 400, "body")
    assert "utf-8" in error["message"]


def test_unknown_routes_and_methods_get_the_documented_error_shape(client):
    assert_refused(client.get("/api/no-such-route"), 404, "path")
    response = client.put("/health")
    assert_refused(response, 405, "method")
    assert "GET" in response.headers["allow"]


@pytest.mark.parametrize("head", [[], [{"text": ""}], [{"text": ""}, {"text": ""}]],
                         ids=["only-an-output", "empty-text", "two-empty-texts"])
def test_a_template_with_nothing_before_its_first_output_is_400_naming_it(client, head):
    """Such a call has no prompt to generate from: refused at submission, not failed later by the engine."""
    session = Session(client)
    response = session.submit([*head, {"output": session.var()}, {"text": "after"}])
    assert_refused(response, 400, "calls.0.template")


# ---- observability ---------------------------------------------------------------------------------------


def test_health_and_prometheus_metrics(client):
    client.post("/v1/completions", json={"model": "tiny", "prompt": "Metrics please", "max_tokens": 2})
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics").text
    for name in ("parrot_prefill_tokens_total", "parrot_prefix_reused_tokens_total", "parrot_kv_blocks_used",
                 "parrot_requests", "parrot_queue_length", "parrot_engine_calls"):
        assert name in text
    assert 'parrot_engine_calls{engine="engine-0"}' in text


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_head_is_answered_as_get_without_a_body(client, path):
    """What uptime probes and load balancers send: the same status and headers, and no body."""
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"] and int(head.headers["content-length"]) > 0


def test_metrics_count_the_engine_steps_and_generated_tokens(client):
    def metrics() -> dict[str, float]:
        families = text_string_to_metric_families(client.get("/metrics").text)
        return {sample.name: sample.value for family in families for sample in family.samples}

    body = {"model": "tiny", "prompt": "Count my steps", "max_tokens": 4, "ignore_eos": True}
    before = metrics()
    client.post("/v1/completions", json=body)
    after = metrics()
    # One step prefills the prompt and samples the first token; each of the other three feeds a token back.
    assert after["parrot_decode_tokens_total"] - before["parrot_decode_tokens_total"] == 3
    assert after["parrot_engine_steps_total"] - before["parrot_engine_steps_total"] == 4


def test_a_completion_runs_in_one_context_without_parking_its_prompt_as_a_prefix(client, local_server):
    prefixes = local_server.manager.engines[0].prefixes
    count = len(prefixes)
    body = {"model": "tiny", "prompt": "A prompt no other request has sent before", "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert len(prefixes) == count


def test_openapi_schema_documents_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/sessions", "/api/sessions/{session_id}/calls", "/v1/chat/completions"} <= set(paths)
