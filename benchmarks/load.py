"""Load: hundreds of concurrent client sessions against one Parrot server, the tiny model by default.

Every session runs at once. Most submit a small graph through the Parrot API (two map calls that share a
prefix and a reduce call that reads both) and fetch its result; every `--openai-every`-th instead sends an
OpenAI-compatible request (completions and chat, streamed or not). A 429 is retried after its Retry-After,
until `--deadline` seconds have passed since the session began. The report, as JSON:

- completed: sessions that got their result; failed: the server answered with an error (or kept answering 429
  past the deadline); lost: no answer at all (a broken connection, a timeout, a malformed answer). 0 lost is the
  bar.
- rejected: 429 answers seen (each retried); p50_s / p99_s: end-to-end latency of completed sessions.

    python benchmarks/load.py --sessions 300                        # starts a tiny server in this process
    python benchmarks/load.py --sessions 300 --base-url http://127.0.0.1:9000 --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import httpx
from tqdm import tqdm

MAX_TOKENS = 4
MAP_PREFIX = "Summarize this part of a report in one sentence. Part: "


class Rejected(Exception):
    """A 429: retry after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429, retry after {retry_after} s")
        self.retry_after = retry_after


class Failed(Exception):
    """The server answered with an error status."""


@dataclass
class Report:
    sessions: int
    completed: int = 0
    failed: int = 0
    lost: int = 0
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the first few, to say what went wrong

    def as_dict(self, seconds: float) -> dict:
        ordered = sorted(self.latencies)
        return {"sessions": self.sessions, "completed": self.completed, "failed": self.failed, "lost": self.lost,
                "rejected": self.rejected, "p50_s": percentile(ordered, 50), "p99_s": percentile(ordered, 99),
                "seconds": round(seconds, 3), "errors": self.errors[:5]}


def percentile(ordered: list[float], p: float) -> float | None:
    """The nearest-rank percentile of sorted values (None if there are none)."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * p // 100))
    return round(ordered[int(rank) - 1], 4)


def checked(response: httpx.Response) -> httpx.Response:
    """The response if it succeeded; Rejected for a 429, Failed for any other error status."""
    if response.status_code == 429:
        raise Rejected(float(response.headers.get("retry-after", "1")))
    if response.status_code >= 400:
        raise Failed(f"{response.status_code} {response.request.method} {response.request.url.path}: "
                     f"{response.text[:200]}")
    return response


async def graph_session(client: httpx.AsyncClient, index: int) -> None:
    """A session with a map-reduce graph of three calls, submitted in one request, and one fetch."""
    session = checked(await client.post("/api/sessions")).json()
    headers, base = {"X-Session-Token": session["session_token"]}, f"/api/sessions/{session['session_id']}"
    try:
        async def variable(value: str | None = None) -> str:
            body = {} if value is None else {"value": value}
            return checked(await client.post(f"{base}/variables", json=body, headers=headers)).json()["var_id"]

        parts = [await variable(f"part {k} of report {index}: sales grew {index % 7 + k} percent") for k in (1, 2)]
        summaries, final = [await variable(), await variable()], await variable()
        sampling = {"max_tokens": MAX_TOKENS, "temperature": 0}
        calls = [{"template": [{"text": MAP_PREFIX}, {"input": p}, {"output": s, "sampling": sampling}]}
                 for p, s in zip(parts, summaries)]
        calls.append({"template": [{"text": "Combine:\n"}, {"input": summaries[0]}, {"text": "\n"},
                                   {"input": summaries[1]}, {"output": final, "sampling": sampling}]})
        checked(await client.post(f"{base}/calls", json={"calls": calls}, headers=headers))
        value = checked(await client.get(f"{base}/variables/{final}", headers=headers)).json()["value"]
        if not isinstance(value, str):
            raise ValueError(f"a value that is not text: {value!r}")
    finally:  # a session that was refused halfway goes too; a failed delete loses nothing of the result
        await client.delete(base, headers=headers)


async def openai_request(client: httpx.AsyncClient, index: int) -> None:
    """One OpenAI-compatible request: completions or chat, streamed or not, by the session's index."""
    chat, stream = index % 2 == 0, index % 4 < 2
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}  # no model named: the server's own
    if chat:
        body["messages"] = [{"role": "system", "content": "You answer in one word."},
                            {"role": "user", "content": f"Question number {index}?"}]
    else:
        body["prompt"] = f"Request number {index} says"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        choices = checked(await client.post(path, json=body)).json()["choices"]
        if len(choices) != 1:
            raise ValueError(f"{len(choices)} choices")
        return
    async with client.stream("POST", path, json=body) as response:
        if response.status_code >= 400:
            await response.aread()
            checked(response)
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    if lines[-1] != "data: [DONE]":
        raise ValueError("a stream that did not end with [DONE]")


async def one_session(client: httpx.AsyncClient, index: int, run: Callable[[httpx.AsyncClient, int], Awaitable[None]],
                      report: Report, deadline: float) -> None:
    """Runs one session to its end, retrying after 429s, and records its outcome."""
    started = time.monotonic()
    while True:
        try:
            await run(client, index)
        except Rejected as exc:
            report.rejected += 1
            if time.monotonic() - started + exc.retry_after > deadline:
                report.failed += 1
                report.errors.append(f"session {index}: still refused (429) after {deadline} s")
                return
            await asyncio.sleep(exc.retry_after)
            continue
        except Failed as exc:
            report.failed += 1
            report.errors.append(f"session {index}: {exc}")
        except (httpx.TransportError, ValueError, KeyError, IndexError) as exc:  # no answer, or not a valid one
            report.lost += 1
            report.errors.append(f"session {index}: lost: {exc!r}")
        else:
            report.completed += 1
            report.latencies.append(time.monotonic() - started)
        return


async def run_load(base_url: str, sessions: int, openai_every: int = 3, api_key: str | None = None,
                   deadline: float = 120.0, progress: bool = True) -> dict:
    """Runs `sessions` concurrent sessions against the server at `base_url`; returns the report as a dict."""
    report = Report(sessions)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=sessions, max_keepalive_connections=sessions)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(deadline)) as client:
        with tqdm(total=sessions, desc="sessions", unit="session", disable=not progress) as bar:
            async def tracked(index: int) -> None:
                run = openai_request if openai_every and index % openai_every == 0 else graph_session
                await one_session(client, index, run, report, deadline)
                bar.update()
                bar.set_postfix(failed=report.failed, lost=report.lost, rejected=report.rejected)

            await asyncio.gather(*(tracked(i) for i in range(sessions)))
    return report.as_dict(time.monotonic() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=300, help="concurrent sessions")
    parser.add_argument("--openai-every", type=int, default=3, help="every Nth session is an OpenAI request (0: none)")
    parser.add_argument("--base-url", help="a running server (default: start one with --model in this process)")
    parser.add_argument("--api-key")
    parser.add_argument("--model", default="tiny", help="model of the server started here")
    parser.add_argument("--max-queued-calls", type=int, help="of the server started here")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds a session may take, 429 retries included")
    parser.add_argument("--out", help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    if args.base_url is None:
        from parrot_lc.server.local import LocalServer
        from parrot_lc.settings import EngineSettings, ServerSettings

        overrides = {} if args.max_queued_calls is None else {"max_queued_calls": args.max_queued_calls}
        with LocalServer(EngineSettings(model=args.model), ServerSettings(port=0, **overrides)) as server:
            report = asyncio.run(run_load(server.base_url, args.sessions, args.openai_every, None, args.deadline))
    else:
        report = asyncio.run(run_load(args.base_url, args.sessions, args.openai_every, args.api_key, args.deadline))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
