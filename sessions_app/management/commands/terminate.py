import getpass
import os
import uuid

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sessions_app import selectors, services
from sessions_app.errors import ScopeError
from sessions_app.models import CloseReason


def operator() -> str:
    """Who runs this command: the user behind sudo, else the login user; ``cli`` if neither is known."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser() or "cli"
    except Exception:  # no name for this uid, no LOGNAME/USER
        return "cli"


class Command(BaseCommand):
    help = (
        "End sessions as an operator (SESSION_TERMINATED): the client gets the error and, for its socket's last "
        "session, close code 4009; the peer, pipeline and files are torn down."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("session_ids", nargs="*", metavar="ID", help="a session's id (see manage.py sessions)")
        parser.add_argument("--all", action="store_true", dest="every_session",
                            help="every open session (waiting, negotiating or live)")

    def handle(self, *args, session_ids: list[str], every_session: bool, **options) -> None:
        if every_session == bool(session_ids):
            raise CommandError("name the sessions to end, or give --all (not both)")
        session_ids = selectors.open_session_ids() if every_session else session_ids
        if not session_ids:
            self.stdout.write("No open sessions.")
            return
        by = f"command:{operator()}"
        unknown, ended = [], 0
        for session_id in session_ids:
            try:
                # The canonical form; a malformed id is as unknown as an absent one.
                session_id = str(uuid.UUID(session_id))
                closed = services.session_close(session_id=session_id, reason=CloseReason.SESSION_TERMINATED, by=by)
            except (ValueError, ScopeError):
                self.stderr.write(f"{session_id}: no such session")
                unknown.append(session_id)
                continue
            ended += closed
            self.stdout.write(f"{session_id}: {'terminated' if closed else 'had already ended'}")
        if ended and settings.SCOPE_EMBEDDED:
            # This process's in-memory channel layer reaches no server: the server's own sweep re-sends the close.
            bound = settings.SCOPE_CLOSE_WAIT_SECONDS + settings.SCOPE_SWEEP_SECONDS
            self.stdout.write(
                f"Embedded server: its sweep tears these sessions' peers down within {bound:g} s; "
                "a socket whose session was still waiting for its offer hears of it only when it offers."
            )
        if unknown:
            raise CommandError(f"{len(unknown)} of {len(session_ids)} sessions not found: {', '.join(unknown)}")
