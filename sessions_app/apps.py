from django.apps import AppConfig


class SessionsAppConfig(AppConfig):
    name = "sessions_app"
    verbose_name = "Streaming sessions"

    def ready(self) -> None:
        from . import login_throttle  # noqa: F401  (connects its signal receivers)
