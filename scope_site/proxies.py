"""The client behind a reverse proxy: its address and whether it spoke HTTPS.

``X-Forwarded-For`` and ``X-Forwarded-Proto`` are believed only when the
immediate peer is inside ``SCOPE_TRUSTED_PROXIES``; from anyone else they are
whatever the client chose to write. The middleware rewrites the ASGI scope,
so one rule serves both protocols: Django's ASGIRequest takes ``REMOTE_ADDR``
and ``is_secure()`` from ``scope["client"]`` and ``scope["scheme"]``, and the
consumers (rate limits) and the Origin check read the same scope. Django's
``SECURE_PROXY_SSL_HEADER`` is left unset: it would believe every peer.
"""

import ipaddress
from collections.abc import Iterable

from django.conf import settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

SECURE_SCHEMES = {"http": "https", "websocket": "wss"}
PLAIN_SCHEMES = {"http": "http", "websocket": "ws"}


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """The networks of CIDR strings (settings.env_networks has checked them)."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: tuple[Network, ...]) -> bool:
    return any(address in network for network in trusted)


def client_address(peer: str, forwarded_for: str, trusted: tuple[Network, ...]) -> str | None:
    """The client's address: the rightmost hop of ``X-Forwarded-For`` that is not a trusted proxy.

    Each proxy appends the address it saw, so hops left of the first untrusted
    one are the client's own claims. None when a hop we would believe is not
    an address at all.
    """
    hops = [peer, *reversed([hop for hop in forwarded_for.split(",") if hop.strip()])]
    client: Address | None = None
    for hop in hops:
        client = _address(hop)
        if client is None:
            return None
        if not _trusted(client, trusted):
            break
    return str(client)


def _header(scope: dict, name: bytes) -> str | None:
    """A header's value; repeated lines joined with commas, as HTTP allows."""
    values = [value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name]
    return ",".join(values) if values else None


def behind_proxy(scope: dict, trusted: tuple[Network, ...]) -> dict:
    """The scope with the forwarded client and scheme, if the peer is a trusted proxy; else unchanged."""
    peer = scope.get("client")
    peer_address = _address(peer[0]) if peer else None
    if peer_address is None or not _trusted(peer_address, trusted):
        return scope
    changes: dict = {}
    forwarded_for = _header(scope, b"x-forwarded-for")
    if forwarded_for is not None:
        address = client_address(str(peer_address), forwarded_for, trusted)
        if address is not None:
            changes["client"] = [address, 0]
    forwarded_proto = _header(scope, b"x-forwarded-proto")
    if forwarded_proto is not None:
        # The client-facing proxy's value comes first (as Django reads SECURE_PROXY_SSL_HEADER).
        proto = forwarded_proto.split(",")[0].strip().lower()
        if proto in ("https", "wss"):
            changes["scheme"] = SECURE_SCHEMES[scope["type"]]
        elif proto in ("http", "ws"):
            changes["scheme"] = PLAIN_SCHEMES[scope["type"]]
    return {**scope, **changes} if changes else scope


class ProxyHeadersMiddleware:
    """ASGI middleware: HTTP and WebSocket scopes see the client behind a trusted proxy."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.trusted = parse_networks(settings.SCOPE_TRUSTED_PROXIES)

    async def __call__(self, scope, receive, send):
        if self.trusted and scope["type"] in SECURE_SCHEMES:
            scope = behind_proxy(scope, self.trusted)
        return await self.inner(scope, receive, send)
