"""The `parrot-lc` console script."""

import signal

import httpx
import pytest

from conftest import ROOT, Served


def test_serve_starts_a_server_on_loopback_that_answers_and_stops_on_sigterm(tmp_path):
    served = Served(tmp_path / "serve.log")
    try:
        reply = httpx.post(f"{served.url}/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3},
                           timeout=30)
        assert reply.json()["usage"]["completion_tokens"] == 3
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=30) == 0


def test_demo_on_tiny_prints_answers_and_fork_reuse(capsys):
    from parrot_lc.cli import main

    main(["demo", "--model", "tiny", "--max-tokens", "4"])
    out = capsys.readouterr().out
    assert out.count("Q: ") == 3 and "reused_by_forking=" in out


def test_the_readme_settings_table_is_the_generated_one():
    from pathlib import Path

    from parrot_lc.settings import settings_table

    assert settings_table() in (ROOT / "README.md").read_text()


def test_a_model_that_cannot_be_loaded_is_a_one_line_error(tmp_path, capsys):
    from parrot_lc.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["demo", "--model", str(tmp_path / "nonexistent")])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("parrot-lc: error: model ") and "nonexistent" in line
