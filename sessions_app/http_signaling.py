"""HTTP signaling's round trips to a media worker, each bounded: an offer answered, a viewer answered, a close confirmed.

The REST offer route, WHIP and WHEP share them; the views only translate HTTP.
"""

from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from media_pipeline.pipelines import ignored_parameters, validate_parameters

from . import channels_util, limits, selectors, services
from .api_errors import NegotiationTimeout
from .errors import ScopeError
from .messages import SignalingAnswer, session_group
from .models import CloseReason, SessionViewer, StreamSession


def _request_reply(send: Callable[[str], None]) -> dict[str, Any] | None:
    """Make a one-off reply channel, ``send`` with it, and wait for the reply (None: none in time)."""
    reply_channel = async_to_sync(get_channel_layer().new_channel)()
    send(reply_channel)
    return async_to_sync(channels_util.receive_within)(
        channel=reply_channel, timeout=settings.SCOPE_NEGOTIATION_TIMEOUT_SECONDS
    )


def _answer_or_raise(reply: dict[str, Any]) -> SignalingAnswer:
    if reply["type"] != "signaling.answer":
        # The worker has already ended what it could not answer.
        raise ScopeError(reply["code"], reply["error"])
    return reply  # type: ignore[return-value]


def answer_offer(
    *, user: AbstractBaseUser | AnonymousUser, address: str | None, sdp: str, initial: dict[str, Any], by: str
) -> tuple[str, SignalingAnswer]:
    """A new session for this offer, placed and answered: (session id, answer). Nothing stays open on failure."""
    pipeline, parameters = validate_parameters(initial, default_pipeline=settings.SCOPE_DEFAULT_PIPELINE)
    limits.check_offer(user=user, address=address)
    session_id = str(services.session_create_placed(owner=user).pk)
    try:
        reply = _request_reply(lambda reply_channel: services.session_offer(
            session_id=session_id,
            pipeline=pipeline,
            parameters=parameters,
            ignored_parameters=ignored_parameters(initial, pipeline=pipeline),
            sdp=sdp,
            sdp_type="offer",
            reply_channel=reply_channel,
            request_id=None,
        ))
    except Exception:
        # The session holds a worker slot: it must not outlive the request that failed.
        services.session_close(session_id=session_id, reason=CloseReason.ERROR, by=f"{by}:offer-failed")
        raise
    if reply is None:
        services.session_close(session_id=session_id, reason=CloseReason.ERROR, by=f"{by}:negotiation-timeout")
        raise NegotiationTimeout(
            f"The media worker did not answer within {settings.SCOPE_NEGOTIATION_TIMEOUT_SECONDS:g} s."
        )
    return session_id, _answer_or_raise(reply)


def answer_viewer(
    *, session_id: str, user: AbstractBaseUser, address: str | None, sdp: str
) -> tuple[str, SignalingAnswer]:
    """A new viewer of the session's processed video, answered: (viewer id, answer)."""
    # A viewer's offer costs the worker a peer like a publisher's: the same per-minute limit.
    limits.check_offer(user=user, address=address)
    joined: list[SessionViewer] = []
    reply = _request_reply(lambda reply_channel: joined.append(
        services.viewer_join(session_id=session_id, user=user, sdp=sdp, reply_channel=reply_channel)
    ))
    viewer_id = str(joined[0].pk)
    if reply is None:
        services.viewer_leave(session_id=session_id, viewer_id=viewer_id, reason="negotiation_timeout",
                              notify_worker=True)
        raise NegotiationTimeout(
            f"The media worker did not answer within {settings.SCOPE_NEGOTIATION_TIMEOUT_SECONDS:g} s."
        )
    return viewer_id, _answer_or_raise(reply)


def close_and_confirm(*, session: StreamSession, user: AbstractBaseUser, by: str) -> StreamSession | None:
    """End the session (SESSION_TERMINATED) and wait, bounded, for its worker's teardown.

    None once it is closed; else the session as it stands, still closing: the
    sweep re-sends the close and finishes it.
    """
    if session.state == StreamSession.State.CLOSED:
        return None
    session_id = str(session.pk)
    layer = get_channel_layer()
    listener = async_to_sync(layer.new_channel)()
    # Joined before closing, so a close finished at once (no peer yet) is still heard.
    async_to_sync(layer.group_add)(session_group(session_id), listener)
    try:
        services.session_close(session_id=session_id, reason=CloseReason.SESSION_TERMINATED, by=by)
        # A session that never got an offer is closed by the call itself; any other
        # is closed once its worker reports the teardown done (session.ended).
        if session.state == StreamSession.State.WAITING or async_to_sync(channels_util.receive_within)(
            channel=listener, timeout=settings.SCOPE_CLOSE_WAIT_SECONDS
        ):
            return None
    finally:
        async_to_sync(layer.group_discard)(session_group(session_id), listener)
    session = selectors.session_for_user(session_id=session_id, user=user)
    return None if session.state == StreamSession.State.CLOSED else session
