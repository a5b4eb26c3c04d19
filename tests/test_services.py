"""Services on their own: the rules the close path and the ready gate rest on."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from sessions_app import lifecycle, services
from sessions_app.models import StreamSession, SweepClock, Worker

pytestmark = pytest.mark.django_db(transaction=True)


def worker(capacity: int = 1):
    return services.worker_register(channel_name=f"test!{capacity}", host="h", pid=1, device="cpu", capacity=capacity)


def offered(owner=None) -> StreamSession:
    session = services.session_create_placed(owner=owner)
    return services.session_offer(session_id=str(session.pk), pipeline="invert", parameters={},
                                  ignored_parameters=[], sdp="v=0",
                                  sdp_type="offer", reply_channel="test!reply")


def test_session_close_is_idempotent() -> None:
    worker(capacity=2)
    session = offered()
    assert services.session_close(session_id=str(session.pk), reason="SESSION_TERMINATED", by="test") is True
    assert services.session_close(session_id=str(session.pk), reason="CLIENT_DISCONNECT", by="test") is False
    session.refresh_from_db()
    assert session.state == "closing" and session.close_reason == "SESSION_TERMINATED"
    assert list(session.events.filter(kind="closing").values_list("detail__reason", flat=True)) == [
        "SESSION_TERMINATED"
    ]
    assert services.session_closed(session_id=str(session.pk), steps=[]) is True
    assert services.session_closed(session_id=str(session.pk), steps=[]) is False
    assert StreamSession.objects.get(pk=session.pk).state == "closed"


def test_a_slot_frees_only_when_its_session_is_closed() -> None:
    worker(capacity=1)
    first = offered()
    waiting = services.session_create(owner=None)
    assert services.session_place(session_id=str(waiting.pk)) is False

    services.session_close(session_id=str(first.pk), reason="CLIENT_DISCONNECT", by="test")
    assert services.session_place(session_id=str(waiting.pk)) is False  # closing still holds the slot
    services.session_closed(session_id=str(first.pk), steps=[])
    assert services.session_place(session_id=str(waiting.pk)) is True


def test_waiting_sessions_are_placed_first_come_first_served() -> None:
    worker(capacity=1)
    holder = services.session_create_placed(owner=None)
    older = services.session_create(owner=None)
    newer = services.session_create(owner=None)
    assert services.session_place(session_id=str(older.pk)) is False
    services.session_close(session_id=str(holder.pk), reason="CLIENT_DISCONNECT", by="test")  # never offered
    assert services.session_place(session_id=str(newer.pk)) is False
    assert services.session_place(session_id=str(older.pk)) is True


def test_no_capacity_creates_nothing() -> None:
    with pytest.raises(services.ScopeError) as refused:
        services.session_create_placed(owner=User.objects.create(username="carol"))
    assert refused.value.code == "NO_CAPACITY"
    assert not StreamSession.objects.exists()


def test_unknown_close_reason_is_refused() -> None:
    worker()
    session = offered()
    with pytest.raises(ValueError):
        services.session_close(session_id=str(session.pk), reason="BORED", by="test")
    assert StreamSession.objects.get(pk=session.pk).state == "negotiating"


# --- the sweep -----------------------------------------------------------------------


def kinds(session: StreamSession) -> list[str]:
    return list(session.events.values_list("kind", flat=True))


@pytest.fixture
def sweep_watching() -> None:
    """The sweep has been running: a first sweep judges no silence (it has watched nothing yet)."""
    assert services.sweep().silence_judged is False


def test_sweep_ends_a_silent_workers_sessions_worker_lost(settings, sweep_watching) -> None:
    silent = worker(capacity=2)
    live = offered()
    already_closing = offered()
    services.session_close(session_id=str(already_closing.pk), reason="CLIENT_DISCONNECT", by="test")
    Worker.objects.filter(pk=silent.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=10))

    result = services.sweep()

    assert result.workers_lost == [silent.pk]
    assert sorted(result.closed["WORKER_LOST"]) == sorted([str(live.pk), str(already_closing.pk)])
    live.refresh_from_db()
    assert live.state == "closed" and live.close_reason == "WORKER_LOST"
    assert kinds(live)[-2:] == ["closing", "closed"]
    assert StreamSession.objects.get(pk=already_closing.pk).close_reason == "CLIENT_DISCONNECT"
    assert Worker.objects.get(pk=silent.pk).state == "gone"
    assert services.sweep().workers_lost == []  # once


def test_sweep_ends_sessions_whose_signaling_went_silent(settings, sweep_watching) -> None:
    worker()
    session = services.session_create_placed(owner=None, connection_id="c1", signaling_channel="test!socket")
    StreamSession.objects.filter(pk=session.pk).update(signaling_seen_at=timezone.now() - timedelta(seconds=10))
    assert services.sweep().closed == {"SIGNALING_LOST": [str(session.pk)]}
    assert StreamSession.objects.get(pk=session.pk).close_reason == "SIGNALING_LOST"


def test_a_web_process_heartbeat_keeps_its_sockets_sessions(settings, sweep_watching) -> None:
    worker()
    session = services.session_create_placed(owner=None, connection_id="c1", signaling_channel="test!socket")
    StreamSession.objects.filter(pk=session.pk).update(signaling_seen_at=timezone.now() - timedelta(seconds=10))
    assert services.signaling_heartbeat(connection_ids=["c1"]) == 1
    assert services.sweep().closed == {}


@pytest.mark.parametrize("last_sweep", ["finished long ago", "ran long"])
def test_a_sweep_that_was_away_judges_silence_only_once_it_has_watched(sweep_watching, last_sweep: str) -> None:
    """The sweep was paused with everyone else (between sweeps, or in one): it waits one sweep for the beats."""
    beating = worker(capacity=1)
    session = offered()
    silent = worker(capacity=2)
    now = timezone.now()
    long_ago = now - timedelta(seconds=10)
    Worker.objects.update(heartbeat_at=long_ago)
    SweepClock.objects.update(started_at=long_ago, finished_at=long_ago if last_sweep == "finished long ago" else now)

    away = services.sweep()
    assert away.silence_judged is False and away.workers_lost == [] and away.closed == {}
    assert set(Worker.objects.values_list("state", flat=True)) == {"active"}

    services.worker_heartbeat(worker_id=beating.pk, peer_count=1, frames={})  # it was only paused
    back = services.sweep()
    assert back.silence_judged is True and back.workers_lost == [silent.pk]
    assert StreamSession.objects.get(pk=session.pk).state == "negotiating"


def test_sweep_ends_sessions_past_their_deadline() -> None:
    worker()
    session = offered()
    StreamSession.objects.filter(pk=session.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))
    assert services.sweep().closed == {"MAX_DURATION_EXCEEDED": [str(session.pk)]}


def test_sweep_resends_the_close_of_a_session_stuck_closing(settings) -> None:
    worker()
    session = offered()
    services.session_close(session_id=str(session.pk), reason="SESSION_TERMINATED", by="test")
    assert services.sweep().resent == []  # within the close bound: not stuck yet
    StreamSession.objects.filter(pk=session.pk).update(closing_at=timezone.now() - timedelta(seconds=10))
    assert services.sweep().resent == [str(session.pk)]


def test_heartbeat_tells_a_worker_which_of_its_peers_are_for_closed_sessions() -> None:
    held = worker(capacity=2)
    kept, ended = offered(), offered()
    services.session_close(session_id=str(ended.pk), reason="SESSION_TERMINATED", by="test")
    services.session_closed(session_id=str(ended.pk), steps=[])
    counts = services.FrameCounts(frames_in=1, frames_out=1)
    reply = services.worker_heartbeat(worker_id=held.pk, peer_count=2, frames={str(kept.pk): counts,
                                                                                str(ended.pk): counts})
    assert reply == services.HeartbeatReply(closed={str(ended.pk): "SESSION_TERMINATED"}, returned=False)


def test_a_worker_declared_gone_that_beats_again_is_placeable_again() -> None:
    stalled = worker(capacity=1)
    session = offered()
    assert services.worker_lost(worker_id=stalled.pk, by="test") == [str(session.pk)]
    with pytest.raises(services.ScopeError):
        services.session_create_placed(owner=None)
    reply = services.worker_heartbeat(worker_id=stalled.pk, peer_count=1,
                                      frames={str(session.pk): services.FrameCounts(frames_in=9, frames_out=9)})
    assert reply == services.HeartbeatReply(closed={str(session.pk): "WORKER_LOST"}, returned=True)
    assert services.session_create_placed(owner=None).worker_id == stalled.pk


def test_a_freed_slot_goes_to_the_longest_waiting_session_and_only_it() -> None:
    worker(capacity=1)
    holder = offered()
    first, second = services.session_create(owner=None), services.session_create(owner=None)
    assert not services.session_place(session_id=str(second.pk))  # not ahead of first
    services.session_close(session_id=str(holder.pk), reason="SESSION_TERMINATED", by="test")
    services.session_closed(session_id=str(holder.pk), steps=[])
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.worker_id is not None and second.worker_id is None


def test_the_queue_refuses_past_its_cap() -> None:
    worker(capacity=1)
    offered()
    services.session_create(owner=None, queue_limit=2)
    services.session_create(owner=None, queue_limit=2)
    with pytest.raises(services.ScopeError) as refused:
        services.session_create(owner=None, queue_limit=2)
    assert refused.value.code == "NO_CAPACITY"


def test_a_user_has_at_most_their_share_of_open_sessions(settings) -> None:
    settings.SCOPE_MAX_SESSIONS_PER_USER = 2
    worker(capacity=4)
    carol = User.objects.create(username="carol")
    services.session_create(owner=carol)
    services.session_create(owner=carol)
    with pytest.raises(services.ScopeError) as refused:
        services.session_create(owner=carol)
    assert refused.value.code == "RATE_LIMITED"
    assert StreamSession.objects.filter(owner=carol).count() == 2


def test_watchers_hear_each_committed_step_and_no_rolled_back_one() -> None:
    heard: list[tuple[str, str]] = []

    def receiver(sender, step: lifecycle.SessionStep, **kwargs) -> None:
        heard.append((step.kind, step.close_reason))

    lifecycle.session_step.connect(receiver)
    try:
        worker(capacity=1)
        with transaction.atomic():
            services.session_create(owner=None)
            transaction.set_rollback(True)
        assert heard == []
        session = offered()
        services.session_close(session_id=str(session.pk), reason="SESSION_TERMINATED", by="test")
        services.session_closed(session_id=str(session.pk), steps=[])
    finally:
        lifecycle.session_step.disconnect(receiver)
    assert heard == [("created", ""), ("placed", ""), ("offered", ""), ("closing", "SESSION_TERMINATED"),
                     ("closed", "SESSION_TERMINATED")]
