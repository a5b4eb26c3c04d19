"""Failed logins, throttled per username and per client address.

Every failed password check (``user_login_failed``, sent by Django's
``authenticate``) counts against the username tried and the client's address
(the real one behind a trusted proxy: scope_site/proxies.py). Past
``SCOPE_LOGIN_FAILURES_PER_USERNAME`` or ``SCOPE_LOGIN_FAILURES_PER_ADDRESS``
within ``SCOPE_LOGIN_LOCKOUT_SECONDS`` of the first failure, a login POST
(the login page's or the admin's) gets the 429 page without its password
being checked, so guessing stops there. A successful login clears its
username's count; an address's count only expires, or one valid account
would let its owner guess at everyone else's.

Counts live in Django's cache: Redis when scaled, so every web process counts
together; local memory when embedded (one process). If the cache is down,
logins go through unthrottled rather than nobody logging in.
"""

import hashlib
import logging

from django.conf import settings
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.cache import cache
from django.dispatch import receiver
from django.shortcuts import render
from django.utils.deprecation import MiddlewareMixin

logger = logging.getLogger(__name__)

LOGIN_VIEWS = {"login", "admin:login"}


def _username_key(username: str) -> str:
    # Hashed: a username is arbitrary text, and cache keys have rules.
    digest = hashlib.sha256(username.strip().casefold().encode()).hexdigest()
    return f"scope:login-failures:username:{digest}"


def _address_key(address: str) -> str:
    return f"scope:login-failures:address:{address}"


def _limits(username: str, address: str | None) -> list[tuple[str, int]]:
    limits = [(_username_key(username), settings.SCOPE_LOGIN_FAILURES_PER_USERNAME)] if username.strip() else []
    if address:
        limits.append((_address_key(address), settings.SCOPE_LOGIN_FAILURES_PER_ADDRESS))
    return limits


def is_throttled(*, username: str, address: str | None) -> bool:
    limits = _limits(username, address)
    try:
        counts = cache.get_many([key for key, _ in limits])
        return any(counts.get(key, 0) >= limit for key, limit in limits)
    except Exception:
        logger.warning("login throttle cache unavailable; not throttling", exc_info=True)
        return False


def record_failure(*, username: str, address: str | None) -> None:
    window = settings.SCOPE_LOGIN_LOCKOUT_SECONDS
    try:
        for key, _ in _limits(username, address):
            # The window starts at the first failure; incr keeps the key's expiry.
            if not cache.add(key, 1, timeout=window):
                try:
                    cache.incr(key)
                except ValueError:  # expired between add and incr
                    cache.add(key, 1, timeout=window)
    except Exception:
        logger.warning("login throttle cache unavailable; failure not counted", exc_info=True)


@receiver(user_login_failed, dispatch_uid="scope-login-throttle-failed")
def _count_failure(sender, credentials, request=None, **kwargs) -> None:
    address = request.META.get("REMOTE_ADDR") if request is not None else None
    record_failure(username=str(credentials.get("username", "")), address=address)


@receiver(user_logged_in, dispatch_uid="scope-login-throttle-succeeded")
def _clear_username(sender, request, user, **kwargs) -> None:
    try:
        cache.delete(_username_key(user.get_username()))
    except Exception:
        logger.warning("login throttle cache unavailable; count not cleared", exc_info=True)


class LoginThrottleMiddleware(MiddlewareMixin):
    """Answers a throttled login POST with the 429 page before its view checks the password."""

    def process_view(self, request, view_func, view_args, view_kwargs):
        if request.method != "POST" or request.resolver_match.view_name not in LOGIN_VIEWS:
            return None
        username = request.POST.get("username", "")
        address = request.META.get("REMOTE_ADDR")
        if not is_throttled(username=username, address=address):
            return None
        logger.warning("login throttled: username %r from %s", username, address)
        minutes = max(1, round(settings.SCOPE_LOGIN_LOCKOUT_SECONDS / 60))
        response = render(request, "429.html", {"minutes": minutes}, status=429)
        response["Retry-After"] = str(int(settings.SCOPE_LOGIN_LOCKOUT_SECONDS))
        return response
