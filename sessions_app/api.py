"""REST API: HTTP signaling and operator reads. Writes go through ``services``, reads through ``selectors``."""

from django.conf import settings
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status, viewsets
from rest_framework.permissions import BasePermission, IsAdminUser, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from media_pipeline.pipelines import available_pipelines

from . import errors, http_signaling, selectors, services
from .errors import ScopeError
from .models import StreamSession
from .sdp import validate_offer
from .serializers import (
    AnswerSerializer,
    CandidatesInputSerializer,
    ErrorSerializer,
    IceServersSerializer,
    OfferInputSerializer,
    PipelineSerializer,
    StreamSessionDetailSerializer,
    StreamSessionSerializer,
    WorkerSerializer,
)
from .turn import ice_servers_for

ERROR = OpenApiResponse(ErrorSerializer, description="{code, detail}; the code says what was wrong.")
SESSION_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The session's id.")

# Every id reaches the selectors, so a malformed one reads UNKNOWN_SESSION like any other.
ANY_SESSION_ID = r"[^/]+"


class StreamingAllowed(BasePermission):
    """Streaming routes: signed-in users, and anyone where anonymous streaming is on."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        return request.user.is_authenticated or settings.SCOPE_ALLOW_ANONYMOUS


class IceServersView(APIView):
    permission_classes = [StreamingAllowed]

    @extend_schema(responses={200: IceServersSerializer, 401: ERROR})
    def get(self, request: Request) -> Response:
        return Response({"iceServers": ice_servers_for(request.user)})


class PipelinesView(APIView):
    """The pipelines a client may pick, with the parameters each declares (to build controls from)."""

    permission_classes = [StreamingAllowed]

    @extend_schema(responses={200: PipelineSerializer(many=True), 401: ERROR})
    def get(self, request: Request) -> Response:
        return Response(
            [
                {
                    "name": name,
                    "label": getattr(pipeline, "label", name),
                    "default": name == settings.SCOPE_DEFAULT_PIPELINE,
                    "parameters": [spec.to_json() for spec in pipeline.parameter_specs],
                }
                for name, pipeline in available_pipelines().items()
            ]
        )


@extend_schema_view(
    create=extend_schema(
        request=OfferInputSerializer,
        responses={200: AnswerSerializer, 400: ERROR, 401: ERROR, 413: ERROR, 429: ERROR, 502: ERROR, 503: ERROR,
                   504: ERROR},
    ),
    partial_update=extend_schema(
        parameters=[SESSION_ID],
        request=CandidatesInputSerializer,
        responses={204: None, 400: ERROR, 404: ERROR, 413: ERROR, 429: ERROR},
    ),
    destroy=extend_schema(
        parameters=[SESSION_ID],
        responses={204: None, 202: StreamSessionDetailSerializer, 401: ERROR, 404: ERROR},
    ),
)
class OfferViewSet(viewsets.ViewSet):
    """HTTP signaling: offer in, answer out; trickled candidates; close."""

    lookup_value_regex = ANY_SESSION_ID

    def get_permissions(self):
        # Ending a session is an owner's or operator's act, never an anonymous one.
        if self.action == "destroy":
            return [IsAuthenticated()]
        return [StreamingAllowed()]

    def create(self, request: Request) -> Response:
        body = OfferInputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        sdp = validate_offer(sdp=body.validated_data["sdp"], sdp_type=body.validated_data["type"])
        session_id, answer = http_signaling.answer_offer(
            user=request.user, address=request.META.get("REMOTE_ADDR"), sdp=sdp,
            initial=body.validated_data.get("initialParameters") or {}, by="api",
        )
        return Response(
            {"sdp": answer["sdp"], "type": answer["sdp_type"], "sessionId": session_id},
            # 200, not 201: Scope's clients expect its own server's status.
            status=status.HTTP_200_OK,
            headers={"Location": reverse("webrtc-offer-detail", kwargs={"pk": session_id})},
        )

    def partial_update(self, request: Request, pk: str) -> Response:
        session = selectors.session_for_streamer(session_id=pk, user=request.user)
        body = CandidatesInputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        # All or none: a request that would pass the session's cap is refused whole (429).
        services.session_add_candidates(session_id=str(session.pk), candidates=body.validated_data["candidates"])
        return Response(status=status.HTTP_204_NO_CONTENT)

    def destroy(self, request: Request, pk: str) -> Response:
        session = selectors.session_for_user(session_id=pk, user=request.user)
        still_closing = http_signaling.close_and_confirm(session=session, user=request.user,
                                                         by=f"api:{request.user.username}")
        if still_closing is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        # Decision: the close is under way but unconfirmed within the bound, so
        # 202, not an error: the sweep re-sends the close and finishes it.
        return Response(StreamSessionDetailSerializer(still_closing).data, status=status.HTTP_202_ACCEPTED)


@extend_schema_view(
    list=extend_schema(
        parameters=[OpenApiParameter("state", OpenApiTypes.STR, enum=StreamSession.State.values)],
        responses={200: StreamSessionSerializer(many=True), 400: ERROR, 401: ERROR},
    ),
    retrieve=extend_schema(parameters=[SESSION_ID], responses={200: StreamSessionDetailSerializer, 404: ERROR}),
)
class SessionViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Sessions as operators see them: staff every one, a user their own."""

    serializer_class = StreamSessionSerializer
    lookup_value_regex = ANY_SESSION_ID

    def get_queryset(self):
        sessions = selectors.sessions_visible_to(self.request.user)
        state = self.request.query_params.get("state")
        if state is not None:
            if state not in StreamSession.State.values:
                raise ScopeError(
                    errors.INVALID_MESSAGE,
                    f"'state' must be one of: {', '.join(StreamSession.State.values)}.",
                )
            sessions = sessions.filter(state=state)
        # Ties broken by id, so pages never repeat or skip a session.
        return sessions.order_by("-created_at", "-pk")

    def retrieve(self, request: Request, pk: str) -> Response:
        session = selectors.session_for_user(session_id=pk, user=request.user)
        return Response(StreamSessionDetailSerializer(session).data)


class WorkerViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    serializer_class = WorkerSerializer
    permission_classes = [IsAdminUser]
    # A deployment has a handful of workers; operators want them all at once.
    pagination_class = None

    def get_queryset(self):
        return selectors.workers_with_load()
