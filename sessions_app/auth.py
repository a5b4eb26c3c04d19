"""``Authorization: Token <key>`` on the signaling socket, for scripts."""

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from django.contrib.auth.models import AnonymousUser
from rest_framework.authtoken.models import Token


@database_sync_to_async
def _user_for_token(key: str):
    token = Token.objects.select_related("user").filter(key=key).first()
    if token is None or not token.user.is_active:
        return None
    return token.user


class TokenAuthMiddleware(BaseMiddleware):
    """Authenticates by token when the header is present; a bad token marks the scope.

    A bad token is refused even where anonymous streaming is allowed, so the
    consumer is told (``scope["auth_error"]``) rather than falling back to anonymous.
    """

    async def __call__(self, scope, receive, send):
        header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        if header:
            scheme, _, key = header.partition(" ")
            user = await _user_for_token(key.strip()) if scheme.lower() == "token" and key.strip() else None
            scope = dict(scope, user=user or AnonymousUser(), auth_error=user is None)
        return await super().__call__(scope, receive, send)
