"""WHIP (RFC 9725) publishing and WHEP playback: SDP over HTTP, for standard publishers and players.

A WHIP publisher's session is an ordinary session with no signaling socket;
its processed video goes to WHEP viewers, which never end it. The views only
translate HTTP: the round trips are ``http_signaling``'s, writes ``services``'.
"""

from typing import Any

from django.conf import settings
from django.http import HttpResponse
from django.urls import reverse
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from media_pipeline.pipelines import parameters_from_text

from . import errors, http_signaling, selectors, services
from .errors import ScopeError
from .sdp import validate_offer
from .turn import ice_servers_for

SDP = "application/sdp"
SDP_FRAGMENT = "application/trickle-ice-sdpfrag"
ERROR = OpenApiResponse(description='{"code", "detail"}; the code says what was wrong.')


class BearerTokenAuthentication(TokenAuthentication):
    """The API token as WHIP and WHEP clients send it: ``Authorization: Bearer <token>``."""

    keyword = "Bearer"


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """How the API schema names the Bearer scheme (DRF's own Token scheme has its own name)."""

    target_class = BearerTokenAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer"}


class UnsupportedContentType(ScopeError):
    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE

    def __init__(self, wanted: str, got: str) -> None:
        super().__init__(errors.INVALID_MESSAGE, f"Expected Content-Type {wanted}, got {got or 'none'}.")


def _body(request: Request, content_type: str) -> str:
    got = (request.content_type or "").split(";")[0].strip().lower()
    if got != content_type:
        raise UnsupportedContentType(content_type, got)
    try:
        return request.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScopeError(errors.INVALID_SDP, "The body is not UTF-8 text.") from exc


def _answer_response(answer: dict[str, Any], location: str, links: list[str]) -> HttpResponse:
    response = HttpResponse(answer["sdp"], status=status.HTTP_201_CREATED, content_type=SDP)
    response["Location"] = location
    if links:
        response["Link"] = ", ".join(links)
    return response


def ice_server_links(user: Any) -> list[str]:
    """One RFC 8288 link per ICE server URL (RFC 9725 section 4.6), TURN with this caller's credentials."""
    links = []
    for server in ice_servers_for(user):
        urls = server["urls"] if isinstance(server["urls"], list) else [server["urls"]]
        for url in urls:
            link = f'<{url}>; rel="ice-server"'
            if server.get("username"):
                link += f'; username="{server["username"]}"; credential="{server.get("credential", "")}"'
                link += '; credential-type="password"'
            links.append(link)
    return links


def candidates_from_fragment(fragment: str) -> list[dict[str, Any] | None]:
    """The candidates of a trickle-ice-sdpfrag (RFC 8840), each tagged with its media section; None: their end."""
    candidates: list[dict[str, Any] | None] = []
    mid = None
    for line in fragment.splitlines():
        line = line.strip()
        if line.startswith("a=mid:"):
            mid = line.removeprefix("a=mid:")
        elif line.startswith("a=candidate:"):
            candidates.append({"candidate": line.removeprefix("a="), "sdpMid": mid, "sdpMLineIndex": None})
        elif line == "a=end-of-candidates":
            candidates.append(None)
    return candidates


def _viewed_session(request: Request, session_id: str, viewer_id: str):
    """The session this viewer still watches, if the caller may see it; else UNKNOWN_SESSION."""
    session = selectors.session_for_user(session_id=session_id, user=request.user)
    if not selectors.viewer_exists(session_id=str(session.pk), viewer_id=viewer_id):
        raise ScopeError(errors.UNKNOWN_SESSION, f"No viewer {viewer_id} of session {session_id}.")
    return session


class WhipAPIView(APIView):
    # Bearer first, so an unauthenticated request gets 401 with WWW-Authenticate: Bearer.
    authentication_classes = [BearerTokenAuthentication, TokenAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]


class WhipView(WhipAPIView):
    @extend_schema(request={SDP: str}, responses={201: OpenApiResponse(description="the SDP answer"), 400: ERROR,
                                                  401: ERROR, 415: ERROR, 429: ERROR, 503: ERROR, 504: ERROR})
    def post(self, request: Request) -> HttpResponse:
        """Publish: a sendonly offer in, the answer out; the query names the pipeline and its parameters."""
        sdp = validate_offer(sdp=_body(request, SDP), sdp_type="offer")
        initial = parameters_from_text(request.query_params.dict(), default_pipeline=settings.SCOPE_DEFAULT_PIPELINE)
        session_id, answer = http_signaling.answer_offer(
            user=request.user, address=request.META.get("REMOTE_ADDR"), sdp=sdp, initial=initial, by="whip",
        )
        return _answer_response(answer, reverse("whip-session", kwargs={"session_id": session_id}),
                                ice_server_links(request.user))


class WhipSessionView(WhipAPIView):
    @extend_schema(request={SDP_FRAGMENT: str}, responses={204: None, 404: ERROR, 415: ERROR, 429: ERROR})
    def patch(self, request: Request, session_id: str) -> Response:
        """Trickled candidates for the publisher's peer."""
        fragment = _body(request, SDP_FRAGMENT)
        session = selectors.session_for_user(session_id=session_id, user=request.user)
        services.session_add_candidates(session_id=str(session.pk), candidates=candidates_from_fragment(fragment))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(responses={200: None, 202: None, 401: ERROR, 404: ERROR})
    def delete(self, request: Request, session_id: str) -> Response:
        """The publisher hangs up: the session ends SESSION_TERMINATED, its viewers with it."""
        session = selectors.session_for_user(session_id=session_id, user=request.user)
        still_closing = http_signaling.close_and_confirm(session=session, user=request.user,
                                                         by=f"whip:{request.user.get_username()}")
        return Response(status=status.HTTP_200_OK if still_closing is None else status.HTTP_202_ACCEPTED)


class WhepView(WhipAPIView):
    @extend_schema(request={SDP: str}, responses={201: OpenApiResponse(description="the SDP answer"), 400: ERROR,
                                                  401: ERROR, 404: ERROR, 415: ERROR, 503: ERROR, 504: ERROR})
    def post(self, request: Request, session_id: str) -> HttpResponse:
        """Watch: a recvonly offer in, the answer out; the session's owner or staff, up to SCOPE_MAX_VIEWERS."""
        sdp = _body(request, SDP)
        session = selectors.session_for_user(session_id=session_id, user=request.user)
        sdp = validate_offer(sdp=sdp, sdp_type="offer")
        viewer_id, answer = http_signaling.answer_viewer(
            session_id=str(session.pk), user=request.user, address=request.META.get("REMOTE_ADDR"), sdp=sdp
        )
        location = reverse("whep-viewer", kwargs={"session_id": str(session.pk), "viewer_id": viewer_id})
        return _answer_response(answer, location, ice_server_links(request.user))


class WhepViewerView(WhipAPIView):
    @extend_schema(request={SDP_FRAGMENT: str}, responses={204: None, 404: ERROR, 415: ERROR, 429: ERROR})
    def patch(self, request: Request, session_id: str, viewer_id: str) -> Response:
        """Trickled candidates for one viewer's peer."""
        fragment = _body(request, SDP_FRAGMENT)
        session = _viewed_session(request, session_id, viewer_id)
        services.viewer_add_candidates(session_id=str(session.pk), viewer_id=viewer_id,
                                       candidates=candidates_from_fragment(fragment))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(responses={200: None, 401: ERROR, 404: ERROR})
    def delete(self, request: Request, session_id: str, viewer_id: str) -> Response:
        """The viewer leaves; the session goes on."""
        session = _viewed_session(request, session_id, viewer_id)
        services.viewer_leave(session_id=str(session.pk), viewer_id=viewer_id, reason="left", notify_worker=True)
        return Response(status=status.HTTP_200_OK)
