from datetime import timedelta

from django.core.management.base import BaseCommand

from sessions_app import selectors

from ._table import age, cell, render

HEADERS = ("ID", "HOST", "PID", "DEVICE", "STATE", "SLOTS", "HEARTBEAT")
# Gone workers shown without --all: as on the dashboard.
GONE_SHOWN_FOR = timedelta(hours=1)


class Command(BaseCommand):
    help = (
        "List media workers: slots used/capacity, and how long ago each last reported (on the database's clock). "
        "Workers gone for over an hour are left out unless --all."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--all", action="store_true", dest="every_worker",
                            help="also workers gone for more than an hour")

    def handle(self, *args, every_worker: bool, **options) -> None:
        workers = selectors.workers_for_operators(gone_within=None if every_worker else GONE_SHOWN_FOR)
        rows = [
            (
                str(worker.pk),
                cell(worker.host),
                str(worker.pid),
                cell(worker.device),
                worker.state,
                f"{worker.slots_used}/{worker.capacity}",
                age(worker.heartbeat_age),
            )
            for worker in workers
        ]
        if not rows:
            self.stdout.write("No workers.")
            return
        self.stdout.write(render(HEADERS, rows))
