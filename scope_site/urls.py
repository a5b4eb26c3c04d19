from django.contrib import admin
from django.urls import include, path

from sessions_app import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("sessions_app.api_urls")),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
]
