"""The closed set of errors the service answers with, and their one HTTP body shape.

Owns: status codes, error codes and the JSON body ``{"error": {"code", "message", "field", "value"}}``.
Does not know: where the errors are raised. Every 4xx names the offending field and value when it has one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
from starlette.responses import Response

MAX_VALUE_CHARS = 80


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, field: str | None = None, value: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value
        self.headers = headers or {}


class MalformedJSON(ServiceError):
    status, code = 400, "malformed_json"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class RequestTimeout(ServiceError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidRequest(ServiceError):
    status, code = 422, "invalid_request"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


def short(value: Any) -> Any:
    """The offending value as it goes into a body: JSON-safe and at most MAX_VALUE_CHARS long."""
    if value is None or isinstance(value, bool) or (isinstance(value, int) and -(1 << 63) <= value < 1 << 64):
        return value  # an integer orjson can write; a wider one goes as its text (it would fail the encoder)
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def error_body(exc: ServiceError, request_id: str | None = None) -> dict[str, Any]:
    """The one error body: ``{"error": {"code", "message", "field", "value"}}`` (and the request id if known)."""
    body: dict[str, Any] = {"error": {"code": exc.code, "message": exc.message, "field": exc.field,
                                      "value": short(exc.value)}}
    if request_id:
        body["request_id"] = request_id
    return body


def error_response(exc: ServiceError, request_id: str | None = None) -> Response:
    return Response(orjson.dumps(error_body(exc, request_id)), status_code=exc.status, media_type="application/json",
                    headers=exc.headers)
