"""The HTTP API: thin FastAPI routes over the manager (which knows nothing of HTTP).

Errors always come back as JSON `{"error": {"message", "type", "field", "param", "code"}}` with a 4xx status (5xx
only for a bug, never with a stack trace)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from parrot_lc.engine.engine import EngineStats
from parrot_lc.engine.errors import EngineError, EngineUnavailableError, OutOfMemoryError
from parrot_lc.engine.sampling import SamplingParams
from parrot_lc.server.auth import bearer_key_ok, matching_key
from parrot_lc.server.errors import (
    ENGINE_UNREACHABLE,
    MODEL_MISMATCH,
    EngineRefusedError,
    ForbiddenError,
    QueueFullError,
    ServerError,
    TooManyEnginesError,
    UnauthorizedError,
)
from parrot_lc.server.graph import Criterion, Piece, Session
from parrot_lc.server.limits import BodyLimit
from parrot_lc.server.manager import ParrotManager
from parrot_lc.server.metrics import registry_for
from parrot_lc.server.openai_routes import openai_router, tokenizer_router
from parrot_lc.server.remote_engine import ModelIdentity, RemoteEngine
from parrot_lc.server.request_ids import RequestIds, id_header
from parrot_lc.server.responses import add_error_handlers, error_response
from parrot_lc.server.schemas import (
    CallRoom,
    EngineRef,
    EngineStatsBody,
    RegisterEngine,
    ErrorBody,
    NewSession,
    NewVariable,
    NewVariables,
    PrefixCacheReset,
    SessionStatus,
    SetValue,
    SubmitCalls,
    SubmittedCalls,
    VariableRef,
    VariableRefs,
    VariableValue,
)
from parrot_lc.settings import ServerSettings

# A registering engine must answer GET /stats with the engine key within this long: a URL of a host that is no
# engine is refused at once, before any call goes there.
PROBE_TIMEOUT_S = 2.0
# The longest a room request is held open (a client waiting longer asks again, as a long poll does).
ROOM_WAIT_SECONDS = 60.0

log = logging.getLogger("parrot_lc.server")
ERRORS = {status: {"model": ErrorBody} for status in (401, 403, 404, 408, 413, 424)}
ERRORS[400] = {"model": ErrorBody, "description": "a request refused as it is: a value that fails validation (named "
               "by `field` and `param`), JSON that does not parse, what the server does not implement"}
# Listed on every route, so that FastAPI does not list its own 422 (a validation error in its `detail` shape).
ERRORS[422] = {"model": ErrorBody, "description": "a graph of calls that cannot run, or an engine's registration "
               "refused; never a request that fails validation (400)"}
ERRORS[429] = {"model": ErrorBody, "description": "the server's queue is full: retry after `Retry-After` seconds",
               "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}}
ERRORS[503] = {"model": ErrorBody, "description": "the server is shutting down: it takes no new work"}


def create_app(manager: ParrotManager, settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watchers = [asyncio.ensure_future(watch_engines(manager, settings.engine_timeout)),
                    asyncio.ensure_future(expire_sessions(manager, settings.session_idle_timeout))]
        yield
        for watcher in watchers:
            watcher.cancel()

    app = FastAPI(title="parrot_lc", description="Serving LLM applications as graphs of Semantic Variables",
                  lifespan=lifespan)
    registry = registry_for(manager)
    api_keys = [key.encode() for key in settings.api_keys()]
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIds)  # added last, so outermost: every response (413s too) carries the id

    def check_api_key(authorization: str | None = Header(None)) -> str | None:
        """The client: a label of the API key the request carries (None where the API is open), for per-key
        limits; a missing or wrong key is refused."""
        if not api_keys:
            return None
        index = matching_key(authorization, api_keys)
        if index is None:
            raise UnauthorizedError("missing or wrong API key: send `Authorization: Bearer <key>`")
        return f"key-{index}"

    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
        return error_response(exc.status, exc.message, exc.kind, exc.field, headers, exc.code)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(400, str(exc), type(exc).__name__, "prompt" if isinstance(exc, OutOfMemoryError) else None)

    add_error_handlers(app)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        # This response is made outside every middleware, so it gets the request's id here.
        return error_response(500, "internal error (logged on the server)", "InternalError", headers=id_header())

    # HEAD as GET, without the body (uvicorn leaves it out): what uptime probes and load balancers send. A route of
    # its own, out of the schema (one route of both methods documents one operation id twice), added after GET's,
    # which a 405 names.
    @app.head("/health", include_in_schema=False)
    @app.get("/health", responses={503: {"description": "draining for a shutdown: send work elsewhere"}})
    async def health() -> JSONResponse:
        """200 while serving; 503 once a shutdown has begun, or once every engine is lost where none can come back
        (no engine key for remote engines to register with: local engines are not restarted), so that load
        balancers and health checks move on. A server of remote engines is 200 with none: they register later."""
        stranded = not manager.engines and settings.engine_key is None
        status = "draining" if manager.draining else "no_engine" if stranded else "ok"
        return JSONResponse({"status": status, "engines": len(manager.engines)},
                            status_code=200 if status == "ok" else 503)

    guarded = [Depends(check_api_key)]

    metrics_guard = guarded if settings.metrics_need_api_key else []

    @app.head("/metrics", dependencies=metrics_guard, include_in_schema=False)
    @app.get("/metrics", dependencies=metrics_guard)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache", dependencies=guarded, responses={s: ERRORS[s] for s in (401, 503)})
    async def reset_prefix_cache() -> PrefixCacheReset:
        """Frees the engines' idle warm prefix contexts and the KV blocks that their block caches keep for prompts
        no context holds any more, so that the next requests start cold (vLLM's route of that name, SGLang's
        /flush_cache). Sessions, the prefix contexts that calls use and the requests in flight keep theirs."""
        return PrefixCacheReset(freed_blocks=await manager.reset_prefix_cache())

    app.include_router(parrot_router(manager, check_api_key), dependencies=guarded)
    engine_keys = [settings.engine_key.encode()] if settings.engine_key else []

    def check_engine_key(authorization: str | None = Header(None)) -> None:
        """Every engine route needs the engine key, from any host (a client key opens none): an engine receives
        prompts and writes their answers, so only a holder of the key may become one. Without a key the server
        takes no remote engines (its local ones do not register)."""
        if not engine_keys:
            raise ForbiddenError("this server takes no remote engines: start it with --engine-key KEY, and each "
                                 "`parrot-lc engine` with the same --engine-key KEY")
        if not bearer_key_ok(authorization, engine_keys):
            raise UnauthorizedError("missing or wrong engine key: send `Authorization: Bearer <engine key>`")

    app.include_router(engines_router(manager, settings), dependencies=[Depends(check_engine_key)])
    app.include_router(openai_router(manager, manager.model.name, check_api_key), dependencies=guarded, responses=ERRORS)
    app.include_router(tokenizer_router(manager, manager.model.name), dependencies=guarded, responses=ERRORS)
    return app


async def watch_engines(manager: ParrotManager, timeout: float) -> None:
    """Drops remote engines that stopped sending heartbeats; their calls move to the others."""
    while True:
        await asyncio.sleep(timeout / 4)
        manager.pool.drop_silent(timeout)


async def expire_sessions(manager: ParrotManager, timeout: float) -> None:
    """Deletes sessions left idle past `timeout` (clients that went away without deleting them)."""
    while True:
        await asyncio.sleep(min(timeout / 4, 60.0))
        expired = await manager.expire_idle_sessions()
        if expired:
            log.info("deleted %d sessions idle for %.0f s", len(expired), timeout)


def engines_router(manager: ParrotManager, settings: ServerSettings) -> APIRouter:
    """Remote engine processes register here and send heartbeats with their counters."""
    router = APIRouter(prefix="/api/engines", responses=ERRORS)
    # The manager calls engines with the engine key (these routes open only to a server that has one).
    authorization = f"Bearer {settings.engine_key}"
    too_many = {409: {"model": ErrorBody, "description": "the server holds max_remote_engines remote engines"}}
    served = ModelIdentity.of(manager.tokenizer, manager.vocab_size, manager.max_context)

    @router.post("", status_code=201, responses=too_many)
    async def register(body: RegisterEngine) -> EngineRef:
        """Takes an engine process once its URL answers as an engine of this key that serves this server's model
        (its vocabulary, tokenizer and context: remote_engine.ModelIdentity); one registered before at the same URL
        is replaced."""
        engine = RemoteEngine(str(body.url), EngineStats(**body.stats.model_dump()), authorization)
        try:
            await engine.probe(PROBE_TIMEOUT_S)
        except EngineUnavailableError as exc:
            engine.close()
            raise EngineRefusedError(f"{body.url} does not answer as an engine of this server's engine key ({exc}): "
                                     "start `parrot-lc engine` with the same --engine-key, at an --advertise-url "
                                     "that this server reaches", field="url", code=ENGINE_UNREACHABLE) from exc
        if differences := engine.identity.differences(served):
            engine.close()
            raise EngineRefusedError(f"{body.url} serves another model than this server's {manager.model.name!r} "
                                     f"({'; '.join(differences)}): start `parrot-lc engine` with the same --model",
                                     field="url", code=MODEL_MISMATCH)
        try:
            slot = manager.pool.register(engine)
        except TooManyEnginesError:
            engine.close()
            raise
        log.info("engine %s registered from %s", slot.name, engine.url)
        return EngineRef(name=slot.name, token=slot.registration.token)

    @router.post("/{name}/heartbeat", status_code=204)
    async def heartbeat(name: str, body: EngineStatsBody, x_engine_token: str | None = Header(None)) -> Response:
        """404 unless `name` is registered with this token (the engine then registers again)."""
        manager.pool.heartbeat(name, x_engine_token, EngineStats(**body.model_dump()))
        return Response(status_code=204)

    return router


def parrot_router(manager: ParrotManager, client_of: Callable[..., str | None]) -> APIRouter:
    """Sessions, Semantic Variables and call graphs."""
    router = APIRouter(prefix="/api", responses=ERRORS)

    def session_of(session_id: str, x_session_token: str | None = Header(None)) -> Session:
        return manager.session(session_id, x_session_token)

    @router.post("/sessions", status_code=201)
    async def create_session(client: str | None = Depends(client_of)) -> NewSession:
        session = manager.create_session(client)
        _, limit = manager.call_room(session)
        return NewSession(session_id=session.session_id, session_token=session.token, call_limit=limit)

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
        manager.check_new_variables(session, len(body.variables))
        made = [manager.create_variable(session, v.name, v.value) for v in body.variables]
        return VariableRefs(variables=[VariableRef(var_id=v.var_id, name=v.name) for v in made])

    @router.put("/sessions/{session_id}/variables/{var_id}", status_code=204)
    async def set_variable(var_id: str, body: SetValue, session: Session = Depends(session_of)) -> Response:
        manager.set_variable(session, var_id, body.value)
        return Response(status_code=204)

    @router.get("/sessions/{session_id}/variables/{var_id}")
    async def get_variable(
        var_id: str, criterion: Criterion = Criterion.LATENCY,
        timeout: float | None = Query(None, ge=0, allow_inf_nan=False, description="seconds to wait (unset: no limit)"),
        session: Session = Depends(session_of),
    ) -> VariableValue:
        """Long-polls until the variable has a value (a call's output with its finish reason, stop reason and token
        usage); the criterion steers the scheduling of its producers. A failed producer gets 424, with its failure's
        code (`context_length_exceeded`: its prompt is longer than the model's context)."""
        return VariableValue.of(await manager.get_variable(session, var_id, criterion, timeout))

    @router.post("/sessions/{session_id}/calls", status_code=201)
    async def submit_calls(body: SubmitCalls, session: Session = Depends(session_of)) -> SubmittedCalls:
        """Submits one call or a whole graph of calls; each runs as soon as its inputs have values."""
        graph = [[to_piece(p) for p in call.template] for call in body.calls]
        return SubmittedCalls(call_ids=[c.call_id for c in manager.submit(session, graph)])

    @router.get("/sessions/{session_id}/room")
    async def call_room(
        calls: int = Query(1, ge=0, description="wait until this many calls fit (at most the session's limit)"),
        timeout: float = Query(ROOM_WAIT_SECONDS, ge=0, le=ROOM_WAIT_SECONDS, allow_inf_nan=False,
                               description="seconds to wait at most: the room may be less then"),
        session: Session = Depends(session_of),
    ) -> CallRoom:
        """Long-polls until the session may submit `calls` more calls (its earlier calls end, or other sessions'
        do): how a client submits a graph larger than `call_limit` in parts."""
        room, limit = await manager.wait_for_room(session, calls, timeout)
        return CallRoom(room=room, limit=limit)

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
