"""REST shapes: records out, request bodies in."""

from rest_framework import serializers

from .models import SessionEvent, StreamSession, Worker

MAX_CANDIDATES_PER_REQUEST = 64


class SessionEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = SessionEvent
        fields = ["kind", "at", "detail"]
        read_only_fields = fields


class StreamSessionSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)
    worker = serializers.PrimaryKeyRelatedField(read_only=True)
    viewers = serializers.IntegerField(source="viewer_count", read_only=True)

    class Meta:
        model = StreamSession
        fields = [
            "id",
            "state",
            "close_reason",
            "owner",
            "pipeline",
            "parameters",
            "worker",
            "created_at",
            "live_at",
            "closing_at",
            "closed_at",
            "deadline_at",
            "frames_in",
            "frames_out",
            "viewers",
        ]
        read_only_fields = fields


class StreamSessionDetailSerializer(StreamSessionSerializer):
    events = SessionEventSerializer(many=True, read_only=True)

    class Meta(StreamSessionSerializer.Meta):
        fields = [*StreamSessionSerializer.Meta.fields, "events"]
        read_only_fields = fields


class WorkerSerializer(serializers.ModelSerializer):
    """A worker annotated by ``selectors.workers_with_load``."""

    slots_used = serializers.IntegerField(read_only=True)

    class Meta:
        model = Worker
        fields = ["id", "host", "pid", "device", "capacity", "slots_used", "peer_count", "asyncio_tasks", "state",
                  "heartbeat_at"]
        read_only_fields = fields


class OfferInputSerializer(serializers.Serializer):
    # Blank and malformed SDP pass here so that sdp.validate_offer reports them as INVALID_SDP.
    sdp = serializers.CharField(allow_blank=True, trim_whitespace=False)
    type = serializers.CharField(allow_blank=True)
    initialParameters = serializers.DictField(required=False, allow_null=True)


class CandidateInputSerializer(serializers.Serializer):
    """One trickled candidate, as a browser's ``RTCIceCandidate.toJSON()`` gives it."""

    candidate = serializers.CharField(allow_blank=True, allow_null=True, trim_whitespace=False)
    sdpMid = serializers.CharField(required=False, allow_blank=True, allow_null=True)
    sdpMLineIndex = serializers.IntegerField(required=False, allow_null=True, min_value=0)


class CandidatesInputSerializer(serializers.Serializer):
    candidates = serializers.ListField(
        child=CandidateInputSerializer(allow_null=True), max_length=MAX_CANDIDATES_PER_REQUEST
    )

    def validate_candidates(self, candidates):
        # An empty candidate is the browser's end-of-candidates mark; the services take None for it.
        return [
            {
                "candidate": item["candidate"],
                "sdpMid": item.get("sdpMid"),
                "sdpMLineIndex": item.get("sdpMLineIndex"),
            }
            if item and item["candidate"]
            else None
            for item in candidates
        ]


# --- shapes for the OpenAPI schema only -------------------------------------------


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="What was wrong, e.g. UNKNOWN_SESSION, INVALID_SDP (docs/protocol.md lists them all).")
    detail = serializers.CharField()


class AnswerSerializer(serializers.Serializer):
    sdp = serializers.CharField()
    type = serializers.CharField()
    sessionId = serializers.UUIDField()


class IceServersSerializer(serializers.Serializer):
    iceServers = serializers.ListField(child=serializers.DictField())


class ParameterSpecSerializer(serializers.Serializer):
    name = serializers.CharField()
    kind = serializers.ChoiceField(choices=["int", "float", "bool", "choice"])
    default = serializers.JSONField()
    minimum = serializers.FloatField(allow_null=True)
    maximum = serializers.FloatField(allow_null=True)
    choices = serializers.ListField(child=serializers.CharField())
    label = serializers.CharField()


class PipelineSerializer(serializers.Serializer):
    name = serializers.CharField()
    label = serializers.CharField()
    default = serializers.BooleanField()
    parameters = ParameterSpecSerializer(many=True)
