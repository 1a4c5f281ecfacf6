"""Typed errors of the frontend: each HTTP error of the Parrot server becomes one of these, keeping the
server's message, its error type and the request field it names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
"""OpenAI's error code of a prompt longer than the model's context (and of a failed call's fetch, whose prompt was)."""


class ParrotError(Exception):
    """Base class. `status` is the HTTP status (None for errors raised on the client side), `type` the
    server's error type, `field` the part of the request the server blames, when it names one, and `code` OpenAI's
    error code, where one applies (`context_length_exceeded`...)."""

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.field = field
        self.code = code


class InvalidRequestError(ParrotError):
    """A request the server refused as malformed or out of range (400, 413)."""


class AuthError(ParrotError):
    """A missing or wrong API key (401), or a session token that does not open the session (403)."""


class NotFoundError(ParrotError):
    """An unknown (or deleted) session or variable (404)."""


class GraphError(ParrotError):
    """A graph of calls that cannot run: a cycle, a variable produced twice, an unknown variable (422)."""


class CallFailedError(ParrotError):
    """The call producing a variable failed; the message says why (424), and `code` where OpenAI has one for it (a
    prompt longer than the model's context: `context_length_exceeded`)."""


class VariableTimeoutError(ParrotError, TimeoutError):
    """A variable had no value within the fetch's timeout (408)."""


class IdleTimeoutError(VariableTimeoutError):
    """A wait for many values (`Session.get_values`) saw none arrive for its idle timeout: no call of the session
    ended for that long, as on a server that stopped answering. `waited` is how long (seconds), `missing` how many
    of the session's call outputs still had no value."""

    def __init__(self, message: str, *, waited: float, missing: int) -> None:
        super().__init__(message, field="idle_timeout")
        self.waited = waited
        self.missing = missing


class RequestTimeoutError(ParrotError, TimeoutError):
    """The server did not answer an HTTP request within the client's timeout."""


class ParrotConnectionError(ParrotError, ConnectionError):
    """The server could not be reached."""


class RateLimitError(ParrotError):
    """The server's queue was full (429): nothing of the request ran. The clients retry it (`max_retries`) after
    `retry_after` seconds, the server's Retry-After, as the `openai` package does."""

    retry_after: float | None = None


class ServerFailure(ParrotError):
    """The server failed on its side, or is shutting down (5xx). (Not the server's own `ServerError`, the base of
    the errors it answers with 4xx.)"""


_BY_STATUS: dict[int, type[ParrotError]] = {
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    408: VariableTimeoutError,
    424: CallFailedError,
    429: RateLimitError,
}


def error_from_response(status: int, body: Any, text: str) -> ParrotError:
    """The typed error for an HTTP error response. `body` is its parsed JSON (None if it was not JSON),
    `text` its raw text, used when the body is not the server's `{"error": {...}}` shape (e.g. a proxy)."""
    detail = body.get("error") if isinstance(body, dict) else None
    code = None
    if isinstance(detail, dict) and isinstance(detail.get("message"), str):
        message, kind, field, code = detail["message"], detail.get("type"), detail.get("field"), detail.get("code")
    else:
        message, kind, field = f"HTTP {status}: {text[:500]}", None, None
    if status == 422 and kind == "GraphError":
        cls: type[ParrotError] = GraphError
    elif status >= 500:
        cls = ServerFailure
    else:
        cls = _BY_STATUS.get(status, InvalidRequestError)
    return cls(message, status=status, type=kind, field=field, code=code if isinstance(code, str) else None)


def response_body(response: "httpx.Response") -> Any:
    """The JSON body of a success (None if empty); a failure raises its typed ParrotError with the server's
    message (`{"error": {"message", "type", "field"}}`)."""
    if response.is_success:
        return response.json() if response.content else None
    try:
        body = response.json()
    except ValueError:
        body = None
    error = error_from_response(response.status_code, body, response.text)
    if isinstance(error, RateLimitError):
        try:
            error.retry_after = float(response.headers.get("retry-after", ""))
        except ValueError:
            pass
    raise error
