"""Every HTTP request has an id, returned in the `X-Request-Id` header and carried by the log records made while
serving it (as text or JSON lines)."""

import io
import json
import logging
import time

import pytest

from parrot_lc.logs import JsonFormatter, RequestIdFilter


@pytest.fixture
def records(caplog):
    """The records of parrot_lc's loggers, with request ids as the server's log handler gives them."""
    caplog.set_level(logging.INFO, logger="parrot_lc")
    caplog.handler.addFilter(RequestIdFilter())
    return caplog


def logged(records, logger: str, request_id: str) -> list[logging.LogRecord]:
    """The records of `logger` with that id; waits a little for them, since the server logs a request just
    after its response has gone out (in its own thread)."""
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in records.records if r.name == logger and r.request_id == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_each_response_carries_a_fresh_request_id(client):
    ids = [client.get("/health").headers["X-Request-Id"] for _ in range(2)]
    assert all(len(i) == 32 for i in ids) and ids[0] != ids[1]


def test_a_sane_client_request_id_is_echoed(client):
    assert client.get("/health", headers={"X-Request-Id": "trace-42.a:b"}).headers["X-Request-Id"] == "trace-42.a:b"


@pytest.mark.parametrize("sent", ["has space", "x" * 129, "-starts-with-a-dash", "quote\"s"])
def test_an_odd_client_request_id_is_replaced_by_a_fresh_one(client, sent):
    received = client.get("/health", headers={"X-Request-Id": sent}).headers["X-Request-Id"]
    assert received != sent and len(received) == 32


def test_an_error_response_carries_the_request_id_too(client):
    response = client.get("/api/sessions/nope", headers={"X-Request-Id": "failing-1"})
    assert response.status_code == 404 and response.headers["X-Request-Id"] == "failing-1"


def test_health_probes_are_logged_at_debug_and_requests_at_info(client, records):
    records.set_level(logging.DEBUG, logger="parrot_lc")
    client.get("/health", headers={"X-Request-Id": "probe-1"})
    client.get("/api/sessions/nope", headers={"X-Request-Id": "request-1"})
    [probe] = logged(records, "parrot_lc.access", "probe-1")
    [request] = logged(records, "parrot_lc.access", "request-1")
    assert (probe.levelno, request.levelno) == (logging.DEBUG, logging.INFO)


def test_the_log_record_of_a_failed_request_carries_its_id(client, records):
    client.get("/api/sessions/nope", headers={"X-Request-Id": "failing-2"})
    [record] = logged(records, "parrot_lc.access", "failing-2")
    assert (record.status, record.path) == (404, "/api/sessions/nope")


def test_a_graph_call_that_fails_is_logged_with_the_id_of_the_request_that_submitted_it(client, records):
    session = client.post("/api/sessions").json()
    headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
    text, out = (client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"] for _ in range(2))
    call = {"template": [{"input": text}, {"output": out, "sampling": {"max_tokens": 2}}]}
    submitted = client.post(f"{base}/calls", json={"calls": [call]}, headers={**headers, "X-Request-Id": "submit-3"})
    assert submitted.status_code == 201
    # More tokens than the tiny model's context: the call fails when it runs (in the server, after this request).
    client.put(f"{base}/variables/{text}", json={"value": "word " * 9000}, headers=headers)
    assert client.get(f"{base}/variables/{out}", headers=headers).status_code == 424
    failures = [r for r in records.records if r.name == "parrot_lc.manager" and "failed" in r.getMessage()]
    assert [r.request_id for r in failures] == ["submit-3"]


def test_json_log_lines_carry_the_request_id(client):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("parrot_lc.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        client.get("/api/sessions/nope", headers={"X-Request-Id": "json-4"})
        deadline = time.monotonic() + 5  # the server logs the request just after its response has gone out
        while '"json-4"' not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert (line["request_id"], line["status"], line["level"], line["logger"]) == ("json-4", 404, "INFO",
                                                                                  "parrot_lc.access")
