"""ICE server lists with short-lived TURN credentials (coturn's ``use-auth-secret``).

The TURN REST API scheme: this server and the TURN server share a secret
(``SCOPE_TURN_SECRET``; coturn's ``static-auth-secret``) and nothing else. Each
caller gets a username ``"<expiry unix time>:<label>"`` and, as its password,
base64(HMAC-SHA1(secret, username)). The TURN server recomputes the HMAC and
refuses the username once its expiry has passed, so a credential that leaks
from a page is useless ``SCOPE_TURN_TTL_SECONDS`` later. coturn checks the
expiry when an allocation is made, not when it is refreshed: a session that
got its relay in time keeps it for as long as it lasts.

``ice_servers_for(user)`` is what clients are handed (REST, the signaling
socket) and what a media worker's own peer uses (``label="worker"``): one entry
for ``SCOPE_TURN_URLS`` with fresh credentials, then the static
``SCOPE_ICE_SERVERS``, as RTCIceServer dictionaries.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import time
from typing import Any

from django.conf import settings

ANONYMOUS_LABEL = "anonymous"


def turn_credentials(secret: str, label: str, ttl_seconds: float, *, now: float | None = None) -> tuple[str, str]:
    """(username, password) valid until ``now + ttl_seconds`` on a TURN server sharing ``secret``."""
    expiry = int(time.time() if now is None else now) + int(ttl_seconds)
    username = f"{expiry}:{label}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def label_for(user: Any) -> str:
    """Who a credential is for, as the TURN server's logs show it: the username, or ``anonymous``."""
    if user is None or not getattr(user, "is_authenticated", False):
        return ANONYMOUS_LABEL
    return user.get_username() or ANONYMOUS_LABEL


def ice_servers_for(user: Any = None, *, label: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
    """When TURN is configured, its URLs with credentials for this caller; then the static ICE servers.

    ``label`` overrides the user's label (a media worker passes ``"worker"``).
    """
    servers = copy.deepcopy(settings.SCOPE_ICE_SERVERS)
    if settings.SCOPE_TURN_URLS and settings.SCOPE_TURN_SECRET:
        username, credential = turn_credentials(
            settings.SCOPE_TURN_SECRET,
            label if label is not None else label_for(user),
            settings.SCOPE_TURN_TTL_SECONDS,
            now=now,
        )
        # First: aiortc (the workers, script clients) uses only the first TURN URL it finds.
        servers.insert(0, {"urls": list(settings.SCOPE_TURN_URLS), "username": username, "credential": credential})
    return servers
