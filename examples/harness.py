"""The harness of the examples: their command line, the LLM, and the eager-versus-deferred comparison."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from langchain_core.runnables import Runnable

from parrot_lc import ParrotLLM
from parrot_lc.integrations.langchain import deferred

DOCUMENT = (Path(__file__).parent / "data" / "harbour_report.txt").read_text()


def parse_args(description: str, max_tokens: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base-url", help="a running Parrot server (default: one in this process)")
    parser.add_argument("--api-key", help="the server's API key, if it has one")
    parser.add_argument("--model", default="smollm2", help="the model of the in-process server")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens per LLM call")
    return parser.parse_args()


def make_llm(args: argparse.Namespace) -> ParrotLLM:
    """Greedy, so that the eager and the deferred run give the same text; without --base-url, on the in-process
    server of --model."""
    return ParrotLLM(base_url=args.base_url, model=None if args.base_url else args.model, api_key=args.api_key,
                     max_tokens=args.max_tokens, temperature=0)


def reused_tokens(llm: ParrotLLM) -> float:
    """The server's parrot_prefix_reused_tokens_total counter."""
    headers = {"Authorization": f"Bearer {llm.api_key.get_secret_value()}"} if llm.api_key else {}
    text = httpx.get(f"{llm.parrot_client().base_url}/metrics", headers=headers).text
    return float(re.search(r"^parrot_prefix_reused_tokens_total (\S+)$", text, re.M).group(1))


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


def compare(build_chain: Callable[[ParrotLLM], Runnable], llm: ParrotLLM, chain_input) -> tuple[str, str]:
    """Runs the chain eagerly (each LLM call a request) and deferred (one graph); prints both and returns them."""
    started = time.perf_counter()
    eager = build_chain(llm).invoke(chain_input)
    eager_s = time.perf_counter() - started

    runnable = deferred(build_chain(llm))
    before = reused_tokens(llm)
    started = time.perf_counter()
    lazy = runnable.invoke(chain_input)
    deferred_s = time.perf_counter() - started
    print(f"Result (deferred):\n{lazy}\n")
    run = runnable.last_run
    print(f"Graph submitted, in {run.submissions} request(s):\n{describe_graph(run.graph)}")
    if run.waits:
        print("Waits:\n" + "\n".join(f"  {wait}" for wait in run.waits))
    print(f"Prefix tokens reused by the deferred run: {reused_tokens(llm) - before:.0f}")
    print(f"Time: eager {eager_s:.2f} s, deferred {deferred_s:.2f} s; same text: {eager == lazy}")
    return eager, lazy
