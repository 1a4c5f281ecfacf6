"""Shared fixtures: small engines on the CPU, random Hugging Face checkpoints to compare against, and servers (in
this process, or `parrot-lc serve` processes) with clients."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (must be chosen before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.settings import EngineSettings

ROOT = Path(__file__).resolve().parent.parent  # the repository: tests live a folder below it, by layer
# Tests that need a GPU: `pytest -m gpu` selects them on the device machine; elsewhere they are skipped.
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run through the device tool)")]

HF_CONFIGS = {
    "llama-head-dim-64": lambda: transformers.LlamaConfig(  # a head dim the CUDA decode kernel takes
        vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
    "llama3-rope-tied": lambda: transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "mistral-sliding-window": lambda: transformers.MistralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=24,
    ),
}
HF_CLASSES = {
    "llama-head-dim-64": transformers.LlamaForCausalLM,
    "llama": transformers.LlamaForCausalLM,
    "llama3-rope-tied": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "mistral-sliding-window": transformers.MistralForCausalLM,
}


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Callable[[str], tuple[Path, transformers.PreTrainedModel]]:
    """Writes (once per family) a random checkpoint with save_pretrained; returns its path and the HF model."""
    made: dict[str, tuple[Path, transformers.PreTrainedModel]] = {}

    def make(family: str):
        if family not in made:
            torch.manual_seed(0)
            config = HF_CONFIGS[family]()
            config._attn_implementation = "eager"
            model = HF_CLASSES[family](config).eval()
            if family == "qwen2":  # random, non-zero q/k/v biases, so that loading them is tested
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.data.normal_(0, 0.5)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            made[family] = (path, model)
        return made[family]

    return make


@pytest.fixture
def make_engine(tmp_path) -> Callable[..., LLMEngine]:
    """An engine on the CPU in float32 (weights too: the reference comparisons are exact): `tiny` unless a model is
    named; settings overridable."""

    def make(**overrides) -> LLMEngine:
        settings = dict(model="tiny", device="cpu", dtype="float32", cpu_weight_format="float32",
                        kv_cache_bytes=32 * 2**20, cache_dir=tmp_path)
        settings.update(overrides)
        return LLMEngine(EngineSettings(**settings))

    return make


@pytest.fixture
def tiny(make_engine) -> LLMEngine:
    return make_engine()


def prompt_ids(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenizer(text).input_ids


def greedy_text_ids(engine: LLMEngine, context_id, max_tokens: int, parent=None) -> list[int]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [t for event in engine.generate(sampling, context_id, parent) for t in event.token_ids]


def generate_from_all(engine: LLMEngine, prompts: list[list[int]], sampling: SamplingParams) -> dict[int, list[int]]:
    """Fills the prompts, then generates from all of them at once (priorities mixed), freeing each context as it
    ends, as the server does; returns each prompt's tokens."""
    engine.run_until_done([engine.submit_fill(p, i) for i, p in enumerate(prompts)])
    gens = {engine.submit_generate(sampling, i, priority=i % 3).request_id: i for i in range(len(prompts))}
    tokens = {i: [] for i in gens.values()}
    while engine.has_work():
        for output in engine.step():
            assert output.error is None
            tokens[gens[output.request_id]] += output.token_ids
            if output.finished:
                engine.free_context(gens[output.request_id])
    return tokens


def assert_logits_follow_reference(
    engine: LLMEngine, reference: transformers.PreTrainedModel, prompt: list[int], steps: int = 20
) -> None:
    """Our logits equal the reference model's (max abs diff <= 1e-4, float32) after the prefill of `prompt` and
    after each of `steps` greedy decode steps (one-token fills)."""
    tokens = list(prompt)
    engine.fill(tokens, "reference")
    for step in range(steps + 1):
        with torch.no_grad():
            expected = reference(torch.tensor([tokens])).logits[0, -1]
        ours = engine.context_logits("reference").cpu()
        assert (ours - expected).abs().max().item() <= 1e-4, f"step {step}"
        tokens.append(int(expected.argmax()))
        engine.fill([tokens[-1]], "reference")
    engine.free_context("reference")


@pytest.fixture
def oversized_checkpoint(tmp_path) -> Path:
    """A checkpoint directory (config.json only: for `--load-format dummy`) of the tiny model's shapes but with an
    MLP 2**40 wide: its weights cannot be allocated on any machine, and the allocator says so at once."""
    from parrot_lc.engine.loader import TINY_DIR

    config = json.loads((TINY_DIR / "config.json").read_text()) | {"intermediate_size": 2**40}
    path = tmp_path / "oversized"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def smollm2_cache_dir(tmp_path_factory) -> Path:
    """One cache directory for the converted SmolLM2 checkpoint, so that the suite converts the file once."""
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="session")
def local_server():
    """A real server (uvicorn on a loopback port, in this process) with the tiny model, its weights in float32 as
    make_engine's are (tests compare the two)."""
    from parrot_lc.server.local import LocalServer

    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", cpu_weight_format="float32",
                              kv_cache_bytes=64 * 2**20)
    with LocalServer(settings) as server:
        yield server


@pytest.fixture(scope="session")
def parrot_server(local_server) -> str:
    """The base URL of the shared test server."""
    return local_server.base_url


# A KV cache of 24 blocks of 16 tokens (tiny: 512 bytes a token), of which one context may hold 23 (a fork of a
# shared prefix copies the prefix's partly filled last block): far fewer than tiny's context of 8,192 tokens.
SMALL_KV_CACHE_BYTES, SMALL_KV_CONTEXT = 24 * 16 * 512, 23 * 16


@pytest.fixture(scope="module")
def small_kv_server():
    """A real server whose engine's KV cache holds SMALL_KV_CONTEXT tokens for one context: that, not the model's
    context, is the most a request's context may hold."""
    from parrot_lc.server.local import LocalServer

    settings = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=SMALL_KV_CACHE_BYTES)
    with LocalServer(settings) as server:
        yield server


def hide_kv_capacity(manager) -> None:
    """The manager's engines keep their KV caches' sizes to themselves, as an OpenAI-compatible server does (or a
    remote engine whose counters lack it): requests are then bounded by the model's context alone, and an engine
    refuses a context that its cache cannot hold as the call runs."""
    for slot in manager.engines:
        stats = slot.engine.stats
        slot.engine.stats = lambda stats=stats: dataclasses.replace(stats(), kv_capacity_tokens=0)


@pytest.fixture
def call_limit_of_4(local_server, monkeypatch):
    """The shared test server lets a session hold 4 unfinished calls during the test."""
    monkeypatch.setattr(local_server.manager.settings, "max_queued_calls_per_session", 4)


@pytest.fixture
def prefix_fill_priorities(local_server, monkeypatch) -> list[int]:
    """The priority of every prefix context that the shared test server's engine is asked to fill during the test."""
    engine = local_server.manager.engines[0].engine
    fill, priorities = engine.fill, []

    async def recording_fill(token_ids, context_id, parent_context_id=None, priority=0, **kwargs):
        if str(context_id).startswith("prefix/"):
            priorities.append(priority)
        return await fill(token_ids, context_id, parent_context_id, priority, **kwargs)

    monkeypatch.setattr(engine, "fill", recording_fill)
    return priorities


@pytest.fixture
def generation_delays(local_server, monkeypatch) -> Iterator[Callable[[list[float | None]], None]]:
    """`delay(seconds)`: the k-th generation that the shared test server's engine is asked for during the test begins
    `seconds[k]` after it is asked for (later ones at once); None: never, as on a server that hangs (it waits until
    its call is cancelled, with its session)."""
    engine = local_server.manager.engines[0].engine
    generate, delays = engine.generate, iter(())

    def delayed_generate(*args, **kwargs):
        delay = next(delays, 0.0)

        async def events():
            await (asyncio.Event().wait() if delay is None else asyncio.sleep(delay))
            async for event in generate(*args, **kwargs):
                yield event

        return events()

    def delay(seconds: list[float | None]) -> None:
        nonlocal delays
        delays = iter(seconds)

    monkeypatch.setattr(engine, "generate", delayed_generate)
    yield delay
    # A call that never began went with its session: none is left to hold the queue.
    wait_until(lambda: local_server.manager.queued_calls == 0, 10, "the delayed calls to leave the queue")


@pytest.fixture
def client(parrot_server):
    """An HTTP client of the shared test server."""
    with httpx.Client(base_url=parrot_server, timeout=60) as c:
        yield c


@pytest.fixture
def graphs_sent() -> list[list[dict]]:
    """The graphs that `parrot_llm` and `chat_parrot` submit during the test (the `calls` of each request)."""
    return []


def _recording_hooks(graphs_sent: list[list[dict]]) -> dict:
    def record(request: httpx.Request) -> None:
        if request.url.path.endswith("/calls") and request.method == "POST":
            graphs_sent.append(json.loads(request.content)["calls"])

    return {"event_hooks": {"request": [record]}}


@pytest.fixture
def parrot_llm(parrot_server, graphs_sent):
    """ParrotLLM on the shared test server: greedy, 4 tokens a call; its graphs land in `graphs_sent`."""
    from parrot_lc import ParrotLLM

    return ParrotLLM(base_url=parrot_server, max_tokens=4, temperature=0,
                     sync_client_kwargs=_recording_hooks(graphs_sent))


@pytest.fixture
def chat_parrot(parrot_server, graphs_sent):
    """ChatParrot on the shared test server: greedy, 4 tokens a call; its graphs land in `graphs_sent`."""
    from parrot_lc import ChatParrot

    return ChatParrot(base_url=parrot_server, max_tokens=4, temperature=0,
                      sync_client_kwargs=_recording_hooks(graphs_sent))


@pytest.fixture(scope="module")
def engine_app_urls():
    """`urls(key, count, model, kv_cache_bytes)`: `count` loopback URLs of one engine's HTTP face (what `parrot-lc
    engine` serves, without its link to a manager; `tiny` unless a model is named), served in this process and taking
    the engine key `key`: engines that a manager's registration probe reaches, at as many addresses as a test
    registers."""
    import threading

    import uvicorn

    from parrot_lc.engine.async_engine import AsyncEngine
    from parrot_lc.server.engine_service import create_engine_app

    started = []

    def urls(key: str, count: int, model: str = "tiny", kv_cache_bytes: int = 16 * 2**20) -> list[str]:
        engine = AsyncEngine(LLMEngine(EngineSettings(model=model, device="cpu", dtype="float32",
                                                      kv_cache_bytes=kv_cache_bytes)))
        sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
        server = uvicorn.Server(uvicorn.Config(create_engine_app(engine, key), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
        thread.start()
        started.append((server, thread, engine))
        wait_until(lambda: server.started, 60, "the engine's HTTP server")
        return [f"http://127.0.0.1:{s.getsockname()[1]}" for s in sockets]

    yield urls
    for server, thread, engine in started:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def raised_within(seconds: float, run: Callable[[], object]) -> tuple[BaseException | None, float]:
    """What `run()` raised (None if nothing) and how long it took; it runs in a thread of its own, so that a wait that
    never ends fails the test after `seconds` rather than hang the suite."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    return outcome[0], time.monotonic() - start


ERROR_KEYS = {"message", "type", "field", "param", "code"}
"""The keys of every error answer's `error`: ours (`field`) and OpenAI's (`param`, `code`)."""


def assert_refused(response: httpx.Response, status: int, field: str) -> dict:
    """The response is an error of `status` in the documented shape, naming `field` (and, by OpenAI's key, `param`);
    returns the error."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["field"] == error["param"] == field, error
    return error


class Served:
    """A `parrot-lc serve` process on the tiny model, logging JSON lines to a file."""

    def __init__(self, log: Path, *flags: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "parrot_lc.cli", "serve", "--model", "tiny", "--device", "cpu", "--dtype",
             "float32", "--kv-cache-bytes", str(16 * 2**20), "--port", str(port), "--log-format", "json", *flags],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(*flags: str) -> Served:
        started.append(Served(tmp_path / "serve.log", *flags))
        return started[-1]

    yield start
    for served in started:
        served.stop()
