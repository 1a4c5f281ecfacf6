"""An engine process's HTTP face (`parrot-lc engine`): the manager calls fill / generate / free_context /
reset_prefix_cache on it. Generation streams one JSON event per line. Engine errors come back typed, by name."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
from typing import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from parrot_lc.engine.async_engine import AsyncEngine
from parrot_lc.engine.errors import EngineError
from parrot_lc.server.auth import bearer_key_ok
from parrot_lc.server.errors import MODEL_MISMATCH
from parrot_lc.server.remote_engine import ModelIdentity
from parrot_lc.server.responses import add_error_handlers, error_response
from parrot_lc.server.schemas import EngineSampling, PrefixCacheReset
from parrot_lc.settings import EngineProcessSettings, EngineSettings, SettingsError, setting_error

log = logging.getLogger("parrot_lc.engine_service")


class FillBody(BaseModel):
    token_ids: list[int]
    context_id: str
    parent_context_id: str | None = None
    priority: int = 0


class GenerateBody(BaseModel):
    sampling: EngineSampling
    context_id: str
    parent_context_id: str | None = None
    priority: int = 0
    token_ids: list[int] = []  # filled first, in the same request


class FreeBody(BaseModel):
    context_id: str


def create_engine_app(engine: AsyncEngine, api_key: str | None = None) -> FastAPI:
    """The engine's routes; with `api_key`, every one but /health needs `Authorization: Bearer KEY` (the engine
    key it registers with, which its manager sends back)."""
    app = FastAPI(title="parrot_lc engine")
    add_error_handlers(app)
    identity = ModelIdentity.of(engine.tokenizer, engine.vocab_size, engine.max_context)
    keys = [api_key.encode()] if api_key else []

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if keys and request.url.path != "/health" and not bearer_key_ok(request.headers.get("authorization"), keys):
            message = "missing or wrong API key: send `Authorization: Bearer <key>`"
            return error_response(401, message, "Unauthorized", "authorization")
        return await call_next(request)

    @app.exception_handler(EngineError)
    async def engine_error(request, exc: EngineError) -> JSONResponse:
        return error_response(400, str(exc), type(exc).__name__)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict:
        return dataclasses.asdict(engine.stats())

    @app.get("/model")
    async def model() -> dict:
        """What a manager checks before it takes this engine (remote_engine.ModelIdentity)."""
        return dataclasses.asdict(identity)

    @app.post("/fill")
    async def fill(body: FillBody) -> dict:
        cached = await engine.fill(body.token_ids, body.context_id, body.parent_context_id, body.priority)
        return {"ok": True, "cached_tokens": cached}

    @app.post("/free")
    async def free(body: FreeBody) -> dict:
        await engine.free_context(body.context_id)
        return {"ok": True}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> PrefixCacheReset:
        return PrefixCacheReset(freed_blocks=await engine.reset_prefix_cache())

    @app.post("/generate")
    async def generate(body: GenerateBody) -> StreamingResponse:
        events = engine.generate(body.sampling.to_params(), body.context_id, body.parent_context_id, body.priority,
                                 body.token_ids)
        first = await anext(events)  # submission errors become a 400 before the stream starts

        async def lines() -> AsyncIterator[str]:
            output = first
            try:
                while True:
                    yield json.dumps({"token_ids": output.token_ids, "text": output.text,
                                      "finished": output.finished, "finish_reason": output.finish_reason,
                                      "stop_reason": output.stop_reason,
                                      "cached_tokens": output.cached_tokens,
                                      "logprobs": [entry.to_wire() for entry in output.logprobs],
                                      "prompt_logprobs": None if output.prompt_logprobs is None else
                                      [entry.to_wire() for entry in output.prompt_logprobs]}) + "\n"
                    if output.finished:
                        return
                    try:
                        output = await anext(events)
                    except EngineError as exc:
                        yield json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}) + "\n"
                        return
            finally:
                await events.aclose()  # the manager went away mid-stream: cancel the request, free its blocks

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


class ManagerLink(threading.Thread):
    """Registers an engine process with its manager, then sends a heartbeat (with the engine's counters and the
    token its registration gave) every interval; registers again if the manager forgot it (a restart, or a
    heartbeat gap), which it tells with a 404. A manager that cannot be reached, fails (5xx) or refuses for a while
    (is_final) is asked again every interval; one that refuses for good (a wrong engine key, another model) ends the
    link with `refusal`."""

    def __init__(self, engine: AsyncEngine, settings: EngineProcessSettings, url: str) -> None:
        super().__init__(name="parrot-manager-link", daemon=True)
        self.engine, self.settings, self.url = engine, settings, url
        headers = {"Authorization": f"Bearer {settings.engine_key}"} if settings.engine_key else {}
        self.client = httpx.Client(base_url=settings.manager.rstrip("/"), headers=headers, timeout=5.0)
        self.name_at_manager: str | None = None
        self.token = ""
        self.stopped = threading.Event()
        self.refusal: SettingsError | None = None

    def run(self) -> None:
        while not self.stopped.wait(0 if self.name_at_manager is None else self.settings.heartbeat_interval):
            stats = dataclasses.asdict(self.engine.stats())
            try:
                if self.name_at_manager is None:
                    self.register(stats)
                else:
                    self.send_heartbeat(stats)
            except httpx.HTTPError as exc:
                if isinstance(exc, httpx.HTTPStatusError) and is_final(exc.response):
                    self.refusal = refusal(self.settings, exc)  # asking again would get the same answer
                    return
                log.warning("manager %s: %s; retrying", self.settings.manager, describe(exc))
                self.stopped.wait(self.settings.heartbeat_interval)

    def register(self, stats: dict) -> None:
        reply = self.client.post("/api/engines", json={"url": self.url, "stats": stats})
        reply.raise_for_status()
        ref = reply.json()
        self.name_at_manager, self.token = ref["name"], ref["token"]
        log.info("registered with %s as %s", self.settings.manager, self.name_at_manager)

    def send_heartbeat(self, stats: dict) -> None:
        reply = self.client.post(f"/api/engines/{self.name_at_manager}/heartbeat", json=stats,
                                 headers={"X-Engine-Token": self.token})
        if reply.status_code == 404:
            log.warning("manager %s no longer knows %s: registering again", self.settings.manager,
                        self.name_at_manager)
            self.name_at_manager = None
        else:
            reply.raise_for_status()


def is_final(reply: httpx.Response) -> bool:
    """Whether a manager's refusal stands however often the engine asks: a wrong engine key (401), a manager that
    takes no remote engines (403), another model (422 MODEL_MISMATCH). Others may clear by themselves: a manager
    full of engines (409, until a dropped one's heartbeats run out, as in a rolling restart), a probe of the engine
    that failed (422 ENGINE_UNREACHABLE: a Service without ready endpoints yet), a proxy's 408 or 429, a 5xx."""
    if reply.status_code in (401, 403):
        return True
    try:
        return reply.status_code == 422 and reply.json()["error"]["code"] == MODEL_MISMATCH
    except (ValueError, KeyError, TypeError):
        return False


def refusal(settings: EngineProcessSettings, exc: httpx.HTTPStatusError) -> SettingsError:
    """What an engine stops with when its manager refuses it for good (is_final): the engine key's fault on 401 and
    403 (a wrong key, or a manager that takes no remote engines), else the model's."""
    name = "engine_key" if exc.response.status_code in (401, 403) else "model"
    return setting_error(EngineProcessSettings if name == "engine_key" else EngineSettings, name,
                         f"{settings.manager} refused this engine: {describe(exc)}")


def describe(exc: httpx.HTTPError) -> str:
    """What went wrong, with the manager's own message when it answered with an error."""
    if isinstance(exc, httpx.HTTPStatusError):
        try:
            return f"{exc.response.status_code} {exc.response.json()['error']['message']}"
        except (ValueError, KeyError, TypeError):
            return f"{exc.response.status_code} {exc.response.text[:200]}"
    return f"not reachable ({exc!r})"


class LinkedServer(uvicorn.Server):
    """uvicorn's server that starts the engine's link to its manager only once it serves on its port: a
    registration sent before would point the manager at an address where nothing answers (the manager probes
    it, then calls it). A port that cannot be bound ends the process before any registration. A manager that
    refuses the engine (`ManagerLink.refusal`) stops the server, as a signal does: nothing will call it."""

    def __init__(self, config: uvicorn.Config, link: ManagerLink) -> None:
        super().__init__(config)
        self.link = link

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.link.start()

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self.link.refusal is not None
