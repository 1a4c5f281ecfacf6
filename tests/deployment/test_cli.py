"""The `parrot-lc` console script."""

import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from conftest import ROOT, Served, wait_until


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


def test_the_settings_table_marks_each_row_with_the_commands_whose_flag_it_is():
    from parrot_lc.cli import build_parser
    from parrot_lc.settings import settings_table

    rows = [line.split("|")[1:3] for line in settings_table().splitlines()[2:]]  # the setting, its commands
    [commands] = [action for action in build_parser()._actions if action.choices]
    for command in ("serve", "engine", "demo"):
        flags = [flag for action in commands.choices[command]._actions for flag in action.option_strings
                 if action.dest not in ("help", "max_tokens")]  # demo's --max-tokens is no setting
        marked = [setting.strip(" `") for setting, marks in rows if f"`{command}`" in marks]
        assert sorted(marked) == sorted(flags), command  # each once: serve's --port is not engine's


def test_a_model_that_cannot_be_loaded_is_a_one_line_error(tmp_path, capsys):
    from parrot_lc.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["demo", "--model", str(tmp_path / "nonexistent")])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("parrot-lc: error: model ") and "nonexistent" in line


def expected_cpu_backend() -> str:
    """What `auto` chooses on this machine's CPU: the compiled decode kernel where it is built and usable."""
    from parrot_lc.engine import cpu_kernels

    return "cpu" if cpu_kernels.available() else "torch"


def test_serve_logs_what_it_serves_once_and_exits_without_third_party_warnings(tmp_path):
    served = Served(tmp_path / "serve.log")
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0
    records = served.records()
    [start] = [r for r in records if served.url in r["message"]]  # the address, once
    assert start["message"].startswith("serving tiny at ") and start["model"] == "tiny"
    [engine] = start["engines"]
    assert {key: engine[key] for key in ("model", "device", "dtype", "attention_backend")} == \
        {"model": "tiny", "device": "cpu", "dtype": "float32", "attention_backend": expected_cpu_backend()}
    assert engine["weights"] in ("float32", "float16", "bfloat16") and engine["kv_capacity_tokens"] > 0
    assert str(engine["kv_capacity_tokens"]) in start["message"] and engine["weights"] in start["message"]
    # Every line is one of ours: no warnings of other packages, at start or at exit (nanobind's "leaked").
    assert [line for line in served.log.read_text().splitlines() if not line.startswith("{")] == []


@pytest.mark.parametrize("command", ["serve", "engine", "demo"])
def test_every_flag_of_a_command_names_its_default(command):
    from parrot_lc.cli import build_parser

    [commands] = [action for action in build_parser()._actions if action.choices]
    flags = [action for action in commands.choices[command]._actions if action.dest != "help"]
    assert flags and [action.dest for action in flags if "(default: " not in action.help] == []


def test_help_loads_no_model_code():
    # What made `parrot-lc --help` take 3.5 s: torch and the engine, imported by the command line itself.
    code = ("import sys\nfrom parrot_lc.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n"
            "    pass\nassert not {'torch', 'parrot_lc.engine.engine'} & set(sys.modules), 'imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def refusal(*args: str) -> str:
    """The one line that `parrot-lc ARGS` writes when it refuses to start: exit code 2, no traceback."""
    result = subprocess.run([sys.executable, "-m", "parrot_lc.cli", *args], capture_output=True, text=True, timeout=90)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    return line


@pytest.mark.parametrize("flag, value", [
    ("--api-keys-file", "{tmp}/absent.txt"), ("--api-keys-file", "{tmp}"), ("--api-keys-file", "{tmp}/comments.txt"),
    ("--step-log", "{tmp}/absent/steps.jsonl"), ("--step-log", "{tmp}"), ("--cache-dir", "{tmp}/a-file/cache"),
], ids=["keys-file-missing", "keys-file-a-directory", "keys-file-without-a-key", "step-log-folder-missing",
        "step-log-a-directory", "cache-dir-under-a-file"])
def test_a_bad_path_setting_stops_serve_with_one_line_naming_the_flag_before_the_model_loads(tmp_path, flag, value):
    (tmp_path / "comments.txt").write_text("# no key yet\n")
    (tmp_path / "a-file").write_text("")
    # A model that does not exist: were the path checked only once the model loaded, the error would name the model.
    line = refusal("serve", "--model", str(tmp_path / "model.gguf"), flag, value.format(tmp=tmp_path))
    assert line.startswith(f"parrot-lc: error: {flag}: {flag[2:].replace('-', '_')}:")


@pytest.mark.parametrize("command", ["serve", "engine", "demo"])
def test_a_kv_cache_larger_than_memory_is_a_one_line_error_naming_kv_cache_bytes(command):
    line = refusal(command, "--model", "tiny", "--device", "cpu", "--kv-cache-bytes", str(10**15))
    assert line.startswith("parrot-lc: error: --kv-cache-bytes (or PARROT_KV_CACHE_BYTES): kv_cache_bytes: ")
    assert f"a KV cache of {10**15} bytes" in line and "does not fit in memory next to the model's weights" in line


@pytest.mark.parametrize("command", ["serve", "engine", "demo"])
def test_weights_larger_than_memory_are_a_one_line_error_naming_the_weights_not_kv_cache_bytes(command,
                                                                                              oversized_checkpoint):
    line = refusal(command, "--model", str(oversized_checkpoint), "--load-format", "dummy", "--device", "cpu",
                   "--kv-cache-bytes", str(2**20))  # a KV cache that would fit: not the one to blame
    assert line.startswith(f"parrot-lc: error: model {str(oversized_checkpoint)!r}: its weights do not fit in cpu "
                           "memory (")
    assert "--kv-cache-bytes" not in line


@pytest.mark.parametrize("engines", ["1", "0"])
def test_a_model_without_a_tokenizer_is_a_one_line_error_of_serve(hf_checkpoint, engines):
    """Its weights load (an engine process of it can serve a manager of the same model), but the server reads
    prompts and writes text with the tokenizer: refused before it listens, not a traceback from its routes."""
    path, _ = hf_checkpoint("llama")  # save_pretrained writes no tokenizer
    line = refusal("serve", "--model", str(path), "--device", "cpu", "--engines", engines, "--engine-key", "k3y")
    assert line == (f"parrot-lc: error: model {str(path)!r} has no tokenizer (tokenizer.json or tokenizer_config.json "
                    "beside its weights): the server needs one to read prompts and write text")


@pytest.mark.parametrize("keyed", [True, False], ids=["with-a-key", "open"])
def test_the_start_up_line_says_whether_requests_need_an_api_key(tmp_path, keyed):
    served = Served(tmp_path / "serve.log", *(["--api-key", "secret"] if keyed else []))
    served.stop()
    [start] = [r for r in served.records() if r["message"].startswith("serving ")]
    assert start["api_key_required"] is keyed
    assert ("requests need an API key" if keyed else "requests need no API key") in start["message"]


@pytest.mark.parametrize("flag, value", [("--metrics-need-api-key", "ture"), ("--prefix-caching", "maybe")])
def test_a_true_false_flag_given_another_word_stops_serve_with_one_line_naming_the_flag(tmp_path, flag, value):
    # A model that does not exist: were the value not refused, the error would name the model.
    line = refusal("serve", "--model", str(tmp_path / "model.gguf"), flag, value)
    assert line == f"parrot-lc: error: {flag}: {flag[2:].replace('-', '_')}: Input should be a valid boolean, " \
                   "unable to interpret input"


@pytest.mark.parametrize("command, variable", [("serve", "PARROT_PORT"), ("engine", "PARROT_ENGINE_PORT")])
def test_a_port_in_use_stops_the_command_with_one_line_naming_the_port_before_the_model_loads(tmp_path, command,
                                                                                             variable):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = refusal(command, "--model", str(tmp_path / "model.gguf"), "--port", str(port))
    assert line == f"parrot-lc: error: --port (or {variable}): port: cannot listen on 127.0.0.1:{port}: Address " \
                   "already in use"


def test_a_host_that_is_not_this_machines_stops_serve_with_one_line_naming_the_host_before_the_model_loads(tmp_path):
    line = refusal("serve", "--model", str(tmp_path / "model.gguf"), "--host", "192.0.2.1")  # TEST-NET-1: nobody's
    assert line.startswith("parrot-lc: error: --host (or PARROT_HOST): host: cannot listen on 192.0.2.1:9000: ")


def test_serve_on_port_0_listens_on_a_free_port_that_its_start_up_line_names(tmp_path):
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "parrot_lc.cli", "serve", "--model", "tiny", "--device", "cpu", "--kv-cache-bytes",
         str(16 * 2**20), "--port", "0", "--log-format", "json"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    def start_lines() -> list[dict]:
        records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return [record for record in records if record["message"].startswith("serving ")]

    try:
        wait_until(lambda: start_lines() or process.poll() is not None, 60, "the start-up line")
        [start] = start_lines()
        assert not start["url"].endswith(":0")
        assert httpx.get(f"{start['url']}/health", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_of_two_servers_that_bound_one_port_at_once_the_second_to_listen_gets_the_port_in_use_error():
    from parrot_lc.server.connections import listen, reserved_socket
    from parrot_lc.settings import ServerSettings, SettingsError

    with reserved_socket(ServerSettings, "127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        with reserved_socket(ServerSettings, "127.0.0.1", port) as second:  # neither listens yet: both may bind
            listen(first, ServerSettings)
            with pytest.raises(SettingsError) as refused:
                listen(second, ServerSettings)
    assert str(refused.value) == f"--port (or PARROT_PORT): port: cannot listen on 127.0.0.1:{port}: Address already " \
                                 "in use"
