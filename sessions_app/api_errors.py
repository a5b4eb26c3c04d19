"""Every REST error reads ``{"code", "detail"}``, the code one of the protocol's (docs/protocol.md)."""

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import set_rollback

from media_pipeline.pipelines import ParameterError

from . import errors
from .errors import ScopeError

logger = logging.getLogger(__name__)

# The close reason for unrecoverable failures doubles as the code of server-side errors.
SERVER_ERROR = "ERROR"

STATUS_BY_CODE = {
    errors.UNKNOWN_SESSION: status.HTTP_404_NOT_FOUND,
    errors.UNAUTHORIZED: status.HTTP_403_FORBIDDEN,
    errors.INVALID_MESSAGE: status.HTTP_400_BAD_REQUEST,
    errors.INVALID_SDP: status.HTTP_400_BAD_REQUEST,
    errors.NO_CAPACITY: status.HTTP_503_SERVICE_UNAVAILABLE,
    errors.RATE_LIMITED: status.HTTP_429_TOO_MANY_REQUESTS,
    # Close reasons reach the API only from a media worker that failed to
    # answer an offer: the failure is upstream of this server.
    "SERVER_SHUTDOWN": status.HTTP_503_SERVICE_UNAVAILABLE,
}
UPSTREAM_FAILURE_STATUS = status.HTTP_502_BAD_GATEWAY
NO_CAPACITY_RETRY_AFTER_SECONDS = 5


class NegotiationTimeout(ScopeError):
    """No answer came from the media worker in time; the session was closed."""

    status_code = status.HTTP_504_GATEWAY_TIMEOUT

    def __init__(self, message: str) -> None:
        super().__init__(SERVER_ERROR, message)


def _readable(detail: Any) -> str:
    """One line out of DRF's nested error details, naming the field at fault."""
    if isinstance(detail, dict):
        return "; ".join(f"{field}: {_readable(value)}" for field, value in detail.items())
    if isinstance(detail, list):
        return "; ".join(_readable(item) for item in detail)
    return str(detail)


def _error(code: str, detail: str, status_code: int, headers: dict[str, str] | None = None) -> Response:
    set_rollback()
    return Response({"code": code, "detail": detail}, status=status_code, headers=headers)


def _api_exception_code(exc: exceptions.APIException) -> str:
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed, exceptions.PermissionDenied)):
        return errors.UNAUTHORIZED
    if isinstance(exc, exceptions.NotFound):
        return errors.UNKNOWN_SESSION
    if isinstance(exc, exceptions.Throttled):
        return errors.RATE_LIMITED
    if exc.status_code < 500:
        return errors.INVALID_MESSAGE
    return SERVER_ERROR


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    if isinstance(exc, ParameterError):
        return _error(errors.INVALID_MESSAGE, str(exc), status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, ScopeError):
        status_code = getattr(exc, "status_code", None) or STATUS_BY_CODE.get(exc.code, UPSTREAM_FAILURE_STATUS)
        # A slot or a viewer's place frees as sessions end: worth asking again soon.
        headers = {"Retry-After": str(NO_CAPACITY_RETRY_AFTER_SECONDS)} if exc.code == errors.NO_CAPACITY else None
        return _error(exc.code, exc.message, status_code, headers)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    if isinstance(exc, exceptions.APIException):
        headers = {}
        # The view has already turned 401 into 403 when no scheme can be offered.
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))
        # A body of the wrong type is a bad message like any other.
        status_code = (
            status.HTTP_400_BAD_REQUEST if isinstance(exc, exceptions.UnsupportedMediaType) else exc.status_code
        )
        return _error(_api_exception_code(exc), _readable(exc.detail), status_code, headers)
    # Still JSON for clients, still logged with its traceback for operators.
    logger.exception("Unhandled error in %s", context.get("view").__class__.__name__)
    return _error(SERVER_ERROR, "Internal server error.", status.HTTP_500_INTERNAL_SERVER_ERROR)
