"""The manager's client of an engine process: the EngineClient calls over HTTP. A connection that fails
raises EngineUnavailableError, so the manager moves the work to another engine."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import AsyncIterator, TypeVar

import httpx
from transformers import PreTrainedTokenizerBase

from parrot_lc.engine import errors as engine_errors
from parrot_lc.engine.engine import EngineStats
from parrot_lc.engine.errors import EngineUnavailableError
from parrot_lc.engine.logprobs import TokenLogprob
from parrot_lc.engine.request import RequestOutput
from parrot_lc.engine.sampling import SamplingParams
from parrot_lc.server.structured_output import constraint_fields


T = TypeVar("T")


@dataclass(frozen=True)
class ModelIdentity:
    """What an engine must share with its manager to serve the manager's model: the vocabulary's size, a digest
    of its tokenizer's tokens ("" without a tokenizer) and the context length. An engine of another model would
    answer in token ids that the manager's tokenizer reads as other text. Weights are not compared: engines and
    manager are started with the same --model."""

    vocab_size: int
    max_context: int
    tokenizer: str

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, max_context: int) -> ModelIdentity:
        tokens = sorted(tokenizer.get_vocab().items()) if tokenizer is not None else []
        digest = hashlib.sha256(json.dumps(tokens).encode()).hexdigest() if tokens else ""
        return cls(vocab_size, max_context, digest)

    def differences(self, other: ModelIdentity) -> list[str]:
        """What differs from `other`, as `name: mine against other's`."""
        return [f"{name}: {mine} against {theirs}" for (name, mine), theirs in zip(asdict(self).items(),
                                                                                    asdict(other).values())
                if mine != theirs]


def _raise_typed(error: dict) -> None:
    kind = getattr(engine_errors, error.get("type", ""), engine_errors.EngineError)
    if not (isinstance(kind, type) and issubclass(kind, engine_errors.EngineError)):
        kind = engine_errors.EngineError
    raise kind(error.get("message", "engine error"))


class RemoteEngine:
    def __init__(self, url: str, stats: EngineStats, authorization: str | None = None) -> None:
        """`authorization`: the `Authorization` header to send (the key the engine registered with)."""
        self.url = url.rstrip("/")
        headers = {"Authorization": authorization} if authorization else {}
        self._client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=httpx.Timeout(None, connect=5.0))
        self._stats = stats
        self.identity: ModelIdentity | None = None  # read by probe()

    def update_stats(self, stats: EngineStats) -> None:
        """Called with each heartbeat: the engine sends its counters along."""
        self._stats = stats

    def stats(self) -> EngineStats:
        return self._stats

    async def probe(self, timeout: float) -> None:
        """Reads the engine's counters and its model's identity with the manager's key, within `timeout` seconds
        each; EngineUnavailableError unless they come: a registration of a host that is no engine (or an engine of
        another key) is refused before any call goes there."""
        self._stats = await self._probe_get("/stats", timeout, EngineStats)
        self.identity = await self._probe_get("/model", timeout, ModelIdentity)

    async def _probe_get(self, path: str, timeout: float, kind: type[T]) -> T:
        try:
            response = await self._client.get(path, timeout=timeout)
            if response.status_code != 200:
                raise EngineUnavailableError(f"GET {self.url}{path} answered {response.status_code}")
            return kind(**response.json())
        except httpx.HTTPError as exc:
            raise EngineUnavailableError(f"GET {self.url}{path} failed: {exc!r}") from exc
        except (ValueError, TypeError) as exc:  # not JSON, or not an engine's
            raise EngineUnavailableError(f"GET {self.url}{path} answered no engine's fields") from exc

    def _check_open(self) -> None:
        if self._client.is_closed:
            raise EngineUnavailableError(f"engine {self.url} was dropped")

    async def _post(self, path: str, body: dict | None = None) -> dict:
        self._check_open()
        try:
            response = await self._client.post(path, json=body)
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"engine {self.url} unreachable: {exc!r}") from exc
        if response.status_code != 200:
            _raise_typed(response.json().get("error", {}))
        return response.json()

    async def fill(self, token_ids, context_id, parent_context_id=None, priority=0, issued=None) -> int:
        # `issued` stays unset: HTTP requests keep no order, so a fork is safe once this returns.
        body = {"token_ids": token_ids, "context_id": context_id, "parent_context_id": parent_context_id,
                "priority": priority}
        return (await self._post("/fill", body))["cached_tokens"]

    async def free_context(self, context_id) -> None:
        await self._post("/free", {"context_id": context_id})

    async def reset_prefix_cache(self) -> int:
        return (await self._post("/reset_prefix_cache"))["freed_blocks"]

    async def generate(
        self, sampling: SamplingParams, context_id, parent_context_id=None, priority=0, token_ids=None
    ) -> AsyncIterator[RequestOutput]:
        body = {"sampling": {**sampling.__dict__, "stop": list(sampling.stop),
                             "stop_token_ids": list(sampling.stop_token_ids),
                             "constraint": sampling.constraint and constraint_fields(sampling.constraint)},
                "context_id": context_id, "parent_context_id": parent_context_id, "priority": priority,
                "token_ids": token_ids or []}
        self._check_open()
        try:
            async with self._client.stream("POST", "/generate", json=body) as response:
                if response.status_code != 200:
                    _raise_typed(json.loads(await response.aread()).get("error", {}))
                async for line in response.aiter_lines():
                    event = json.loads(line)
                    if "error" in event:
                        _raise_typed(event["error"])
                    prompt_logprobs = event["prompt_logprobs"]
                    yield RequestOutput(0, context_id, event["token_ids"], event["text"], event["finished"],
                                        event["finish_reason"], event["stop_reason"],
                                        cached_tokens=event["cached_tokens"],
                                        logprobs=[TokenLogprob.from_wire(entry) for entry in event["logprobs"]],
                                        prompt_logprobs=None if prompt_logprobs is None else
                                        [TokenLogprob.from_wire(entry) for entry in prompt_logprobs])
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"engine {self.url} lost mid-generation: {exc!r}") from exc

    def close(self) -> None:
        """Drops the connections: requests in flight fail with EngineUnavailableError and move elsewhere (an
        engine that stopped sending heartbeats may hang rather than close them)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # closed after the server's event loop ended: its connections went with it
            return
        loop.create_task(self._client.aclose())
