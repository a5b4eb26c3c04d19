from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path

from sessions_app import health, metrics, views

urlpatterns = [
    path("", views.stream_page, name="stream"),
    path("dashboard/", views.dashboard_page, name="dashboard"),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("sessions_app.api_urls")),
    re_path(r"^healthz/?$", health.healthz),
    re_path(r"^readyz/?$", health.readyz),
    re_path(r"^metrics/?$", metrics.metrics_view),
]
