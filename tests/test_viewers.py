"""WHEP viewers' bookkeeping in the services, in process: the limit, leaving once, the session's close, the dashboard."""

import pytest
from channels.db import database_sync_to_async

from sessions_app import errors, services
from sessions_app.errors import ScopeError
from sessions_app.models import CloseReason, SessionEvent, StreamSession
from tests.test_api import OFFER_SDP, negotiating_session, worker_messages
from tests.test_dashboard import dashboard_socket, next_of_type

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_channel_layer")]


def join(session: StreamSession, user) -> str:
    viewer = services.viewer_join(session_id=str(session.pk), user=user, sdp=OFFER_SDP, reply_channel="test!reply")
    return str(viewer.pk)


def viewer_events(session: StreamSession) -> list[tuple[str, dict]]:
    return [(event.kind, event.detail) for event in SessionEvent.objects.filter(
        session=session, kind__in=[SessionEvent.Kind.VIEWER_JOINED, SessionEvent.Kind.VIEWER_LEFT])]


def test_a_viewer_is_counted_recorded_and_handed_to_the_sessions_worker(alice):
    session = negotiating_session(alice)
    worker_messages()
    viewer_id = join(session, alice)
    session.refresh_from_db()
    assert session.viewer_count == 1
    assert viewer_events(session) == [("viewer_joined", {"viewer_id": viewer_id, "user": "alice"})]
    [message] = worker_messages()
    assert (message["type"], message["viewer_id"], message["sdp"]) == ("peer.view", viewer_id, OFFER_SDP)


def test_past_the_limit_is_no_capacity_and_changes_nothing(settings, alice):
    settings.SCOPE_MAX_VIEWERS = 1
    session = negotiating_session(alice)
    join(session, alice)
    worker_messages()
    with pytest.raises(ScopeError) as refused:
        join(session, alice)
    assert refused.value.code == errors.NO_CAPACITY
    session.refresh_from_db()
    assert session.viewer_count == 1 and len(viewer_events(session)) == 1
    assert worker_messages() == []


def test_a_viewer_leaves_once_and_the_worker_is_told_only_when_it_did_not_report_it(alice):
    session = negotiating_session(alice)
    first, second = join(session, alice), join(session, alice)
    worker_messages()
    assert services.viewer_leave(session_id=str(session.pk), viewer_id=first, reason="left", notify_worker=True)
    assert not services.viewer_leave(session_id=str(session.pk), viewer_id=first, reason="left", notify_worker=True)
    assert services.viewer_leave(session_id=str(session.pk), viewer_id=second, reason="peer_closed",
                                 notify_worker=False)
    assert [(m["type"], m["viewer_id"]) for m in worker_messages()] == [("peer.unview", first)]
    session.refresh_from_db()
    assert session.viewer_count == 0
    assert [(kind, detail.get("reason")) for kind, detail in viewer_events(session)][2:] == [
        ("viewer_left", "left"), ("viewer_left", "peer_closed")]


def test_the_sessions_close_records_every_viewer_still_watching_as_gone_with_it(alice):
    session = negotiating_session(alice)
    viewers = {join(session, alice), join(session, alice)}
    services.session_close(session_id=str(session.pk), reason=CloseReason.MAX_DURATION_EXCEEDED, by="test")
    services.session_closed(session_id=str(session.pk), steps=[])
    session.refresh_from_db()
    assert session.state == "closed" and session.viewer_count == 0
    left = [detail for kind, detail in viewer_events(session) if kind == "viewer_left"]
    assert {d["viewer_id"] for d in left} == viewers and {d["reason"] for d in left} == {"MAX_DURATION_EXCEEDED"}
    kinds = list(SessionEvent.objects.filter(session=session).values_list("kind", flat=True))
    assert kinds[-1] == "closed"
    with pytest.raises(ScopeError) as refused:
        join(session, alice)
    assert refused.value.code == errors.UNKNOWN_SESSION


async def test_the_dashboard_is_told_the_viewer_count(staff, alice):
    session = await database_sync_to_async(negotiating_session)(alice)
    communicator = await dashboard_socket(staff)
    await communicator.receive_json_from(timeout=5)  # the snapshot
    viewer_id = await database_sync_to_async(join)(session, alice)
    await next_of_type(communicator, "session", id=str(session.pk), viewers=1)
    await database_sync_to_async(services.viewer_leave)(
        session_id=str(session.pk), viewer_id=viewer_id, reason="left", notify_worker=True)
    await next_of_type(communicator, "session", id=str(session.pk), viewers=0)
    await communicator.disconnect()
