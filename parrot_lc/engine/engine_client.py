"""The one engine interface: what the server needs of an engine, wherever it runs. EngineDriver's subclasses
implement it over an LLMEngine in a thread (AsyncEngine) or a child process (ProcessEngine); the server's
RemoteEngine over HTTP to an engine process (`parrot-lc engine`), and OpenAIEngine over an OpenAI-compatible
server. An engine that cannot be reached raises EngineUnavailableError (engine/errors.py), and the manager moves
the work to another."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol

from parrot_lc.engine.context import ContextId
from parrot_lc.engine.engine import EngineStats
from parrot_lc.engine.request import RequestOutput
from parrot_lc.engine.sampling import SamplingParams


class EngineClient(Protocol):
    """fill / generate / free_context / reset_prefix_cache as coroutines, and the engine's counters."""

    async def fill(
        self, token_ids: list[int], context_id: ContextId, parent_context_id: ContextId | None = None, priority: int = 0,
        issued: asyncio.Future | None = None,
    ) -> int:
        """Prefills the tokens into the context; returns how many of them it took from the block cache instead of
        computing them. `issued` (if given) gets its result once the command is on its way to an engine that takes
        commands in order, where a fork of the context sent from then on waits for the fill; an engine that keeps
        no order leaves it unset, and a fork is safe once the fill has returned."""

    def generate(
        self, sampling: SamplingParams, context_id: ContextId, parent_context_id: ContextId | None = None,
        priority: int = 0, token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Fills `token_ids` (if any) into the context, then decodes, in one request."""

    async def free_context(self, context_id: ContextId) -> None: ...

    async def reset_prefix_cache(self) -> int:
        """Drops the cached KV blocks that no context holds, between two steps of the engine, so that the next
        prompts compute what they do not inherit; returns how many blocks it freed. Contexts and the requests
        running in them keep theirs."""

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...
