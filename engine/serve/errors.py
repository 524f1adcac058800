"""OpenAI-style errors: every non-2xx answer is `{"error": {"message", "type", "param", "code"}}`.

FastAPI answers schema errors with 422 and its own shape; OpenAI (and vLLM) answer 400 with the
object above, so clients such as the `openai` package raise a `BadRequestError` that carries the
message. The handlers here make every error path (our own, FastAPI's, Starlette's 404/405 and
unexpected exceptions) use that shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# HTTP status -> OpenAI error "type"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, param, code), status_code=status, headers=headers
    )


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """The top-level request field an error is about (pydantic adds union branches and indices)."""
    parts = [str(p) for p in loc if p != "body"]
    return parts[0] if parts else None


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """(message, param, code) for the first of pydantic's errors, naming the field."""
    # A value of a union type (a prompt: string or lists) fails every branch; a failed value
    # rule (value_error, e.g. a lone surrogate) is in the branch whose type matched: say that.
    ranked = sorted(errors, key=lambda e: e.get("type") != "value_error")
    first = ranked[0] if ranked else {"msg": "invalid request", "loc": (), "type": "invalid"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg"))
        return f"request body is not valid JSON: {detail}", None, "invalid_json"
    param = _loc_to_param(tuple(first.get("loc", ())))
    extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return f"{where}{first.get('msg', 'invalid value')}{extra}", param, "invalid_value"


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param, code = validation_message(list(exc.errors()))
    return error_response(400, message, param, code)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors; an unknown route (/v1/embeddings) or method gets a message that
    says which, so a client sees what this server does not do rather than a bare "Not Found"."""
    headers = getattr(exc, "headers", None)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and exc.detail == "Not Found":
        return error_response(404, f"{where}: no such route on this server", code="not_found")
    if exc.status_code == 405:
        allowed = (headers or {}).get("Allow", "")
        return error_response(405, f"{where}: method not allowed (allowed: {allowed or 'none'})",
                              code="method_not_allowed", headers=headers)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, message, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal server error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every non-2xx answer (the OpenAPI schema's error model)."""

    error: ErrorObject


ERROR_MEANINGS = {
    400: "invalid request (the error names the field in 'param')",
    401: "missing or wrong API key",
    404: "unknown model or route",
    408: "the request body did not arrive in time",
    413: "request body too large",
    429: "too many requests waiting; retry later",
    500: "the engine failed",
    503: "the engine is not running",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: each status with the OpenAI error object as its body."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_MEANINGS.get(status, "error")}
        for status in statuses
    }


def without_validation_422(app: FastAPI) -> None:
    """FastAPI documents a 422 (its validation error shape) on every route with a body; this
    server answers schema errors with 400 and an OpenAI error object (handler above), so the
    served schema drops the 422 and the validation-error models only it referred to."""
    make_schema: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        schema = make_schema()  # FastAPI caches it: stripping again finds nothing
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
