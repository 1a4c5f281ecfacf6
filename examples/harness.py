"""The harness of the examples: their command line, the LLM, and the eager-versus-deferred comparison."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from langchain_core.runnables import Runnable

from parrot_lc import ChatParrot, ParrotLLM
from parrot_lc.integrations.langchain import deferred

DOCUMENT = (Path(__file__).parent / "data" / "harbour_report.txt").read_text()


def parse_args(description: str, max_tokens: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base-url", help="a running Parrot server (default: one in this process)")
    parser.add_argument("--api-key", help="the server's API key, if it has one")
    parser.add_argument("--model", default="smollm2", help="the model of the in-process server")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens per LLM call")
    return parser.parse_args()


def _model_options(args: argparse.Namespace) -> dict:
    """Greedy, so that the eager and the deferred run give the same text; without --base-url, on the in-process
    server of --model."""
    return {"base_url": args.base_url, "model": None if args.base_url else args.model, "api_key": args.api_key,
            "max_tokens": args.max_tokens, "temperature": 0}


def make_llm(args: argparse.Namespace) -> ParrotLLM:
    return ParrotLLM(**_model_options(args))


def make_chat(args: argparse.Namespace) -> ChatParrot:
    return ChatParrot(**_model_options(args))


COUNTERS = ("prefill", "prefix_reused", "prefix_cached")


def _server(model: ParrotLLM | ChatParrot) -> tuple[str, dict[str, str]]:
    """The model's server: its base URL and the headers that carry the API key."""
    headers = {"Authorization": f"Bearer {model.api_key.get_secret_value()}"} if model.api_key else {}
    return model.parrot_client().base_url, headers


def token_counters(model: ParrotLLM | ChatParrot) -> dict[str, float]:
    """The server's counters of prompt tokens: computed, taken from a parent context, taken from the block cache."""
    base_url, headers = _server(model)
    text = httpx.get(f"{base_url}/metrics", headers=headers).text
    return {name: float(re.search(rf"^parrot_{name}_tokens_total (\S+)$", text, re.M).group(1)) for name in COUNTERS}


def reset_prefix_cache(model: ParrotLLM | ChatParrot) -> int:
    """Empties the server's cache of prompts: its idle warm prefix contexts and the cached KV blocks that no context
    holds (`POST /reset_prefix_cache`); returns the blocks it freed."""
    base_url, headers = _server(model)
    response = httpx.post(f"{base_url}/reset_prefix_cache", headers=headers)
    response.raise_for_status()
    return response.json()["freed_blocks"]


def _timed(runnable: Runnable, chain_input, model) -> tuple[object, float, dict[str, float]]:
    reset_prefix_cache(model)  # outside the time: each run starts with an empty cache
    before = token_counters(model)
    started = time.perf_counter()
    result = runnable.invoke(chain_input)
    seconds = time.perf_counter() - started
    return result, seconds, {name: value - before[name] for name, value in token_counters(model).items()}


def _tokens(counted: dict[str, float]) -> str:
    return (f"{counted['prefill']:.0f} prompt tokens computed, {counted['prefix_reused']:.0f} forked from a shared "
            f"prefix, {counted['prefix_cached']:.0f} from the block cache")


def describe_graph(graph: list[dict]) -> str:
    producer = {var: call["call_id"] for call in graph for var in call["outputs"]}
    edges = [(producer[var], call["call_id"]) for call in graph for var in call["inputs"] if var in producer]
    groups: dict[str, list[str]] = {}
    for call in graph:
        if call["task_group"]:
            groups.setdefault(call["task_group"], []).append(call["call_id"])
    critical = [call["call_id"] for call in graph if call["latency_critical"]]
    lines = [f"  nodes: {len(graph)} calls; edges: {len(edges)} ({', '.join(f'{a}->{b}' for a, b in edges[:12])}"
             f"{', ...' if len(edges) > 12 else ''})"]
    lines += [f"  task group {name}: {', '.join(calls)}" for name, calls in groups.items()]
    lines.append(f"  latency-critical: {', '.join(critical) or 'none'}")
    return "\n".join(lines)


def compare(build: Callable[[ParrotLLM | ChatParrot], Runnable], model: ParrotLLM | ChatParrot, chain_input,
            output: Callable[[object], str] = str) -> tuple[str, str]:
    """Runs the application deferred (its calls as graphs of Semantic Variables), then eagerly (each LLM call a
    request, as LangChain runs it); prints what each did and returns both outputs (`output` picks the text). Both
    runs start with an empty cache, neither warm prefix contexts nor cached blocks (the server's
    /reset_prefix_cache before each): the eager run, second, takes none of the prompts that the deferred run
    computed, so neither time gains from the other run."""
    model.invoke("Hello", max_tokens=1)  # starts the in-process server, outside both times
    runnable = deferred(build(model))
    lazy, deferred_s, deferred_tokens = _timed(runnable, chain_input, model)
    eager, eager_s, eager_tokens = _timed(build(model), chain_input, model)
    eager, lazy = output(eager), output(lazy)
    print(f"Result:\n{lazy}\n")
    run = runnable.last_run
    print(f"Graph submitted, in {run.submissions} request(s):\n{describe_graph(run.graph)}")
    if run.waits:
        print("Waits:\n" + "\n".join(f"  {wait}" for wait in run.waits))
    print(f"Deferred: {deferred_s:.2f} s; {_tokens(deferred_tokens)}")
    print(f"Eager:    {eager_s:.2f} s; {_tokens(eager_tokens)}")
    print(f"Same text: {eager == lazy}")
    return eager, lazy
