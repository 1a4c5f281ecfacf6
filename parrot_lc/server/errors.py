"""Errors of the server core; the HTTP layer maps each to a status code and a JSON body."""

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
"""OpenAI's code of a request whose prompt and `max_tokens` do not fit in the model's context."""


class ServerError(Exception):
    """Base class; `field` names the offending part of the request, when there is one. `code` is OpenAI's error
    code where one applies (an answer's `code`, which clients such as LangChain's ChatOpenAI act on): the class's,
    unless the error names its own."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    @property
    def kind(self) -> str:
        """The error's `type` in an answer: its class's name, and `BadRequestError` (vLLM's) for a request refused
        as it is, so that a 400 never reads as a fault of the server."""
        return "BadRequestError" if type(self) is ServerError else type(self).__name__


class UnauthorizedError(ServerError):
    """A missing or wrong key (a client's API key, or an engine's key)."""

    status = 401
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, field="authorization")


class NotFoundError(ServerError):
    status = 404


class GraphError(ServerError):
    """A graph that cannot run: a cycle, a variable produced twice, an unknown variable."""

    status = 422


class ForbiddenError(ServerError):
    status = 403


class VariableTimeoutError(ServerError):
    status = 408


class QueueFullError(ServerError):
    """The server holds as much work as it may queue; the client should retry after `retry_after` seconds."""

    status = 429
    code = "rate_limit_exceeded"
    retry_after = 1


class ShuttingDownError(ServerError):
    """The server is stopping: it finishes the work it has and takes no more."""

    status = 503


class NoEngineError(ServerError):
    """No engine could take a call (none is registered, or every one was lost): nothing is wrong with the request,
    which a client may send again (the `openai` package retries a 503 by itself)."""

    status = 503
    code = "engine_unavailable"


class CallFailedError(ServerError):
    """The call producing a variable failed; the message says why."""

    status = 424


ENGINE_UNREACHABLE = "engine_unreachable"
"""The code of a registration whose URL did not answer the server's probe (yet: a Service without ready endpoints, a
slow start): the engine asks again."""
MODEL_MISMATCH = "model_mismatch"
"""The code of a registration of an engine of another model: asking again gets the same answer."""


class EngineRefusedError(ServerError):
    """A remote engine's registration that the server does not take: its URL answers as no engine of this
    server's key (code ENGINE_UNREACHABLE), or as one of another model (MODEL_MISMATCH)."""

    status = 422


class TooManyEnginesError(ServerError):
    """The server holds as many remote engines as it may (max_remote_engines)."""

    status = 409
