import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scope_site.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from scope_site import process  # noqa: E402
from scope_site.origins import OriginValidator  # noqa: E402
from scope_site.proxies import ProxyHeadersMiddleware  # noqa: E402
from sessions_app.auth import TokenAuthMiddleware  # noqa: E402
from sessions_app.routing import websocket_urlpatterns  # noqa: E402

process.apply_patches()

# Outermost: everything inside (Django, the Origin check, rate limits) sees the
# client behind a trusted proxy.
router = ProxyHeadersMiddleware(
    ProtocolTypeRouter(
        {
            # The pages' own CSS and JS (and the admin's), served by the app itself:
            # no build step, no collectstatic, nothing fetched from elsewhere.
            "http": ASGIStaticFilesHandler(django_asgi_app),
            "websocket": OriginValidator(AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))),
        }
    )
)


class ScopeApplication:
    """Before the first connection is served: SIGTERM drains this process; embedded, its media worker starts."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope, receive, send):
        process.install_sigterm_drain()
        if settings.SCOPE_EMBEDDED:
            await process.start_embedded()
        return await self.inner(scope, receive, send)


application = ScopeApplication(router)
