from django.apps import AppConfig


class SessionsAppConfig(AppConfig):
    name = "sessions_app"
    verbose_name = "Streaming sessions"

    def ready(self) -> None:
        from . import login_throttle  # noqa: F401  (connects its signal receivers)
        from . import metrics  # noqa: F401  (connects its lifecycle receivers)
        from . import lifecycle_log  # noqa: F401  (connects its lifecycle receivers: a log line per step)
        from . import webhooks  # noqa: F401  (connects its lifecycle receivers)
