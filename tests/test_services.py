"""Services on their own: the rules the close path and the ready gate rest on."""

import pytest
from django.contrib.auth.models import User

from sessions_app import services
from sessions_app.models import StreamSession

pytestmark = pytest.mark.django_db(transaction=True)


def worker(capacity: int = 1):
    return services.worker_register(channel_name=f"test!{capacity}", host="h", pid=1, device="cpu", capacity=capacity)


def offered(owner=None) -> StreamSession:
    session = services.session_create_placed(owner=owner)
    return services.session_offer(session_id=str(session.pk), pipeline="invert", parameters={}, sdp="v=0",
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
