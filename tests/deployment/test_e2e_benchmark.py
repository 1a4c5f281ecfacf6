"""benchmarks/e2e.py at its smoke scale on the CPU: every workload runs in both modes, and the figures show
what separates them (the benchmark itself runs on the GPU; this keeps the script working)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "e2e.py"
TIMELINE = importlib.util.spec_from_file_location("step_timeline", BENCHMARKS / "step_timeline.py")
step_timeline = importlib.util.module_from_spec(TIMELINE)
TIMELINE.loader.exec_module(step_timeline)


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory) -> Path:
    """Where the smoke run wrote its results (e2e.json, and e2e.png beside it), and its step logs (steps/)."""
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--scale", "smoke", "--hf",
                    "--baselines", "baseline", "baseline_vllm", "--repeats", "2", "--step-logs", str(out.parent / "steps"), "--out", str(out)],
                   check=True, timeout=900, capture_output=True)
    return out


@pytest.fixture(scope="module")
def smoke_run(smoke_out) -> dict:
    return json.loads(smoke_out.read_text())


def test_every_workload_has_both_modes_and_a_speedup(smoke_run):
    workloads = smoke_run["workloads"]
    assert set(workloads) == {"chain_summary", "map_reduce", "shared_prompt_chat", "multi_agent", "gpts", "mixed",
                              "gpts_many", "burst"}
    for name, figures in workloads.items():
        assert {"parrot", "baseline", "speedup"} <= set(figures), name


def test_each_speedup_reads_as_its_target_does(smoke_run):
    """Time: the baseline's over parrot_lc's; throughput: parrot_lc's over the baseline's."""
    w = smoke_run["workloads"]
    for name in ("chain_summary", "multi_agent"):
        assert w[name]["speedup"] == pytest.approx(w[name]["baseline"]["seconds"] / w[name]["parrot"]["seconds"])
    most_chunks = str(max(smoke_run["scale"]["map_chunks"]))
    assert w["map_reduce"]["speedup"] == pytest.approx(
        w["map_reduce"]["baseline"][most_chunks]["seconds"] / w["map_reduce"]["parrot"][most_chunks]["seconds"])
    for name in ("gpts", "gpts_many", "burst"):
        assert w[name]["speedup"] == pytest.approx(w[name]["parrot"]["requests_per_s"]
                                                   / w[name]["baseline"]["requests_per_s"])
    mixed = w["mixed"]
    assert mixed["speedup"] == pytest.approx(mixed["baseline"]["chat_mean_latency_s"]
                                             / mixed["parrot"]["chat_mean_latency_s"])


def test_the_prefix_caching_baseline_takes_the_shared_prompts_blocks_from_its_cache(smoke_run):
    """`baseline_vllm` (request-level, prefix caching; `baseline_apc` differs only in which sequences read a shared
    prefix once, which the engine tests check) serves the apps' and the burst's prompts from its cache, without
    forks; the old baseline caches nothing."""
    against = smoke_run["against"]["baseline_vllm"]
    for name, prompt in (("gpts", "app_prompt_tokens"), ("burst", "burst_prompt_tokens")):
        assert against[name]["baseline"]["reused_tokens"] == 0  # no fork: request-level serving
        assert against[name]["baseline"]["cached_tokens"] >= smoke_run["scale"][prompt]
    assert smoke_run["against"]["baseline"]["gpts"]["baseline"]["cached_tokens"] == 0


def test_only_parrot_reuses_the_shared_system_prompt(smoke_run):
    gpts = smoke_run["workloads"]["gpts"]
    assert gpts["baseline"]["reused_tokens"] == 0
    assert gpts["parrot"]["reused_tokens"] >= smoke_run["scale"]["app_prompt_tokens"]
    assert gpts["parrot"]["prefill_tokens"] < gpts["baseline"]["prefill_tokens"]


def test_agents_fill_the_design_and_codebase_they_all_read_once(smoke_run):
    """Multi-agent prompts share text through variables (the design, the files' code), not only a template's
    constant text: parrot_lc fills it once a round, the baseline once a prompt. Both generate the same tokens."""
    agents = smoke_run["workloads"]["multi_agent"]
    assert agents["baseline"]["reused_tokens"] == 0
    assert agents["parrot"]["reused_tokens"] > agents["parrot"]["prefill_tokens"]
    assert agents["parrot"]["prefill_tokens"] < agents["baseline"]["prefill_tokens"]
    assert agents["parrot"]["decode_tokens"] == agents["baseline"]["decode_tokens"]


def test_transformers_is_timed_on_the_workloads_small_enough_for_it(smoke_run):
    workloads = smoke_run["workloads"]
    assert workloads["chain_summary"]["hf"]["seconds"] > 0
    assert set(workloads["map_reduce"]["hf"]) == set(workloads["map_reduce"]["parrot"])


def test_the_run_draws_its_plot_beside_the_results(smoke_out):
    assert smoke_out.with_suffix(".png").stat().st_size > 10_000


def test_a_repeated_workload_reports_its_median_run_and_every_runs_time(smoke_run):
    for mode in ("parrot", "baseline"):
        gpts = smoke_run["workloads"]["gpts"][mode]
        assert len(gpts["repeats_seconds"]) == 2
        assert gpts["seconds"] == max(gpts["repeats_seconds"])  # of two, the slower


def test_the_step_timeline_of_each_run_adds_up_to_the_engines_counters(smoke_out, smoke_run):
    runs = step_timeline.timeline(smoke_out.parent / "steps", "parrot", ["gpts"])["gpts"]
    median = smoke_run["workloads"]["gpts"]["parrot"]
    [run] = [r for r, seconds in zip(runs, median["repeats_seconds"]) if seconds == median["seconds"]]
    assert (run["prefill_tokens"], run["decode_tokens"]) == (median["prefill_tokens"], median["decode_tokens"])
    assert run["steps"] == median["engine_steps"]
    assert 0 < run["chats"]["first_token_s"][0] <= run["chats"]["done_s"][2] <= run["wall_s"]


def test_runs_of_some_workloads_each_merge_into_one_results_file(smoke_out, smoke_run, tmp_path):
    names = sorted(smoke_run["workloads"])
    parts = []
    for i, part in enumerate((names[:2], names[2:])):
        path = tmp_path / f"part{i}.json"
        path.write_text(json.dumps({**smoke_run, "workloads": {n: smoke_run["workloads"][n] for n in part}}))
        parts.append(str(path))
    out = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(SCRIPT), "--merge", *parts, "--out", str(out)], check=True, timeout=120,
                   capture_output=True)
    assert json.loads(out.read_text()) == smoke_run
    assert out.with_suffix(".png").exists()


def test_results_of_different_scales_do_not_merge(smoke_run, tmp_path):
    paths = [tmp_path / "smoke.json", tmp_path / "other.json"]
    paths[0].write_text(json.dumps(smoke_run))
    paths[1].write_text(json.dumps({**smoke_run, "scale": {**smoke_run["scale"], "chain_chunks": 99}}))
    command = [sys.executable, str(SCRIPT), "--merge", *map(str, paths), "--out", str(tmp_path / "m.json")]
    merged = subprocess.run(command, timeout=120, capture_output=True, text=True)
    assert merged.returncode != 0 and "scales" in merged.stderr
    assert not (tmp_path / "m.json").exists()


@pytest.fixture(scope="module")
def langchain_run(tmp_path_factory) -> dict:
    """The workloads written as LangChain / LangGraph code (`--client langchain`): deferred in parrot mode, eager
    on the request-level baseline."""
    out = tmp_path_factory.mktemp("e2e_langchain") / "e2e.json"
    subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--scale", "smoke",
                    "--client", "langchain", "--workloads", "multi_agent",
                    "--baselines", "baseline", "--out", str(out)], check=True, timeout=600, capture_output=True)
    return json.loads(out.read_text())


def test_langchain_graphs_run_deferred_in_parrot_mode_and_eagerly_on_the_baseline(langchain_run):
    """Deferred, the agents' calls (fanned out by `Send`) reach the server as graphs whose shared prompt beginnings
    are filled once and forked; eagerly on the baseline, each call is its own request and nothing is forked."""
    workloads = langchain_run["workloads"]
    assert workloads["multi_agent"]["parrot"]["reused_tokens"] > 0
    assert workloads["multi_agent"]["baseline"]["reused_tokens"] == 0
