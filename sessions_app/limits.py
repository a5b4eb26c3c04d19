"""Rate limits on connections and offers, per user and per client address.

Counted in fixed one-minute windows in Django's cache, which is Redis when
scaled (so every web process counts together) and local memory when embedded
(one process). A cache outage lets requests through rather than refusing
everyone: these limits protect capacity, not identity.
"""

import logging
import time

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.cache import cache

from . import errors
from .errors import ScopeError

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60


def _within(key: str, limit: int) -> bool:
    bucket = f"scope:rate:{key}:{int(time.time() // WINDOW_SECONDS)}"
    try:
        cache.add(bucket, 0, timeout=2 * WINDOW_SECONDS)
        return cache.incr(bucket) <= limit
    except Exception:
        logger.warning("rate limit cache unavailable; letting %s through", key, exc_info=True)
        return True


def _check(kind: str, limit: int, user: AbstractBaseUser | AnonymousUser, address: str | None) -> None:
    keys = [f"{kind}:addr:{address}"] if address else []
    if user.is_authenticated:
        keys.append(f"{kind}:user:{user.pk}")
    for key in keys:
        if not _within(key, limit):
            raise ScopeError(errors.RATE_LIMITED, f"Too many {kind}s: at most {limit} a minute. Try again shortly.")


def check_connection(*, user: AbstractBaseUser | AnonymousUser, address: str | None) -> None:
    _check("connection", settings.SCOPE_CONNECTIONS_PER_MINUTE, user, address)


def check_offer(*, user: AbstractBaseUser | AnonymousUser, address: str | None) -> None:
    _check("offer", settings.SCOPE_OFFERS_PER_MINUTE, user, address)
