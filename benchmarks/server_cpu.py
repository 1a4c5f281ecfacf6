"""Server work per token, CPU: many streaming chat users that share one long system prompt, against a
`parrot-lc serve --model tiny` process on the CPU. Every user sends one streamed `/v1/chat/completions` request
(the system prompt, a short question of its own, `--tokens` tokens with EOS ignored) at once; the server's CPU
time during the load is read from /proc, split into its main thread (the event loop: HTTP, SSE, the manager)
and the rest (the engine thread and torch's workers). The client runs in this process, the server in its own.

Reported: server CPU seconds per generated token (all threads, and the event loop alone), wall time of the load,
and per user the time to its first token and its time per token after the first (p50 and p99 over users); the
client's CPU time too, since on a small machine the client, the event loop and the engine share the cores.

    python benchmarks/server_cpu.py --users 200 --tokens 64
    python benchmarks/server_cpu.py --users 200 --tokens 64 --system-words 100   # a short prompt: cheap engine steps
    python benchmarks/server_cpu.py --users 200 --tokens 64 --profile /tmp/serve.prof   # cProfile of the server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from workloads import WORDS
from load import percentile
from served import ServeProcess, cpu_seconds


@dataclass
class UserRun:
    prompt_tokens: int
    first_token_s: float
    per_token_s: float
    completion_tokens: int


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_session(base_url: str, connections: int) -> aiohttp.ClientSession:
    """The users' client: aiohttp, whose C parser reads a stream for a fifth of httpx's CPU (on this machine the
    client shares the cores with the server)."""
    return aiohttp.ClientSession(base_url, connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=600))


async def chat(client: aiohttp.ClientSession, system: str, question: str, tokens: int) -> UserRun:
    body = {"model": "tiny", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    start = time.perf_counter()
    first = None
    usage = {}
    async with client.post("/v1/chat/completions", json=body, raise_for_status=True) as response:
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    generated = usage["completion_tokens"]
    first = first or end
    return UserRun(usage["prompt_tokens"], first - start, (end - first) / max(1, generated - 1), generated)


def system_prompt(words: int) -> str:
    return " ".join(random.Random(0).choice(WORDS) for _ in range(words))


async def warm_up(base_url: str, system_words: int) -> None:
    """Fills the shared prefix and warms the code paths, before the CPU counters are read."""
    async with client_session(base_url, 1) as client:
        await chat(client, system_prompt(system_words), "warm up", 2)


async def load(base_url: str, users: int, tokens: int, system_words: int) -> dict:
    rng = random.Random(1)
    system = system_prompt(system_words)
    questions = [" ".join(rng.choice(WORDS) for _ in range(16)) + "?" for _ in range(users)]
    async with client_session(base_url, users) as client:
        started = time.perf_counter()
        runs = await asyncio.gather(*(chat(client, system, q, tokens) for q in questions))
        wall = time.perf_counter() - started
    first, per_token = sorted(r.first_token_s for r in runs), sorted(r.per_token_s for r in runs)
    return {"users": users, "prompt_tokens": runs[0].prompt_tokens, "tokens_per_user": tokens,
            "generated_tokens": sum(r.completion_tokens for r in runs), "wall_s": wall,
            "first_token_p50_s": percentile(first, 50), "first_token_p99_s": percentile(first, 99),
            "per_token_p50_s": percentile(per_token, 50), "per_token_p99_s": percentile(per_token, 99)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=64, help="tokens each user's answer has")
    parser.add_argument("--system-words", type=int, default=1250,
                        help="words of the shared system prompt (1250: about 4,100 tokens, as in e2e.py's chat)")
    parser.add_argument("--profile", type=Path, help="run the server under cProfile, writing its stats here")
    args = parser.parse_args(argv)
    with ServeProcess("--model", "tiny", "--device", "cpu", profile=args.profile) as server:
        asyncio.run(warm_up(server.base_url, args.system_words))
        cpu_before, loop_before = cpu_seconds(server.pid)
        client_before = client_cpu_seconds()
        report = asyncio.run(load(server.base_url, args.users, args.tokens, args.system_words))
        cpu_after, loop_after = cpu_seconds(server.pid)
        client_cpu = client_cpu_seconds() - client_before
    generated = report["generated_tokens"]
    report.update(server_cpu_s=cpu_after - cpu_before, event_loop_cpu_s=loop_after - loop_before,
                  server_cpu_ms_per_token=1000 * (cpu_after - cpu_before) / generated,
                  event_loop_cpu_ms_per_token=1000 * (loop_after - loop_before) / generated, client_cpu_s=client_cpu)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}, indent=2))
    return report


if __name__ == "__main__":
    main()
