"""The `parrot-lc` console script."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_a_server_on_loopback_that_answers_and_stops_on_sigterm():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "parrot_lc.cli", "serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
         "--kv-cache-bytes", str(16 * 2**20)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
            time.sleep(0.2)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"model": "tiny", "prompt": "Hello", "max_tokens": 3}, timeout=30)
        assert reply.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_demo_on_tiny_prints_answers_and_fork_reuse(capsys):
    from parrot_lc.cli import main

    main(["demo", "--model", "tiny", "--max-tokens", "4"])
    out = capsys.readouterr().out
    assert out.count("Q: ") == 3 and "reused_by_forking=" in out


def test_the_readme_settings_table_is_the_generated_one():
    from pathlib import Path

    from parrot_lc.settings import settings_table

    assert settings_table() in (Path(__file__).parent.parent / "README.md").read_text()
