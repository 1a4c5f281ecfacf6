"""The JSON body of every error answer, of the manager's HTTP layer and of an engine's: one shape that clients
read, `{"error": {"message", "type", "field"}}`, where `field` names the offending part of the request."""

from __future__ import annotations

from starlette.responses import JSONResponse


def error_response(status: int, message: str, kind: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "field": field}}, status_code=status,
                        headers=headers)
