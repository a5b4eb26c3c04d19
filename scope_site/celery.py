import functools
import logging
import os

from celery import Celery, signals
from celery.worker.consumer import Consumer

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scope_site.settings")

# How the worker retries its broker (Redis) once the connection is lost: every
# half second, then every second. Kombu's default waits 2, 4, 6 … up to 30 s
# between tries, so the safety-net sweep could stay away for half a minute
# after Redis is back.
BROKER_RETRY_INTERVALS = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 1.0}


class BrokerReturnConsumer(Consumer):
    """Celery's worker consumer, reconnecting to the broker within a second of its return."""

    def ensure_connected(self, conn):
        conn.ensure_connection = functools.partial(conn.ensure_connection, **BROKER_RETRY_INTERVALS)
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # back to the class's own method


app = Celery("scope_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.worker_consumer = "scope_site.celery:BrokerReturnConsumer"
# Logging is settings.LOGGING's, as in every process (scope_site/logs.py): Celery
# neither replaces the root logger's handler nor redirects stdout into it.
app.conf.worker_hijack_root_logger = False
app.autodiscover_tasks()


@signals.setup_logging.connect
def _django_logging(**kwargs) -> None:
    """With a receiver here Celery leaves logging alone; LOG_LEVEL applies, not ``--loglevel``."""
    from django.conf import settings
    from django.utils.log import configure_logging

    configure_logging(settings.LOGGING_CONFIG, settings.LOGGING)


@signals.celeryd_after_setup.connect
def _banner_as_a_log_line(sender, instance, **kwargs) -> None:
    """In JSON, the worker's start-up banner (printed to stdout) becomes one log line."""
    from django.conf import settings

    if settings.SCOPE_LOG_FORMAT == "json" and not instance.quiet:
        instance.quiet = True  # checked right after this signal: no banner
        logging.getLogger("celery.worker").info(
            "celery worker %s starting", sender, extra={"banner": instance.startup_info(artlines=False).strip()}
        )
