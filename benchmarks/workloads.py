"""The end-to-end workloads of the Parrot paper, as one server mode runs them (`Driver`): chain summary, map-reduce,
shared-prompt chat, multi-agent rounds, GPTs-like apps and a mixed load, at a `Scale`; and two of ours, GPTs-like
at many users and a burst of requests for new apps with long prompts. `e2e.py` runs them against each server mode;
other scripts take their text from here."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable

import aiohttp
import httpx

from parrot_lc.frontend import AsyncParrotClient, SemanticFunction
from parrot_lc.settings import EngineSettings
from served import EngineCounters, ServeProcess, metrics

WORKLOADS = ("chain_summary", "map_reduce", "shared_prompt_chat", "multi_agent", "gpts", "mixed", "gpts_many", "burst")
# The workloads timed as one run (`seconds`), which `--repeats` runs again in the same server.
REPEATABLE = ("chain_summary", "multi_agent", "gpts", "gpts_many", "burst")
# The workloads of requests for several apps' prompts at once, read as requests a second.
APP_WORKLOADS = ("gpts", "gpts_many", "burst")

@dataclass
class Scale:
    """Sizes of every workload, in tokens unless named otherwise."""

    chunk_tokens: int = 1024
    chain_chunks: int = 8
    summary_tokens: int = 64
    map_chunks: list[int] = field(default_factory=lambda: [8, 16, 32])
    system_tokens: int = 4096
    chat_users: list[int] = field(default_factory=lambda: [8])  # and the baseline's largest batch, and 10x it
    # (parrot_lc also runs 2x, 4x, 6x and 8x it)
    max_chat_users: int = 256  # the engine's max_num_seqs
    query_tokens: int = 64
    answer_tokens: int = 64
    agent_files: int = 16
    role_tokens: int = 1024
    design_tokens: int = 256
    code_tokens: int = 256
    review_tokens: int = 128
    apps: int = 4
    app_prompt_tokens: int = 3072
    gpts_requests: int = 128
    gpts_answer_tokens: int = 32
    gpts_many_requests: int = 230  # GPTs-like at the chat's most users: several prefixes at high fan-out
    burst_apps: int = 4  # new apps whose prompts are longer than an engine step's token budget (e2e: 4,096)
    burst_prompt_tokens: int = 5120  # 4 of them within the warm-prefix budget (a quarter of a 48 GiB cache)
    burst_requests: int = 128
    burst_answer_tokens: int = 32
    mixed_chats: int = 8
    mixed_jobs: int = 2
    mixed_job_chunks: int = 16


SCALES = {
    "full": Scale(),
    "smoke": Scale(chunk_tokens=48, chain_chunks=2, summary_tokens=4, map_chunks=[2, 3], system_tokens=96,
                   chat_users=[2], max_chat_users=6, query_tokens=8, answer_tokens=4, agent_files=2, role_tokens=32,
                   design_tokens=4, code_tokens=4, review_tokens=4, apps=2, app_prompt_tokens=64, gpts_requests=4,
                   gpts_answer_tokens=4, gpts_many_requests=6, burst_apps=2, burst_prompt_tokens=96, burst_requests=4,
                   burst_answer_tokens=4, mixed_chats=2, mixed_jobs=1, mixed_job_chunks=2),
}

CHAIN_INSTRUCTION = "Summarize the report so far, given the summary of what came before.\n"
MAP_INSTRUCTION = "Summarize this part of a harbour authority's report in one sentence.\n"
REDUCE_INSTRUCTION = "Here are summaries of the parts of a report. Summarize the whole report.\n"
# The paper's speedups (over its own baselines): the bar each workload's `speedup` is read against.
TARGETS = {"chain_summary": 1.3, "map_reduce": 2.3, "shared_prompt_chat": 10, "multi_agent": 10, "gpts": 10}

WORDS = ("harbour ship crane grain timber fish dock warehouse council storm river valley engineer report "
         "cargo tonnes winter summer repair budget plan decade traffic fleet herring cod port master road").split()


class Text:
    """Prompt text of a given token length (random words, cut to the length with the model's tokenizer)."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def __call__(self, tokens: int) -> str:
        words = " ".join(self.rng.choice(WORDS) for _ in range(tokens))
        return self.tokenizer.decode(self.tokenizer(words).input_ids[:tokens])


class Driver:
    """Runs the workloads against one server, in the way of its mode."""

    def __init__(self, server: ServeProcess, tokenizer, scale: Scale, parrot: bool) -> None:
        self.server, self.scale, self.parrot = server, scale, parrot
        self.text = Text(tokenizer)
        # aiohttp for the requests that LangChain-style clients send one by one: its C parser reads a stream for a
        # fifth of httpx's CPU, and at hundreds of streams a client slower than the server would be measured.
        self.http = aiohttp.ClientSession(server.base_url, connector=aiohttp.TCPConnector(limit=1024),
                                          timeout=aiohttp.ClientTimeout(total=3600))
        self.client = AsyncParrotClient(server.base_url, timeout=3600)
        self.model = server.model()
        # Each chat's start, first token and end on the wall clock, when a step log is kept: a request's
        # timeline beside the engine's steps.
        self.chat_times: list[list[float]] | None = None

    # ---- the two ways to call the model ----------------------------------------------------------------

    async def complete(self, prompt: str, max_tokens: int) -> str:
        """One LLM call as its own request (/v1/completions), as LangChain's OpenAI LLM sends it."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        async with self.http.post("/v1/completions", json=body, raise_for_status=True) as response:
            return (await response.json())["choices"][0]["text"]

    async def chat(self, system: str, user: str, max_tokens: int) -> dict[str, float]:
        """One streamed chat request (both modes: an unmodified OpenAI client); its latency figures."""
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        start = time.perf_counter()
        first = None
        async with self.http.post("/v1/chat/completions", json=body, raise_for_status=True) as response:
            async for line in response.content:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    first = first or time.perf_counter()
        end = time.perf_counter()
        if self.chat_times is not None:
            epoch = time.time() - end
            self.chat_times.append([round(epoch + t, 6) for t in (start, first or end, end)])
        # Per output token after the first (the decode pace the user sees).
        per_token = (end - first) / max(1, max_tokens - 1) if first else float("nan")
        return {"latency_s": end - start, "first_token_s": (first or end) - start, "per_token_s": per_token}

    async def timed(self, work: Awaitable[Any]) -> dict[str, Any]:
        """The seconds `work` takes, and the engine's counters over it."""
        with EngineCounters(self.server.base_url) as stats:
            start = time.perf_counter()
            await work
            seconds = time.perf_counter() - start
        return {"seconds": seconds, **stats.figures()}

    def function(self, template: str, max_tokens: int) -> SemanticFunction:
        return SemanticFunction.from_template(template, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    # ---- workloads -----------------------------------------------------------------------------------

    async def chain_summary(self) -> dict[str, Any]:
        s = self.scale
        chunks = [self.text(s.chunk_tokens) for _ in range(s.chain_chunks)]
        instruction = CHAIN_INSTRUCTION
        return await self.timed(self._chain(chunks, instruction))

    async def _chain(self, chunks: list[str], instruction: str) -> None:
        s = self.scale
        if self.parrot:
            step = self.function(instruction + "Previous summary: {{input:previous}}\nPart: {{input:chunk}}\n"
                                 "Summary:{{output:summary}}", s.summary_tokens)
            async with self.client.session() as session:
                async with session.graph():
                    summary = session.variable("start", "none")
                    for chunk in chunks:
                        summary = step(summary, chunk)
                await summary.aget()
        else:
            summary = "none"
            for chunk in chunks:
                summary = await self.complete(f"{instruction}Previous summary: {summary}\nPart: {chunk}\nSummary:",
                                              s.summary_tokens)

    async def map_reduce_once(self, chunks: list[str], criterion: str = "latency") -> float:
        s = self.scale
        map_instruction, reduce_instruction = MAP_INSTRUCTION, REDUCE_INSTRUCTION
        start = time.perf_counter()
        if self.parrot:
            summarize = self.function(map_instruction + "Part: {{input:chunk}}\nSummary:{{output:summary}}",
                                      s.summary_tokens)
            combine = self.function(reduce_instruction + "".join(f"- {{{{input:s{i}}}}}\n" for i in range(len(chunks)))
                                    + "Summary:{{output:final}}", s.summary_tokens)
            async with self.client.session() as session:
                async with session.graph():
                    final = combine(*[summarize(chunk) for chunk in chunks])
                await final.aget(criterion)
        else:
            parts = await asyncio.gather(*(self.complete(f"{map_instruction}Part: {c}\nSummary:", s.summary_tokens)
                                           for c in chunks))
            await self.complete(reduce_instruction + "".join(f"- {p}\n" for p in parts) + "Summary:",
                                s.summary_tokens)
        return time.perf_counter() - start

    async def map_reduce(self) -> dict[str, Any]:
        result = {}
        for n in self.scale.map_chunks:
            chunks = [self.text(self.scale.chunk_tokens) for _ in range(n)]
            result[str(n)] = await self.timed(self.map_reduce_once(chunks))
        return result

    async def shared_prompt_chat(self) -> dict[str, Any]:
        s = self.scale
        system = self.text(s.system_tokens)
        # The users whose whole prompts and answers fit in the KV cache at once: the baseline's largest batch.
        with httpx.Client(base_url=self.server.base_url) as scraper:
            kv = metrics(scraper)
        block_size = EngineSettings.model_fields["block_size"].default  # the server runs with the default
        per_user = s.system_tokens + s.query_tokens + s.answer_tokens + 2 * block_size
        blocks = kv["parrot_kv_blocks_used"] + kv["parrot_kv_blocks_free"]
        fit = min(s.max_chat_users, int(blocks) * block_size // per_user)
        await self.chat(system, self.text(s.query_tokens), 2)  # the first user warms the prefix in parrot mode
        result: dict[str, Any] = {"baseline_fit_users": fit}
        counts = {*s.chat_users, fit, min(s.max_chat_users, 10 * fit)}
        if self.parrot:  # steps between, to find the most users at the baseline's pace (the baseline's stay queued)
            counts |= {min(s.max_chat_users, k * fit) for k in (2, 4, 6, 8)}
        for users in sorted(counts):
            with EngineCounters(self.server.base_url) as stats:
                runs = await asyncio.gather(*(self.chat(system, self.text(s.query_tokens), s.answer_tokens)
                                              for _ in range(users)))
            latencies = sorted(r["latency_s"] for r in runs)
            result[str(users)] = {
                "mean_latency_s": statistics.mean(latencies),
                "p99_latency_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                "mean_first_token_s": statistics.mean(r["first_token_s"] for r in runs),
                "mean_per_token_s": statistics.mean(r["per_token_s"] for r in runs),
                **stats.figures(),
            }
        return result

    async def multi_agent(self) -> dict[str, Any]:
        """MetaGPT's software company, as the paper's workload takes it from MetaGPT's logs: an architect designs,
        then rounds of agents work on every file at once, each prompt carrying its role, the design and (after
        the first round) the whole codebase, and only its own file's part after those: engineers write the
        files, reviewers review each file against the codebase, engineers revise each file from its review."""
        s = self.scale
        architect_role, engineer_role, reviewer_role = (self.text(s.role_tokens) for _ in range(3))
        task = self.text(s.query_tokens)
        specs = [self.text(s.query_tokens) for _ in range(s.agent_files)]
        return await self.timed(self._agents(architect_role, engineer_role, reviewer_role, task, specs))

    async def _agents(self, architect_role: str, engineer_role: str, reviewer_role: str, task: str,
                      specs: list[str]) -> None:
        s = self.scale
        files = range(len(specs))
        if self.parrot:
            codebase = "\nCodebase:" + "".join(f"\nFile {i}:\n{{{{input:code{i}}}}}" for i in files)
            design_fn = self.function(architect_role + "\nTask: {{input:task}}\nDesign:{{output:design}}",
                                      s.design_tokens)
            code_fn = self.function(engineer_role + "\nDesign: {{input:design}}\nFile: {{input:spec}}\n"
                                    "Code:{{output:code}}", s.code_tokens)
            review_fn = self.function(reviewer_role + "\nDesign: {{input:design}}" + codebase
                                      + "\nReview file {{input:name}}:{{output:review}}", s.review_tokens)
            revise_fn = self.function(engineer_role + "\nDesign: {{input:design}}" + codebase
                                      + "\nReview of file {{input:name}}: {{input:review}}\nRevised code:"
                                      "{{output:revised}}", s.code_tokens)
            async with self.client.session() as session:
                async with session.graph():
                    design = design_fn(task)
                    codes = [code_fn(design, spec) for spec in specs]
                    finals = [revise_fn(design, *codes, str(i), review_fn(design, *codes, str(i))) for i in files]
                await asyncio.gather(*(f.aget() for f in finals))
        else:
            design = await self.complete(f"{architect_role}\nTask: {task}\nDesign:", s.design_tokens)
            codes = await asyncio.gather(*(self.complete(f"{engineer_role}\nDesign: {design}\nFile: {spec}\nCode:",
                                                         s.code_tokens) for spec in specs))
            codebase = "\nCodebase:" + "".join(f"\nFile {i}:\n{code}" for i, code in enumerate(codes))

            async def review_and_revise(i: int) -> str:
                review = await self.complete(f"{reviewer_role}\nDesign: {design}{codebase}\nReview file {i}:",
                                             s.review_tokens)
                return await self.complete(f"{engineer_role}\nDesign: {design}{codebase}\nReview of file {i}: "
                                           f"{review}\nRevised code:", s.code_tokens)

            await asyncio.gather(*(review_and_revise(i) for i in files))

    async def gpts(self) -> dict[str, Any]:
        """The paper's GPTs-like apps: users' chats with a few apps (each a system prompt), sent at once."""
        s = self.scale
        return await self._app_chats(s.apps, s.app_prompt_tokens, s.gpts_requests, s.gpts_answer_tokens)

    async def gpts_many(self) -> dict[str, Any]:
        """GPTs-like at high fan-out: as many users as the chat's most, over the same number of apps."""
        s = self.scale
        return await self._app_chats(s.apps, s.app_prompt_tokens, s.gpts_many_requests, s.gpts_answer_tokens)

    async def burst(self) -> dict[str, Any]:
        """A burst of chats for new apps whose system prompts are longer than an engine step's token budget: each
        prompt must be computed once (not once per chat) over several steps, then read by every chat at once."""
        s = self.scale
        return await self._app_chats(s.burst_apps, s.burst_prompt_tokens, s.burst_requests, s.burst_answer_tokens)

    async def _app_chats(self, apps: int, prompt_tokens: int, requests: int, answer_tokens: int) -> dict[str, Any]:
        """`requests` chats sent at once, each with one of `apps` new system prompts (none seen before)."""
        s = self.scale
        prompts = [self.text(prompt_tokens) for _ in range(apps)]
        rng = random.Random(1)
        queries = [(rng.choice(prompts), self.text(s.query_tokens)) for _ in range(requests)]
        runs: list[dict[str, float]] = []

        async def chats() -> None:
            runs.extend(await asyncio.gather(*(self.chat(app, query, answer_tokens) for app, query in queries)))

        figures = await self.timed(chats())
        return {**figures, "requests_per_s": requests / figures["seconds"],
                "mean_latency_s": statistics.mean(r["latency_s"] for r in runs),
                "mean_first_token_s": statistics.mean(r["first_token_s"] for r in runs)}

    async def mixed(self) -> dict[str, Any]:
        """A user chats while map-reduce jobs run all along: each of `mixed_jobs` job slots starts a new job as
        its last one ends, until the user's last answer is in (the jobs in flight then finish)."""
        s = self.scale
        system = self.text(s.query_tokens * 4)
        chatting = True
        job_seconds: list[float] = []

        async def job_slot() -> None:
            while chatting:
                chunks = [self.text(s.chunk_tokens) for _ in range(s.mixed_job_chunks)]
                job_seconds.append(await self.map_reduce_once(chunks, "throughput"))

        start = time.perf_counter()
        slots = [asyncio.create_task(job_slot()) for _ in range(s.mixed_jobs)]
        await asyncio.sleep(0.5)  # the jobs are running when the user starts chatting
        chats = [await self.chat(system, self.text(s.query_tokens), s.answer_tokens) for _ in range(s.mixed_chats)]
        chatting = False
        await asyncio.gather(*slots)
        wall = time.perf_counter() - start
        return {
            "chat_mean_latency_s": statistics.mean(c["latency_s"] for c in chats),
            "chat_mean_first_token_s": statistics.mean(c["first_token_s"] for c in chats),
            "chat_mean_per_token_s": statistics.mean(c["per_token_s"] for c in chats),
            "jobs": len(job_seconds),
            "job_mean_seconds": statistics.mean(job_seconds),
            "jobs_per_minute": len(job_seconds) / wall * 60,
            "wall_s": wall,
        }

    async def close(self) -> None:
        await self.http.close()
        await self.client.aclose()
