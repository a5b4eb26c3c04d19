from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sessions_app.models import SessionEvent
from sessions_app.selectors import retention_cutoff, sessions_closed_before
from sessions_app.services import sessions_prune


class Command(BaseCommand):
    help = "Delete closed sessions, and their events, that closed more than SCOPE_RETENTION_DAYS days ago."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--days", type=float, default=None,
                            help="keep this many days instead of SCOPE_RETENTION_DAYS (0: prune every closed session)")
        parser.add_argument("--dry-run", action="store_true", help="only say what would be deleted")

    def handle(self, *args, days: float | None, dry_run: bool, **options) -> None:
        if days is None:
            days = settings.SCOPE_RETENTION_DAYS
            if not days:
                self.stdout.write("SCOPE_RETENTION_DAYS is 0: every record is kept.")
                return
        if days < 0:
            raise CommandError("--days must not be negative")
        older_than = retention_cutoff(days)
        sessions = sessions_closed_before(older_than)
        events = SessionEvent.objects.filter(session__in=sessions).count()
        what = f"sessions and {events} events, closed before {older_than.isoformat()}."
        if dry_run:
            self.stdout.write(f"Would delete {sessions.count()} {what}")
            return
        self.stdout.write(f"Deleted {sessions_prune(older_than=older_than)} {what}")
