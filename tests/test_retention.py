"""Records do not grow forever: ``prunesessions``, the daily Celery task, and embedded mode's timer."""

import asyncio
from datetime import timedelta
from io import StringIO

import pytest
from channels.db import database_sync_to_async
from django.core.management import call_command
from django.utils import timezone

from scope_site.celery import app as celery_app
from sessions_app import services, tasks
from sessions_app.models import CloseReason, SessionEvent, StreamSession

pytestmark = pytest.mark.django_db(transaction=True)

TRAIL = ["created", "placed", "closing", "closed"]


def session(*, state: str, days_ago: float) -> StreamSession:
    """A session created ``days_ago`` days ago; if closing or closed, it got there that day too."""
    at = timezone.now() - timedelta(days=days_ago)
    record = StreamSession.objects.create(state=state)
    ended = state in (StreamSession.State.CLOSING, StreamSession.State.CLOSED)
    StreamSession.objects.filter(pk=record.pk).update(
        created_at=at,
        closing_at=at if ended else None,
        closed_at=at if state == StreamSession.State.CLOSED else None,
        close_reason=CloseReason.CLIENT_DISCONNECT if ended else "",
    )
    SessionEvent.objects.bulk_create(SessionEvent(session=record, kind=kind, at=at) for kind in TRAIL)
    return record


@pytest.fixture
def sessions() -> dict[str, StreamSession]:
    return {
        "old closed": session(state=StreamSession.State.CLOSED, days_ago=40),
        "recent closed": session(state=StreamSession.State.CLOSED, days_ago=5),
        "old live": session(state=StreamSession.State.LIVE, days_ago=40),
        "old closing": session(state=StreamSession.State.CLOSING, days_ago=40),
    }


def remaining(sessions: dict[str, StreamSession]) -> set[str]:
    kept = set(StreamSession.objects.values_list("pk", flat=True))
    return {name for name, record in sessions.items() if record.pk in kept}


def prunesessions(*args: str) -> str:
    out = StringIO()
    call_command("prunesessions", *args, stdout=out)
    return out.getvalue()


def test_prunesessions_deletes_old_closed_sessions_and_their_events(sessions) -> None:
    output = prunesessions()
    assert output.startswith("Deleted 1 sessions and 4 events, closed before ")
    assert remaining(sessions) == {"recent closed", "old live", "old closing"}
    assert not SessionEvent.objects.filter(session_id=sessions["old closed"].pk).exists()
    assert SessionEvent.objects.count() == 3 * len(TRAIL)


def test_prunesessions_dry_run_deletes_nothing(sessions) -> None:
    assert prunesessions("--dry-run").startswith("Would delete 1 sessions and 4 events, closed before ")
    assert remaining(sessions) == set(sessions)


def test_prunesessions_days_overrides_the_setting(sessions) -> None:
    assert prunesessions("--days", "3").startswith("Deleted 2 sessions and 8 events")
    assert remaining(sessions) == {"old live", "old closing"}


def test_a_retention_of_zero_keeps_everything(sessions, settings) -> None:
    settings.SCOPE_RETENTION_DAYS = 0
    assert prunesessions() == "SCOPE_RETENTION_DAYS is 0: every record is kept.\n"
    assert tasks.prune_sessions() == 0
    assert remaining(sessions) == set(sessions)


def test_prune_deletes_a_backlog_in_batches(monkeypatch) -> None:
    monkeypatch.setattr(services, "PRUNE_BATCH_SIZE", 2)
    for _ in range(5):
        session(state=StreamSession.State.CLOSED, days_ago=40)
    assert services.sessions_prune(older_than=timezone.now() - timedelta(days=30)) == 5
    assert not StreamSession.objects.exists() and not SessionEvent.objects.exists()


def test_celery_beat_prunes_daily_with_the_setting(sessions, settings) -> None:
    entry = next(e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"] == "sessions_app.prune_sessions")
    assert entry["schedule"].remaining_estimate(timezone.now()) <= timedelta(days=1)
    celery_app.loader.import_default_modules()
    assert "sessions_app.prune_sessions" in celery_app.tasks

    settings.SCOPE_RETENTION_DAYS = 4
    assert celery_app.tasks["sessions_app.prune_sessions"].apply().get() == 2
    assert remaining(sessions) == {"old live", "old closing"}


async def test_embedded_mode_prunes_on_its_own_timer(sessions, settings) -> None:
    """No Celery beat when embedded: the in-process pruner prunes, first soon after start."""
    sweeper = asyncio.create_task(tasks.run_pruner())
    try:
        for _ in range(500):
            if await database_sync_to_async(remaining)(sessions) == {"recent closed", "old live", "old closing"}:
                break
            await asyncio.sleep(0.01)
    finally:
        sweeper.cancel()
    assert await database_sync_to_async(remaining)(sessions) == {"recent closed", "old live", "old closing"}
