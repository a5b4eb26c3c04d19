import functools
import os

from celery import Celery
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
app.autodiscover_tasks()
