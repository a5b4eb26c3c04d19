"""The two pages: streaming (``/``) and the operators' dashboard (``/dashboard/``).

Both are thin: the page's script speaks the public signaling protocol and REST
API; the view only decides who may see the page and hands it its settings.
"""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie


@ensure_csrf_cookie
def stream_page(request: HttpRequest) -> HttpResponse:
    if not (request.user.is_authenticated or settings.SCOPE_ALLOW_ANONYMOUS):
        return redirect_to_login(request.get_full_path())
    return render(
        request,
        "stream.html",
        {"max_session_seconds": settings.SCOPE_MAX_SESSION_SECONDS},
    )


@login_required
@ensure_csrf_cookie
def dashboard_page(request: HttpRequest) -> HttpResponse:
    # A signed-in non-operator is refused, not sent round the login page again.
    if not request.user.is_staff:
        raise PermissionDenied("The dashboard is for staff.")
    return render(request, "dashboard.html")
