from django.core.management.base import BaseCommand, CommandError

from sessions_app import selectors, services
from sessions_app.models import Worker


class Command(BaseCommand):
    help = (
        "Drain a media worker: no new session is placed on it from now on, while the sessions it holds go on "
        "until they end. It stays draining until its process stops (SIGTERM ends what is left SERVER_SHUTDOWN)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("worker_id", type=int, metavar="ID", help="the worker's id (see manage.py workers)")

    def handle(self, *args, worker_id: int, **options) -> None:
        worker = selectors.workers_for_operators().filter(pk=worker_id).first()
        if worker is None:
            raise CommandError(f"no worker {worker_id}")
        if worker.state == Worker.State.GONE:
            raise CommandError(f"worker {worker_id} is gone: there is nothing to drain")
        services.worker_drain(worker_id=worker_id)
        already = " (it already was)" if worker.state == Worker.State.DRAINING else ""
        held = worker.slots_used
        holds = "the session it holds goes on" if held == 1 else f"the {held} sessions it holds go on"
        self.stdout.write(f"worker {worker_id} is draining{already}: no new session is placed on it; {holds}.")
