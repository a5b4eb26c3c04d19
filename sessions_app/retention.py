"""Records do not grow forever: closed sessions and their events, deleted after a while.

``sessions_prune`` is a service (a write) and belongs with the others in
services.py; it lives here while that file is being reworked.
"""

import logging
from datetime import datetime, timedelta

from django.db.models import QuerySet
from django.utils import timezone

from .models import StreamSession

logger = logging.getLogger(__name__)

# Deleted a batch per transaction, so a large backlog never holds the database
# (SQLite's one write lock above all) long enough to delay heartbeats.
BATCH_SIZE = 500


def retention_cutoff(days: float) -> datetime:
    return timezone.now() - timedelta(days=days)


def sessions_closed_before(older_than: datetime) -> QuerySet[StreamSession]:
    """Closed sessions that closed before ``older_than``; open and closing ones never."""
    return StreamSession.objects.filter(state=StreamSession.State.CLOSED, closed_at__lt=older_than)


def sessions_prune(*, older_than: datetime) -> int:
    """Delete the sessions closed before ``older_than`` and their events (a cascade); how many sessions."""
    deleted = 0
    oldest_first = sessions_closed_before(older_than).order_by("closed_at").values_list("pk", flat=True)
    while batch := list(oldest_first[:BATCH_SIZE]):
        _, per_model = StreamSession.objects.filter(pk__in=batch).delete()
        deleted += per_model.get(StreamSession._meta.label, 0)
    if deleted:
        logger.info("pruned %d sessions closed before %s", deleted, older_than.isoformat())
    return deleted
