"""Settings come from flags, then PARROT_* environment variables, then a config file, then defaults; a bad
setting is an error that says where it came from and which field it is."""

import json

import pytest
import torch

from parrot_lc.cli import build_parser, load, main
from parrot_lc.settings import EngineProcessSettings, EngineSettings, ProcessSettings, ServerSettings, SettingsError


def settings_of(argv: list[str]):
    return load(build_parser().parse_args(argv), EngineSettings, ServerSettings, ProcessSettings)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "parrot.toml"
    path.write_text('port = 9101\nmax-num-seqs = 7\nlog_format = "json"\n')
    return path


def test_a_flag_wins_over_the_environment_and_the_config_file(config, monkeypatch):
    monkeypatch.setenv("PARROT_PORT", "9102")
    _, server, _ = settings_of(["serve", "--config", str(config), "--port", "9103"])
    assert server.port == 9103


def test_the_environment_wins_over_the_config_file(config, monkeypatch):
    monkeypatch.setenv("PARROT_PORT", "9102")
    _, server, _ = settings_of(["serve", "--config", str(config)])
    assert server.port == 9102


def test_the_config_file_wins_over_the_defaults(config):
    engine, server, process = settings_of(["serve", "--config", str(config)])
    assert (server.port, engine.max_num_seqs, process.log_format) == (9101, 7, "json")
    assert engine.block_size == EngineSettings.model_fields["block_size"].default


def test_parrot_config_names_the_config_file(config, monkeypatch):
    monkeypatch.setenv("PARROT_CONFIG", str(config))
    _, server, _ = settings_of(["serve"])
    assert server.port == 9101


@pytest.mark.parametrize("name, text", [
    ("parrot.yaml", "port: 9104\nengines: 0\n"),
    ("parrot.json", json.dumps({"port": 9104, "engines": 0})),
])
def test_yaml_and_json_config_files_are_read_too(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    _, server, _ = settings_of(["serve", "--config", str(tmp_path / name)])
    assert (server.port, server.engines) == (9104, 0)


def test_a_bad_value_in_the_config_file_is_an_error_naming_the_file_and_the_field(tmp_path, capsys):
    path = tmp_path / "parrot.toml"
    path.write_text('port = "ninety"\n')
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--config", str(path)])
    assert stop.value.code == 2
    assert f"config file {path}: port:" in capsys.readouterr().err


def test_a_bad_environment_variable_is_an_error_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("PARROT_MAX_NUM_SEQS", "0")
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--model", "tiny"])
    assert stop.value.code == 2
    assert "environment variable PARROT_MAX_NUM_SEQS: max_num_seqs:" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [("max_num_sequences = 8\n", "max_num_sequences: unknown setting"),
                                              ("port = \n", "not valid TOML")], ids=["unknown-setting", "not-toml"])
def test_a_bad_config_file_is_an_error_naming_the_file_and_the_problem(tmp_path, capsys, content, problem):
    path = tmp_path / "parrot.toml"
    path.write_text(content)
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(path)])
    assert f"config file {path}: {problem}" in capsys.readouterr().err


def test_a_missing_config_file_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(tmp_path / "absent.toml")])
    assert f"config file {tmp_path / 'absent.toml'}: cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "cuda:", "CUDA", "cpu:0"])
def test_a_bad_device_is_a_one_line_settings_error(monkeypatch, capsys, device):
    monkeypatch.setenv("PARROT_DEVICE", device)
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--model", "tiny"])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("parrot-lc: error: environment variable PARROT_DEVICE: device:") and repr(device) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_cuda_device_on_a_machine_without_cuda_is_a_one_line_settings_error(capsys, device):
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--model", "tiny", "--device", device])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("parrot-lc: error: --device: device:") and "0 CUDA devices" in line


def test_a_nan_header_timeout_is_a_settings_error(monkeypatch, capsys):
    monkeypatch.setenv("PARROT_HEADER_TIMEOUT", "nan")
    with pytest.raises(SystemExit):
        main(["serve"])
    assert "environment variable PARROT_HEADER_TIMEOUT: header_timeout:" in capsys.readouterr().err


def settings_error_of(argv: list[str]) -> str:
    """The message of the settings error that loading `argv`'s settings raises."""
    with pytest.raises(SettingsError) as refused:
        settings_of(argv)
    return str(refused.value)


@pytest.mark.parametrize("name, problem", [("absent.txt", "does not exist"), (".", "is a directory")])
def test_an_api_keys_file_that_cannot_be_read_is_a_settings_error_naming_the_flag(tmp_path, name, problem):
    path = tmp_path / name
    message = settings_error_of(["serve", "--api-keys-file", str(path)])
    assert message.startswith("--api-keys-file: api_keys_file:") and f"{path} {problem}" in message


def test_an_api_keys_file_of_comments_only_is_a_settings_error_naming_the_flag(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# keys go here\n\n")
    message = settings_error_of(["serve", "--api-keys-file", str(path)])
    assert message.startswith("--api-keys-file: api_keys_file:") and f"{path} holds no key" in message


def test_a_step_log_in_a_folder_that_does_not_exist_is_a_settings_error_naming_the_flag(tmp_path):
    path = tmp_path / "absent" / "steps.jsonl"
    message = settings_error_of(["serve", "--step-log", str(path)])
    assert message.startswith("--step-log: step_log:") and f"folder {path.parent} does not exist" in message


def test_a_step_log_that_is_a_directory_is_a_settings_error_naming_the_flag(tmp_path):
    message = settings_error_of(["serve", "--step-log", str(tmp_path)])
    assert message.startswith("--step-log: step_log:") and f"{tmp_path} is a directory" in message


def test_a_cache_dir_that_cannot_be_created_is_a_settings_error_for_a_gguf_model(tmp_path):
    (tmp_path / "a-file").write_text("")
    cache_dir = tmp_path / "a-file" / "cache"  # under a file: nobody, root included, can make it
    message = settings_error_of(["serve", "--model", str(tmp_path / "model.gguf"), "--cache-dir", str(cache_dir)])
    assert message.startswith("--cache-dir: cache_dir:") and f"{cache_dir} cannot be created" in message


@pytest.mark.parametrize("source", ["flag", "environment"])
def test_an_empty_api_key_is_refused_rather_than_opening_the_api(monkeypatch, source):
    if source == "environment":
        monkeypatch.setenv("PARROT_API_KEY", "")  # what `PARROT_API_KEY: ${KEY}` gives with KEY unset
    message = settings_error_of(["serve"] + (["--api-key", ""] if source == "flag" else []))
    named = "--api-key" if source == "flag" else "environment variable PARROT_API_KEY"
    assert message.startswith(f"{named}: api_key:") and "leave it unset to run without a key" in message


@pytest.mark.parametrize("command, variable, settings", [("serve", "PARROT_ENGINE_KEY", ServerSettings),
                                                         ("engine", "PARROT_ENGINE_ENGINE_KEY", EngineProcessSettings)])
def test_an_empty_engine_key_is_refused_rather_than_opening_an_engine(monkeypatch, command, variable, settings):
    monkeypatch.setenv(variable, "")
    with pytest.raises(SettingsError) as refused:
        load(build_parser().parse_args([command]), settings)
    message = str(refused.value)
    assert message.startswith(f"environment variable {variable}: engine_key:") and "leave it unset" in message


@pytest.mark.parametrize("flag, value", [("--metrics-need-api-key", "ture"), ("--prefix-caching", "maybe"),
                                         ("--port", "9o00"), ("--port", "٩٠٠٠"), ("--engine-timeout", "five")])
def test_a_flag_refuses_what_its_environment_variable_refuses_with_the_same_message(monkeypatch, flag, value):
    name = flag[2:].replace("-", "_")
    from_flag = settings_error_of(["serve", flag, value])
    monkeypatch.setenv(f"PARROT_{name.upper()}", value)
    from_environment = settings_error_of(["serve"])
    assert from_flag.startswith(f"{flag}: {name}: ")
    assert from_flag.removeprefix(f"{flag}: ") == \
        from_environment.removeprefix(f"environment variable PARROT_{name.upper()}: ")


@pytest.mark.parametrize("value, meaning", [("on", True), ("yes", True), ("t", True), ("Y", True), ("1", True),
                                            ("off", False), ("no", False), ("f", False), ("FALSE", False)])
def test_a_true_false_flag_takes_the_words_its_environment_variable_takes(monkeypatch, value, meaning):
    _, from_flag, _ = settings_of(["serve", "--metrics-need-api-key", value])
    monkeypatch.setenv("PARROT_METRICS_NEED_API_KEY", value)
    _, from_environment, _ = settings_of(["serve"])
    assert from_flag.metrics_need_api_key is from_environment.metrics_need_api_key is meaning


@pytest.mark.parametrize("flag", ["--manager", "--advertise-url"])
def test_an_engine_url_that_can_never_be_reached_is_an_error_naming_it(flag, capsys):
    """`notaurl` would be a registration retried for ever; a manager that is down (a real URL) is retried."""
    with pytest.raises(SystemExit) as stop:
        main(["engine", "--model", "tiny", flag, "notaurl"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(f"parrot-lc: error: {flag}: ")
