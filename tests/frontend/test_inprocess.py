"""In-process mode: the same client API against a server started inside this process."""

import os
import subprocess
import sys

import pytest

import parrot_lc
from parrot_lc.settings import SettingsError


def test_connect_runs_semantic_functions_in_process():
    client = parrot_lc.connect("tiny")
    double = parrot_lc.SemanticFunction.from_template("Say {{input:x}} twice:{{output:y}}", max_tokens=3, temperature=0)
    with client.session():
        assert isinstance(double("hello").get(), str)
    assert parrot_lc.connect("tiny").base_url == client.base_url  # one server per model, shared


def test_an_empty_parrot_api_key_is_a_settings_error_naming_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("PARROT_API_KEY", "")  # `PARROT_API_KEY=${KEY}` with KEY unset
    # A model no other test started, so that its server would start now (none does: its settings come first).
    with pytest.raises(SettingsError, match=r"^environment variable PARROT_API_KEY: api_key: .*empty"):
        parrot_lc.connect(str(tmp_path / "model"))


def test_the_in_process_server_listens_on_loopback_whatever_parrot_host_says():
    """It serves this process; a container's PARROT_HOST=0.0.0.0 (meant for `parrot-lc serve`) must not open it."""
    code = "import parrot_lc; print(parrot_lc.connect('tiny').base_url)"
    env = {**os.environ, "PARROT_HOST": "0.0.0.0", "PARROT_PORT": "9000"}
    url = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert url.startswith("http://127.0.0.1:") and not url.strip().endswith(":9000")


def test_importing_the_client_does_not_load_torch():
    code = "import sys, parrot_lc; parrot_lc.ParrotClient; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_small_request_to_the_local_server_takes_no_delayed_ack_stall(parrot_server):
    """With Nagle's algorithm on, a response written in two parts waited for the client's delayed ACK: about 40
    ms a request on loopback, 20 times the request itself."""
    import statistics
    import time

    import httpx

    with httpx.Client(base_url=parrot_server) as http:
        http.get("/health")  # the connection, opened once
        times = []
        for _ in range(9):
            start = time.perf_counter()
            http.get("/health").raise_for_status()
            times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.02, f"median {statistics.median(times) * 1e3:.1f} ms"
