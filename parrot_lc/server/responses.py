"""The JSON body of every error answer, of the manager's HTTP layer and of an engine's: one shape that clients
read, `{"error": {"message", "type", "field", "param", "code"}}`, where `field` names the offending part of the
request and `param` is the same name under OpenAI's key; `code` is a short string saying which error it is (OpenAI's
code where one applies, pydantic's error type for a value that fails validation) or null. OpenAI's clients read
`param` and `code` (the `openai` package's `APIError.param` and `.code`)."""

from __future__ import annotations

import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from parrot_lc.server.schemas import INVALID_CONSTRAINT, INVALID_TEXT, NOT_SUPPORTED

# Every request that fails validation is answered with 400, as OpenAI's API, vLLM and SGLang answer it (the `openai`
# package raises its BadRequestError for it; FastAPI's own 422 would raise UnprocessableEntityError). The `type` of
# a malformed request (not Unicode text, asking for what the server does not implement, a constraint that is no
# grammar), by its validator's error type; a value that the schema refuses is a ValidationError.
BAD_REQUEST_ERRORS = {INVALID_TEXT: "MalformedText", "string_unicode": "MalformedText", NOT_SUPPORTED: "NotSupported",
                      INVALID_CONSTRAINT: "InvalidConstraint"}
# The part of a request that an error's location begins with: a field is named without it.
REQUEST_PARTS = {"body", "query", "path", "header", "cookie"}
# The member of a union that a value failed, which pydantic writes into the error's location (`stop.str` for a `stop`
# that is neither a string nor a list of them): a type, no part of the request.
UNION_MEMBER = re.compile(r"str|int|float|bool|[a-z-]+\[.*\]")
# Where the fault lies in Starlette's own errors: a body it could not parse, a path or a method it does not route.
HTTP_ERROR_FIELDS = {400: "body", 404: "path", 405: "method"}


def error_response(status: int, message: str, kind: str, field: str | None = None,
                   headers: dict[str, str] | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, field, code), status_code=status, headers=headers)


def error_body(message: str, kind: str, field: str | None = None, code: str | None = None) -> dict:
    """`{"error": ...}` in the documented shape: also the last event of a stream whose call fails."""
    field = None if field is None else printable(field)
    return {"error": {"message": printable(message), "type": kind, "field": field, "param": field, "code": code}}


def printable(text: str) -> str:
    """`text` with what UTF-8 cannot encode (a lone surrogate, sent as a JSON escape) written as an escape: an error
    that quotes a bad request (an unknown field's name) must not itself fail to encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def add_error_handlers(app: FastAPI) -> None:
    """Answers FastAPI's and Starlette's own errors in the documented shape, not as `{"detail": ...}`."""
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The first error of a request body, query or header that failed validation, naming its field (a validator
    that refuses one of a body's fields itself names it in the error's context)."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(400, f"malformed JSON: {first['msg']}", "MalformedJSON", "body", code=first["type"])
    loc, named = first["loc"], first.get("ctx", {}).get("field")
    path = [str(p) for p in (loc[1:] if loc and loc[0] in REQUEST_PARTS else loc)
            if not (isinstance(p, str) and UNION_MEMBER.fullmatch(p))] + ([named] if named else [])
    field = ".".join(path) or "body"
    kind = BAD_REQUEST_ERRORS.get(first["type"])
    return error_response(400, f"{field}: {first['msg']}", kind or "ValidationError", field, code=first["type"])


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's errors: a path it does not route (404), a method the path does not take (405), a body that is no
    JSON text (400: not UTF-8, or nested deeper than the parser goes; the parser's error says which)."""
    cause = exc.__cause__ or f"{request.method} {request.url.path}"
    kind = HTTPStatus(exc.status_code).phrase.replace(" ", "")
    return error_response(exc.status_code, f"{exc.detail}: {cause}", kind, HTTP_ERROR_FIELDS.get(exc.status_code),
                          exc.headers)
