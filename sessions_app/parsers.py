"""The API's JSON parser: DRF's, with the bounds of ``middleware`` and ``json_limits``."""

from typing import Any

from rest_framework import status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.parsers import JSONParser, get_encoding

from . import json_limits
from .middleware import MAX_BODY_BYTES


class BodyTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = f"The request body is over {MAX_BODY_BYTES // 1024} KiB."


class BoundedJSONParser(JSONParser):
    """Refuses JSON nested deeper than ``json_limits.MAX_JSON_DEPTH`` (400), before parsing it.

    The middleware refuses bodies by their declared length; this reads at most
    one byte past the limit, so a body longer than it declared is refused too (413).
    """

    def parse(self, stream, media_type: str | None = None, parser_context: dict[str, Any] | None = None) -> Any:
        encoding = get_encoding(parser_context or {})
        body = stream.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge()
        try:
            return json_limits.loads(body.decode(encoding))
        except ValueError as exc:  # too deep, undecodable, or not JSON
            raise ParseError(f"JSON parse error - {exc}") from exc
