"""Request limits that hold for every REST route, before any view, parser or authentication runs."""

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse

from . import errors

MAX_BODY_BYTES = 64 * 1024
API_PREFIX = "/api/"


class RequestBodyLimitMiddleware:
    """A REST request body over 64 KiB is 413 ``INVALID_MESSAGE``, refused by its declared length.

    Nothing in the API takes more (an SDP offer is at most 60 kB). Refused
    here, a large body is never parsed, so it costs no parsing and is never a
    500; one longer than it declared is stopped by ``parsers.BoundedJSONParser``.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(API_PREFIX) and _declared_length(request) > MAX_BODY_BYTES:
            return JsonResponse(
                {"code": errors.INVALID_MESSAGE, "detail": f"The request body is over {MAX_BODY_BYTES // 1024} KiB."},
                status=413,
            )
        return self.get_response(request)


def _declared_length(request: HttpRequest) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0  # Django and DRF read such a request as having no body
