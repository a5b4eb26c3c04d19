from django.contrib import admin
from django.urls import include, path, re_path

from sessions_app import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("sessions_app.api_urls")),
    re_path(r"^healthz/?$", health.healthz),
    re_path(r"^readyz/?$", health.readyz),
]
