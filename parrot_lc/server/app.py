"""The HTTP API: thin FastAPI routes over the manager (which knows nothing of HTTP).

Errors always come back as JSON `{"error": {"message", "type", "field"}}` with a 4xx status (5xx only for a
bug, never with a stack trace)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from parrot_lc.engine.engine import EngineStats
from parrot_lc.engine.errors import EngineError, OutOfMemoryError
from parrot_lc.engine.sampling import SamplingParams
from parrot_lc.server.auth import bearer_key_ok
from parrot_lc.server.errors import ForbiddenError, NotFoundError, QueueFullError, ServerError
from parrot_lc.server.graph import Criterion, Piece, Session
from parrot_lc.server.limits import BodyLimit
from parrot_lc.server.manager import ParrotManager
from parrot_lc.server.metrics import registry_for
from parrot_lc.server.openai_routes import openai_router
from parrot_lc.server.remote_engine import RemoteEngine
from parrot_lc.server.request_ids import RequestIds, id_header
from parrot_lc.server.responses import error_response
from parrot_lc.server.schemas import (
    EngineRef,
    EngineStatsBody,
    RegisterEngine,
    ErrorBody,
    NewSession,
    NewVariable,
    NewVariables,
    SessionStatus,
    SetValue,
    SubmitCalls,
    SubmittedCalls,
    VariableRef,
    VariableRefs,
    VariableValue,
)
from parrot_lc.settings import ServerSettings

# uvicorn closes a connection that has been idle this long. Clients keep idle connections for reuse (httpx for
# 5 s, uvicorn's own default too): a server that closes first may close one just as a client sends a request on
# it, which then fails with a reset connection. Longer than clients keep them, the client always closes first.
KEEP_ALIVE_S = 75

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
log = logging.getLogger("parrot_lc.server")
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 408, 413, 422, 424)}
ERRORS[429] = {"model": ErrorBody, "description": "the server's queue is full: retry after `Retry-After` seconds",
               "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}}
ERRORS[503] = {"model": ErrorBody, "description": "the server is shutting down: it takes no new work"}


def create_app(manager: ParrotManager, settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.ensure_future(watch_engines(manager, settings.engine_timeout))
        yield
        watcher.cancel()

    app = FastAPI(title="parrot_lc", description="Serving LLM applications as graphs of Semantic Variables",
                  lifespan=lifespan)
    registry = registry_for(manager)
    api_keys = [key.encode() for key in settings.api_keys()]
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIds)  # added last, so outermost: every response (413s too) carries the id

    def check_api_key(authorization: str | None = Header(None)) -> None:
        if api_keys and not bearer_key_ok(authorization, api_keys):
            raise ServerError("missing or wrong API key: send `Authorization: Bearer <key>`", field="authorization")

    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError) -> JSONResponse:
        status = 401 if exc.field == "authorization" else exc.status
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
        return error_response(status, exc.message, type(exc).__name__, exc.field, headers)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(400, str(exc), type(exc).__name__, "prompt" if isinstance(exc, OutOfMemoryError) else None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p != "body")
        if first["type"] == "json_invalid":
            return error_response(400, f"malformed JSON: {first['msg']}", "MalformedJSON", "body")
        return error_response(422, f"{field or 'body'}: {first['msg']}", "ValidationError", field or "body")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        # This response is made outside every middleware, so it gets the request's id here.
        return error_response(500, "internal error (logged on the server)", "InternalError", headers=id_header())

    @app.get("/health", responses={503: {"description": "draining for a shutdown: send work elsewhere"}})
    async def health() -> JSONResponse:
        """200 while serving; 503 once a shutdown has begun, so that load balancers and health checks move on."""
        body = {"status": "draining" if manager.draining else "ok", "engines": len(manager.engines)}
        return JSONResponse(body, status_code=503 if manager.draining else 200)

    guarded = [Depends(check_api_key)]

    @app.get("/metrics", dependencies=guarded if settings.metrics_need_api_key else [])
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(parrot_router(manager), dependencies=guarded)
    engine_keys = [settings.engine_key.encode()] if settings.engine_key else []

    def check_engine_key(request: Request, authorization: str | None = Header(None)) -> None:
        """Engines register with the engine key (client keys do not open these routes); without one, from
        this host only: an engine receives prompts, so not just anyone may become one."""
        if engine_keys:
            if not bearer_key_ok(authorization, engine_keys):
                raise ServerError("missing or wrong engine key: send `Authorization: Bearer <engine key>`",
                                  field="authorization")
        elif request.client is None or request.client.host not in LOOPBACK:
            raise ForbiddenError("engines register from this host only, unless the server has an --engine-key",
                                 field="client")

    app.include_router(engines_router(manager, settings), dependencies=[Depends(check_engine_key)])
    app.include_router(openai_router(manager, manager.model.name), dependencies=guarded, responses=ERRORS)
    return app


async def watch_engines(manager: ParrotManager, timeout: float) -> None:
    """Drops remote engines that stopped sending heartbeats; their calls move to the others."""
    while True:
        await asyncio.sleep(timeout / 4)
        for name in manager.drop_silent_engines(timeout):
            log.warning("engine %s sent no heartbeat for %.1f s: dropped", name, timeout)


def engines_router(manager: ParrotManager, settings: ServerSettings) -> APIRouter:
    """Remote engine processes register here and send heartbeats with their counters."""
    router = APIRouter(prefix="/api/engines", responses=ERRORS)
    # The manager calls engines with the engine key (they require it when they have one).
    authorization = f"Bearer {settings.engine_key}" if settings.engine_key else None

    @router.post("", status_code=201)
    async def register(body: RegisterEngine) -> EngineRef:
        slot = manager.add_engine(RemoteEngine(str(body.url), EngineStats(**body.stats.model_dump()), authorization))
        log.info("engine %s registered from %s", slot.name, body.url)
        return EngineRef(name=slot.name)

    @router.post("/{name}/heartbeat", status_code=204)
    async def heartbeat(name: str, body: EngineStatsBody) -> Response:
        slot = manager.slot(name)
        if not isinstance(slot.engine, RemoteEngine):
            raise NotFoundError(f"engine {name!r} runs in the server: it sends no heartbeats", field="name")
        slot.last_heartbeat = time.monotonic()
        slot.engine.update_stats(EngineStats(**body.model_dump()))
        return Response(status_code=204)

    return router


def parrot_router(manager: ParrotManager) -> APIRouter:
    """Sessions, Semantic Variables and call graphs."""
    router = APIRouter(prefix="/api", responses=ERRORS)

    def session_of(session_id: str, x_session_token: str | None = Header(None)) -> Session:
        return manager.session(session_id, x_session_token)

    @router.post("/sessions", status_code=201)
    async def create_session() -> NewSession:
        session = manager.create_session()
        return NewSession(session_id=session.session_id, session_token=session.token)

    @router.delete("/sessions/{session_id}", status_code=204)
    async def delete_session(session: Session = Depends(session_of)) -> Response:
        await manager.delete_session(session)
        return Response(status_code=204)

    @router.get("/sessions/{session_id}")
    async def session_status(session: Session = Depends(session_of)) -> SessionStatus:
        return SessionStatus(**manager.status(session))

    @router.post("/sessions/{session_id}/variables", status_code=201)
    async def create_variable(body: NewVariable, session: Session = Depends(session_of)) -> VariableRef:
        variable = manager.create_variable(session, body.name, body.value)
        return VariableRef(var_id=variable.var_id, name=variable.name)

    @router.post("/sessions/{session_id}/variables:batchCreate", status_code=201)
    async def create_variables(body: NewVariables, session: Session = Depends(session_of)) -> VariableRefs:
        """Makes several variables at once, in the order given (what a client does before submitting a graph)."""
        made = [manager.create_variable(session, v.name, v.value) for v in body.variables]
        return VariableRefs(variables=[VariableRef(var_id=v.var_id, name=v.name) for v in made])

    @router.put("/sessions/{session_id}/variables/{var_id}", status_code=204)
    async def set_variable(var_id: str, body: SetValue, session: Session = Depends(session_of)) -> Response:
        manager.set_variable(session, var_id, body.value)
        return Response(status_code=204)

    @router.get("/sessions/{session_id}/variables/{var_id}")
    async def get_variable(
        var_id: str, criterion: Criterion = Criterion.LATENCY, timeout: float | None = None,
        session: Session = Depends(session_of),
    ) -> VariableValue:
        """Long-polls until the variable has a value; the criterion steers the scheduling of its producers."""
        value = await manager.get_variable(session, var_id, criterion, timeout)
        return VariableValue(var_id=var_id, value=value)

    @router.post("/sessions/{session_id}/calls", status_code=201)
    async def submit_calls(body: SubmitCalls, session: Session = Depends(session_of)) -> SubmittedCalls:
        """Submits one call or a whole graph of calls; each runs as soon as its inputs have values."""
        graph = [[to_piece(p) for p in call.template] for call in body.calls]
        return SubmittedCalls(call_ids=[c.call_id for c in manager.submit(session, graph)])

    @router.delete("/sessions/{session_id}/calls/{call_id}", status_code=204)
    async def cancel_call(call_id: str, session: Session = Depends(session_of)) -> Response:
        """Cancels a call that has not finished: its context (and KV cache) is freed, its outputs fail, and so
        do the calls waiting for them. A finished call is left as it is."""
        await manager.cancel_call(session, call_id)
        return Response(status_code=204)

    return router


def to_piece(piece) -> Piece:
    if piece.text is not None:
        return Piece("text", piece.text)
    if piece.input is not None:
        return Piece("input", var_id=piece.input)
    sampling = piece.sampling.to_params() if piece.sampling is not None else SamplingParams()
    return Piece("output", var_id=piece.output, sampling=sampling)
