"""Which WebSocket handshakes may open a socket at all: Host, Origin, or a token.

A browser sends the page's ``Origin`` with every handshake and its cookies
with it, so a page on another site could otherwise open a socket as the
logged-in user. The Origin must therefore match an allowed origin exactly —
scheme, host and port. A handshake without ``Origin`` is no browser's (and no
page can add an ``Authorization`` header to one), so it must carry its own
credentials: an ``Authorization`` header, checked by TokenAuthMiddleware
(a bad one is then refused ``UNAUTHORIZED`` / 4003 by the consumer).
Anything else is refused before the socket is accepted: daphne answers 403.
"""

import logging
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http.request import split_domain_port, validate_host

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}
SECURE_SCOPE_SCHEMES = {"https", "wss"}

Origin = tuple[str, str, int]


def parse_origin(text: str) -> Origin | None:
    """``(scheme, host, port)`` of an http(s) origin, ports made explicit; None if it is not one."""
    parts = urlsplit(text.strip())
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def parse_allowed_origins(origins: list[str]) -> frozenset[Origin]:
    parsed = {origin: parse_origin(origin) for origin in origins}
    bad = [origin for origin, value in parsed.items() if value is None]
    if bad:
        raise ImproperlyConfigured(f"SCOPE_ALLOWED_ORIGINS: not an http(s) origin: {', '.join(bad)}")
    return frozenset(value for value in parsed.values() if value is not None)


def own_origin(scope: dict, host: str) -> Origin | None:
    """This server's origin as the client reached it: the Host header, with the connection's scheme.

    Behind a trusted proxy the scheme is the one ProxyHeadersMiddleware took
    from ``X-Forwarded-Proto``.
    """
    scheme = "https" if scope.get("scheme") in SECURE_SCOPE_SCHEMES else "http"
    return parse_origin(f"{scheme}://{host}")


def refusal(scope: dict, allowed_origins: frozenset[Origin]) -> str | None:
    """Why this handshake may not open a socket; None if it may."""
    headers = {key.lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
    host = headers.get(b"host", "")
    if not validate_host(split_domain_port(host)[0], settings.ALLOWED_HOSTS):
        return f"Host {host!r} is not in ALLOWED_HOSTS"
    origin = headers.get(b"origin")
    if origin is None:
        return None if b"authorization" in headers else "no Origin and no token"
    claimed = parse_origin(origin)
    if claimed is None or claimed not in (allowed_origins or {own_origin(scope, host)}):
        return f"Origin {origin!r} is not allowed"
    return None


class OriginValidator:
    """ASGI middleware for WebSockets: refuses at the handshake what ``refusal`` names."""

    def __init__(self, inner) -> None:
        self.inner = inner
        # Empty: only the server's own origin, read from each handshake.
        self.allowed_origins = parse_allowed_origins(settings.SCOPE_ALLOWED_ORIGINS)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            reason = refusal(scope, self.allowed_origins)
            if reason is not None:
                logger.info("websocket %s refused: %s", scope.get("path"), reason)
                return await _refuse(receive, send)
        return await self.inner(scope, receive, send)


async def _refuse(receive, send) -> None:
    """Close before accepting: the server answers the handshake 403."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})
