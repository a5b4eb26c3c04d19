"""Channel-layer messages: one TypedDict per ``type``, one handler each.

``peer.*`` go to a media worker's channel; ``signaling.*`` and ``session.*``
to a signaling consumer (or to a one-off reply channel for HTTP signaling);
``dashboard.*`` to the operators' dashboard group.
"""

from typing import Any, Literal, TypedDict


class PeerOffer(TypedDict):
    type: Literal["peer.offer"]
    session_id: str
    sdp: str
    sdp_type: str
    pipeline: str
    parameters: dict[str, Any]
    reply_channel: str
    request_id: Any


class PeerCandidate(TypedDict):
    type: Literal["peer.candidate"]
    session_id: str
    candidate: dict[str, Any] | None


class PeerParameters(TypedDict):
    type: Literal["peer.parameters"]
    session_id: str
    parameters: dict[str, Any]


class PeerClose(TypedDict):
    type: Literal["peer.close"]
    session_id: str
    reason: str


class PeerCleanup(TypedDict):
    """To the worker on the host holding a closing session's files: retry removing them."""

    type: Literal["peer.cleanup"]
    session_id: str
    files_dir: str
    give_up_at: float  # POSIX time: past it, close the session with its files left behind


class PeerView(TypedDict):
    """A WHEP viewer's offer, to the worker holding the session's processed video."""

    type: Literal["peer.view"]
    session_id: str
    viewer_id: str
    sdp: str
    reply_channel: str


class PeerViewCandidate(TypedDict):
    type: Literal["peer.view_candidate"]
    session_id: str
    viewer_id: str
    candidate: dict[str, Any] | None


class PeerUnview(TypedDict):
    """The viewer left (its DELETE): close its peer; the session goes on."""

    type: Literal["peer.unview"]
    session_id: str
    viewer_id: str


class SignalingAnswer(TypedDict):
    type: Literal["signaling.answer"]
    session_id: str
    sdp: str
    sdp_type: str
    request_id: Any


class SignalingError(TypedDict):
    type: Literal["signaling.error"]
    session_id: str
    code: str
    error: str
    request_id: Any


class SignalingShutdown(TypedDict):
    """To each of a stopping web process's own sockets."""

    type: Literal["signaling.shutdown"]


class SocketRevoked(TypedDict):
    """To one socket: its user was deactivated, or lost the staff its socket needs."""

    type: Literal["socket.revoked"]


class SessionEnded(TypedDict):
    type: Literal["session.ended"]
    session_id: str
    reason: str


class QueueChanged(TypedDict):
    """To the queue group: places moved."""

    type: Literal["queue.changed"]
    queued: list[str]  # the waiting sessions' ids, first come first


class SessionPlaced(TypedDict):
    """To one socket: its queued session now holds a slot."""

    type: Literal["session.placed"]
    session_id: str


class DashboardSession(TypedDict):
    type: Literal["dashboard.session"]
    session_id: str


class DashboardWorker(TypedDict):
    type: Literal["dashboard.worker"]
    worker_id: int


QUEUE_GROUP = "scope.queue"
# Operators' dashboards: told of every session transition and worker heartbeat.
DASHBOARD_GROUP = "scope.dashboard"


def session_group(session_id: str) -> str:
    """Group that hears when a session is closed (DELETE waits on it)."""
    return f"scope.session.{session_id}"
