"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with the right status.

Every failure a client can cause becomes an `APIError` (a Starlette `HTTPException`, so that FastAPI passes
it through its own body parsing untouched); FastAPI's validation errors become 422s in the same shape; and
anything unexpected becomes a 500 in the same shape with the request id, the traceback going to the log
only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("clipserve.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(StarletteHTTPException):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=dict(headers) if headers else None)
        self.message = message
        self.param = param
        self.code = code


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _TYPES.get(s, "error")} for s in statuses}


# The statuses each kind of route documents in the OpenAPI schema.
AUTH_ERRORS = _responses(401, 403, 429)
INFERENCE_ERRORS = _responses(400, 401, 403, 404, 413, 422, 429, 503, 504)
ADMIN_ERRORS = _responses(400, 401, 403, 404, 409, 422, 503)


def error_payload(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_payload(status, message, param, code), status_code=status, headers=headers)


def _location(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts)


def _validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    where = _location(first.get("loc", ()))
    message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, where or None


def install_error_handlers(app: FastAPI, on_error: Any = None) -> None:
    """Route every error through the OpenAI shape; `on_error(code_or_type)` counts them (metrics)."""

    def count(kind: str) -> None:
        if on_error is not None:
            on_error(kind)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, APIError):
            count(exc.code or _TYPES.get(exc.status_code, "error"))
            return error_response(exc.status_code, exc.message, exc.param, exc.code, exc.headers)
        count(_TYPES.get(exc.status_code, "error"))
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return error_response(exc.status_code, detail, headers=exc.headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        count("validation_error")
        message, param = _validation_message(exc.errors())
        return error_response(422, message, param, "validation_error")

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        count("internal_error")
        request_id = request.scope.get("state", {}).get("request_id")
        log.error("unhandled error", exc_info=exc)
        # Starlette answers unhandled errors outside the middleware that adds X-Request-ID to other responses
        headers = {"X-Request-ID": request_id} if request_id else None
        return error_response(
            500, f"internal server error (request id {request_id})", code="internal_error", headers=headers
        )

    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
