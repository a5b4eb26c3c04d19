from django.core.management.base import BaseCommand

from sessions_app import selectors
from sessions_app.models import StreamSession

from ._table import cell, moment, render

HEADERS = ("ID", "STATE", "OWNER", "PIPELINE", "WORKER", "CREATED", "REASON")


class Command(BaseCommand):
    help = "List sessions, oldest first: every one not yet closed, or those in the states named with --state."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--state", action="append", choices=StreamSession.State.values, dest="states",
                            help="only sessions in this state; repeat for several (default: every state but closed)")

    def handle(self, *args, states: list[str] | None, **options) -> None:
        rows = [
            (
                str(session.pk),
                session.state,
                cell(session.owner.get_username() if session.owner else None),
                cell(session.pipeline),
                cell(session.worker_id),
                moment(session.created_at),
                cell(session.close_reason),
            )
            for session in selectors.sessions_for_operators(states=states)
        ]
        if not rows:
            self.stdout.write("No sessions.")
            return
        self.stdout.write(render(HEADERS, rows))
