"""An existing OpenAI-compatible server (vLLM, SGLang, another parrot_lc) used as an engine.

Such a server has no fill / fork: a context here is only its token ids (a fork copies the parent's list),
and generate sends the whole context as one completion request. The manager still does DAG scheduling and
prefix-aware placement, which is what lets the remote server's own prefix cache reuse the shared KV.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

import httpx
from transformers import PreTrainedTokenizerBase

from parrot_lc.engine.context import ContextId
from parrot_lc.engine.engine import EngineStats
from parrot_lc.engine.errors import ContextNotFoundError, EngineUnavailableError, InvalidRequestError
from parrot_lc.engine.request import RequestOutput
from parrot_lc.engine.sampling import SamplingParams


class OpenAIEngine:
    def __init__(self, base_url: str, model: str, tokenizer: PreTrainedTokenizerBase, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                         timeout=httpx.Timeout(None, connect=5.0))
        self.model, self.tokenizer = model, tokenizer
        self._contexts: dict[ContextId, list[int]] = {}
        self._prompt_tokens = 0
        self._completion_tokens = 0

    async def fill(self, token_ids, context_id, parent_context_id=None, priority=0, issued=None) -> int:
        # `issued` stays unset: a fork is safe once this returns. The tokens are only kept here (the upstream
        # computes them with the generate that reads them): none is taken from a cache.
        if not token_ids:
            raise InvalidRequestError("token_ids is empty: a fill needs at least one token")
        if context_id not in self._contexts:
            self._contexts[context_id] = list(self._context(parent_context_id)) if parent_context_id else []
        self._contexts[context_id].extend(token_ids)
        return 0

    async def generate(
        self, sampling: SamplingParams, context_id, parent_context_id=None, priority=0, token_ids=None
    ) -> AsyncIterator[RequestOutput]:
        if sampling.logprobs is not None or sampling.prompt_logprobs is not None:
            raise InvalidRequestError("an OpenAI-compatible engine gives no log-probabilities here")
        if sampling.constraint is not None:
            raise InvalidRequestError("an OpenAI-compatible engine takes no sampling.constraint here")
        if token_ids:
            await self.fill(token_ids, context_id, parent_context_id, priority)
        elif parent_context_id is not None and context_id not in self._contexts:
            self._contexts[context_id] = list(self._context(parent_context_id))
        tokens = self._context(context_id)
        body = {"model": self.model, "prompt": self.tokenizer.decode(tokens), "stream": True,
                "max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "seed": sampling.seed, "stop": list(sampling.stop) or None,
                "stream_options": {"include_usage": True}}
        # The other sampling options, only where they ask for something: vLLM's extensions, which another
        # OpenAI-compatible server may refuse, go only to a request that needs them.
        neutral = SamplingParams()
        body.update({name: getattr(sampling, name) for name in ("presence_penalty", "frequency_penalty",
                     "repetition_penalty", "min_p", "top_k", "ignore_eos", "stop_token_ids", "min_tokens")
                     if getattr(sampling, name) != getattr(neutral, name)})
        self._prompt_tokens += len(tokens)
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    message = (await response.aread()).decode(errors="replace")
                    raise InvalidRequestError(f"the OpenAI-compatible engine answered {response.status_code}: {message}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if not chunk.get("choices"):
                        continue
                    choice = chunk["choices"][0]
                    ids = self.tokenizer(choice["text"], add_special_tokens=False).input_ids if choice["text"] else []
                    tokens.extend(ids)
                    self._completion_tokens += len(ids)
                    reason = choice.get("finish_reason")
                    # vLLM's stop_reason where the upstream gives one (OpenAI's API has none)
                    yield RequestOutput(0, context_id, ids, choice["text"], reason is not None, reason,
                                        choice.get("stop_reason"))
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"OpenAI-compatible engine {self._client.base_url} lost: {exc!r}") from exc

    async def free_context(self, context_id) -> None:
        self._contexts.pop(context_id, None)

    async def reset_prefix_cache(self) -> int:
        """Asks the server to reset its prefix cache (`POST /reset_prefix_cache`, as vLLM and parrot_lc serve it).
        A server that answers anything but 200 has no such route (or refuses it): nothing to reset here, 0. A 200
        counts the blocks that a parrot_lc server names (`freed_blocks`); vLLM's names none: 0."""
        try:
            response = await self._client.post("/reset_prefix_cache")
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"OpenAI-compatible engine {self._client.base_url} lost: {exc!r}") from exc
        if response.status_code != 200:
            return 0
        try:
            return int(response.json()["freed_blocks"])
        except (ValueError, KeyError, TypeError):
            return 0

    def stats(self) -> EngineStats:
        """What this side can count; the remote server's KV cache is its own business."""
        return EngineStats(prefill_tokens=self._prompt_tokens, decode_tokens=self._completion_tokens, reused_tokens=0,
                           cached_tokens=0, kv_blocks_used=0, kv_blocks_free=0, num_running=0, num_waiting=0,
                           num_contexts=len(self._contexts), num_preemptions=0)

    def close(self) -> None:
        pass

    def _context(self, context_id) -> list[int]:
        try:
            return self._contexts[context_id]
        except KeyError:
            raise ContextNotFoundError(f"unknown context {context_id!r}") from None
