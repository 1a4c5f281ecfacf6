"""Graceful shutdown of `parrot-lc serve` (a real process): on SIGTERM (or Ctrl-C) new work gets 503, the work in
flight finishes (or is cancelled at the deadline), contexts are freed, and the process exits 0; a second signal
cancels the work at once and exits 128 + its number."""

import re
import signal
import threading
import time

import httpx
import pytest

from conftest import wait_until


def graph_waiting_for_input(client: httpx.Client) -> tuple[str, dict, str, str]:
    """A session with one call whose input the client has not set yet: work in flight until it is set."""
    session = client.post("/api/sessions").json()
    headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
    given, out = (client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"] for _ in range(2))
    call = {"template": [{"text": "Repeat: "}, {"input": given},
                         {"output": out, "sampling": {"max_tokens": 8, "temperature": 0, "ignore_eos": True}}]}
    assert client.post(f"{base}/calls", json={"calls": [call]}, headers=headers).status_code == 201
    return base, headers, given, out


def refused_after_sigterm(client: httpx.Client) -> httpx.Response:
    """The first answer to a new session that is not 201 (SIGTERM reaches the server within a tick)."""
    deadline = time.monotonic() + 10
    while True:
        response = client.post("/api/sessions")
        if response.status_code != 201 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_sigterm_refuses_new_work_with_503_finishes_work_in_flight_frees_contexts_and_exits_0(serve):
    served = serve("--shutdown-timeout", "20")
    request = {"model": "tiny", "prompt": "Count:", "max_tokens": 200, "stream": True}
    with httpx.Client(base_url=served.url, timeout=30) as client, httpx.Client(base_url=served.url, timeout=30) as other:
        base, headers, given, out = graph_waiting_for_input(client)
        with other.stream("POST", "/v1/completions", json=request) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the completion is running
            served.process.send_signal(signal.SIGTERM)

            refused = refused_after_sigterm(client)
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "ShuttingDownError"
            assert client.get("/health").status_code == 503
            # The graph in flight still runs to the end: its input can be set and its output fetched.
            assert client.put(f"{base}/variables/{given}", json={"value": "x"}, headers=headers).status_code == 204
            assert client.get(f"{base}/variables/{out}", headers=headers).status_code == 200
            # And the streamed completion runs to its end.
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    assert served.process.wait(timeout=30) == 0
    [drained] = [r for r in served.records() if r["message"].startswith("drained")]
    assert drained["calls_finished"] >= 1 and (drained["calls_cancelled"], drained["contexts_left"]) == (0, 0)


def test_the_drain_counts_no_context_of_a_completion_that_finished_while_draining(serve):
    """The completion's session goes as its answer is sent, which ends its call before the engine has answered the
    free of its context (an engine process answers over a pipe: later still); the count comes after the frees."""
    served = serve("--shutdown-timeout", "20", "--engine-processes", "true")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1000, "ignore_eos": True}
    with httpx.Client(base_url=served.url, timeout=60) as client:
        answers = []
        completion = threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json=body)))
        completion.start()
        wait_until(lambda: re.search(r"^parrot_decode_tokens_total [1-9]", client.get("/metrics").text, re.M), 30,
                   "the completion to generate")
        served.process.send_signal(signal.SIGTERM)
        completion.join(timeout=30)
    assert answers[0].status_code == 200 and answers[0].json()["usage"]["completion_tokens"] == 1000
    assert served.process.wait(timeout=30) == 0
    [drained] = [r for r in served.records() if r["message"].startswith("drained")]
    assert (drained["calls_finished"], drained["contexts_left"]) == (1, 0)


def test_sigterm_cancels_the_work_still_running_at_the_deadline_and_exits_0(serve):
    served = serve("--shutdown-timeout", "1")
    with httpx.Client(base_url=served.url, timeout=30) as client:
        base, headers, _, out = graph_waiting_for_input(client)  # its input never comes
        fetched = {}
        fetch = threading.Thread(
            target=lambda: fetched.update(reply=client.get(f"{base}/variables/{out}", headers=headers)))
        fetch.start()
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=20) == 0
        fetch.join(timeout=5)
    assert time.monotonic() - started < 15
    assert fetched["reply"].status_code == 424 and "cancelled" in fetched["reply"].json()["error"]["message"]
    [drained] = [r for r in served.records() if r["message"].startswith("drained")]
    assert (drained["calls_cancelled"], drained["contexts_left"]) == (1, 0)


def test_ctrl_c_drains_as_sigterm_does_and_exits_0_without_a_traceback(serve):
    served = serve("--shutdown-timeout", "20")
    with httpx.Client(base_url=served.url, timeout=30) as client:
        base, headers, given, out = graph_waiting_for_input(client)
        served.process.send_signal(signal.SIGINT)
        assert refused_after_sigterm(client).status_code == 503  # draining: the work in flight still runs
        assert client.put(f"{base}/variables/{given}", json={"value": "x"}, headers=headers).status_code == 204
        assert client.get(f"{base}/variables/{out}", headers=headers).status_code == 200
    assert served.process.wait(timeout=30) == 0
    assert [line for line in served.log.read_text().splitlines() if not line.startswith("{")] == []
    [drained] = [r for r in served.records() if r["message"].startswith("drained")]
    assert (drained["calls_finished"], drained["calls_cancelled"]) == (1, 0)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_second_signal_while_draining_cancels_the_calls_at_once_and_exits_128_plus_its_number(serve, second):
    served = serve("--shutdown-timeout", "30")
    with httpx.Client(base_url=served.url, timeout=30) as client:
        base, headers, given, out = graph_waiting_for_input(client)  # its input never comes: the drain waits 30 s
        fetched = {}
        # Open long-polls, which a graceful stop would wait for too: the call's output, and its input itself.
        fetches = [threading.Thread(target=lambda var=var: fetched.update(
            {var: client.get(f"{base}/variables/{var}", headers=headers)})) for var in (out, given)]
        for fetch in fetches:
            fetch.start()
        served.process.send_signal(signal.SIGTERM)
        assert refused_after_sigterm(client).status_code == 503  # draining
        started = time.monotonic()
        served.process.send_signal(second)
        assert served.process.wait(timeout=20) == 128 + second
        for fetch in fetches:
            fetch.join(timeout=5)
    assert time.monotonic() - started < 5
    # Each fetch is answered with why there is no value, not cut off.
    assert fetched[out].status_code == 424 and "cancelled" in fetched[out].json()["error"]["message"]
    assert fetched[given].status_code == 424 and "server stopped" in fetched[given].json()["error"]["message"]
    records = served.records()
    assert [r["message"] for r in records if r["message"].startswith("second ")] == \
        [f"second {second.name}: stopping now, 1 running call cancelled"]
    # No traceback, in a record or on stderr.
    assert [r for r in records if "exception" in r or r["level"] == "ERROR"] == []
    assert [line for line in served.log.read_text().splitlines() if not line.startswith("{")] == []


def test_sigterm_frees_a_prefix_whose_fill_outlived_its_calls(serve):
    # 16 prompt tokens a step: the shared prefix's fill takes a few hundred steps, and the session goes before it ends.
    served = serve("--max-num-batched-tokens", "16")
    with httpx.Client(base_url=served.url, timeout=30) as client:
        session = client.post("/api/sessions").json()
        headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
        outs = [client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"] for _ in range(2)]
        prefix = " ".join(["hello world"] * 700)  # 1,400 tokens: within the tiny model's context
        calls = [{"template": [{"text": prefix}, {"text": f" question {i}"},
                               {"output": out, "sampling": {"max_tokens": 8, "temperature": 0}}]}
                 for i, out in enumerate(outs)]
        assert client.post(f"{base}/calls", json={"calls": calls}, headers=headers).status_code == 201
        wait_until(lambda: re.search(r"^parrot_prefill_tokens_total [1-9]", client.get("/metrics").text, re.M), 30,
                   "the prefix's fill to begin")
        assert client.delete(base, headers=headers).status_code == 204  # its calls are cancelled; the fill goes on
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=30) == 0
    [drained] = [r for r in served.records() if r["message"].startswith("drained")]
    assert (drained["prefixes_freed"], drained["contexts_left"]) == (1, 0)
