"""Routes that Daydream Scope's browser UI calls around a stream, answered in Scope's JSON shapes.

Scope's UI asks its own server for the pipeline list, loads a pipeline, waits
for its status to read ``loaded`` and only then sends its offer. Here every
pipeline is built per session when the offer arrives, so there is nothing to
load ahead of time: ``pipeline/load`` checks the request (pipeline names and
their known parameters) and the pipeline reads ``loaded`` at once. The last
load a browser made is remembered in its Django session, so ``pipeline/status``
names what it picked; without one, it names ``SCOPE_DEFAULT_PIPELINE``.

See docs/scope-compat.md for the routes answered, those that are not, and why.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.authentication import TokenAuthentication
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from media_pipeline.pipelines import ParameterSpec, Pipeline, available_pipelines, validate_parameters

from . import errors
from .api import StreamingAllowed
from .errors import ScopeError
from .serializers import ErrorSerializer

ERROR = OpenApiResponse(ErrorSerializer, description="{code, detail}; the code says what was wrong.")

# Where the last load is kept in a browser's Django session.
SESSION_KEY = "scope_compat_loaded"

# What a pipeline here is, in the terms of Scope's pipeline metadata.
DEFAULT_VERSION = "1.0.0"
JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "choice": "string"}

UNAVAILABLE_HERE = "This server takes video only over WebRTC."


# --- shapes ---------------------------------------------------------------------------


class ScopePipelineLoadItemSerializer(serializers.Serializer):
    node_id = serializers.CharField(allow_blank=True, help_text="Scope's graph node id (not used here).")
    pipeline_id = serializers.CharField(allow_blank=True, help_text="A pipeline name from pipelines/schemas.")
    load_params = serializers.DictField(required=False, allow_null=True)


class ScopePipelineLoadRequestSerializer(serializers.Serializer):
    """Scope's ``PipelineLoadRequest``: ``pipelines``, or the older ``pipeline_ids`` + ``load_params``."""

    # A ListField, not many=True: DRF hands a list serializer's allow_null to its items, so [null] would pass.
    pipelines = serializers.ListField(child=ScopePipelineLoadItemSerializer(), required=False, allow_null=True)
    pipeline_ids = serializers.ListField(child=serializers.CharField(allow_blank=True), required=False,
                                         allow_null=True)
    load_params = serializers.DictField(required=False, allow_null=True)
    # Correlation fields Scope's cloud relay adds; accepted and not used.
    connection_id = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    connection_info = serializers.DictField(required=False, allow_null=True)
    user_id = serializers.CharField(required=False, allow_null=True, allow_blank=True)


class ScopeMessageSerializer(serializers.Serializer):
    message = serializers.CharField()


class ScopePipelineStatusSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["not_loaded", "loading", "loaded", "error"])
    pipeline_id = serializers.CharField(allow_null=True)
    load_params = serializers.DictField(allow_null=True)
    loaded_lora_adapters = serializers.ListField(child=serializers.DictField(), allow_null=True)
    error = serializers.CharField(allow_null=True)
    loading_stage = serializers.CharField(allow_null=True)
    produces_video = serializers.BooleanField()
    produces_audio = serializers.BooleanField()


class ScopePipelineSchemaInfoSerializer(serializers.Serializer):
    """One pipeline as Scope's ``get_schema_with_metadata()`` describes it."""

    id = serializers.CharField()
    name = serializers.CharField()
    description = serializers.CharField(allow_blank=True)
    version = serializers.CharField()
    docs_url = serializers.CharField(allow_null=True)
    estimated_vram_gb = serializers.FloatField(allow_null=True)
    requires_models = serializers.BooleanField()
    supports_lora = serializers.BooleanField()
    supports_vace = serializers.BooleanField()
    usage = serializers.ListField(child=serializers.CharField())
    config_schema = serializers.DictField(help_text="JSON Schema of the pipeline's parameters, each with a 'ui' hint.")
    supported_modes = serializers.ListField(child=serializers.CharField())
    default_mode = serializers.CharField()
    supports_prompts = serializers.BooleanField()
    default_temporal_interpolation_method = serializers.CharField(allow_null=True)
    default_temporal_interpolation_steps = serializers.IntegerField(allow_null=True)
    default_spatial_interpolation_method = serializers.CharField(allow_null=True)
    supports_cache_management = serializers.BooleanField()
    supports_kv_cache_bias = serializers.BooleanField()
    supports_quantization = serializers.BooleanField()
    min_dimension = serializers.IntegerField()
    recommended_quantization_vram_threshold = serializers.FloatField(allow_null=True)
    modified = serializers.BooleanField()
    produces_video = serializers.BooleanField()
    produces_audio = serializers.BooleanField()
    inputs = serializers.ListField(child=serializers.CharField())
    outputs = serializers.ListField(child=serializers.CharField())
    plugin_name = serializers.CharField(allow_null=True)


class ScopePipelineSchemasSerializer(serializers.Serializer):
    pipelines = serializers.DictField(child=ScopePipelineSchemaInfoSerializer(), help_text="Keyed by pipeline id.")


class ScopeModelStatusSerializer(serializers.Serializer):
    downloaded = serializers.BooleanField()
    progress = serializers.DictField(allow_null=True)


class ScopeIntegrationSerializer(serializers.Serializer):
    available = serializers.BooleanField()
    reason = serializers.CharField(allow_null=True)
    install_hint = serializers.CharField(allow_null=True)


class ScopeHardwareInfoSerializer(serializers.Serializer):
    vram_gb = serializers.FloatField(allow_null=True)
    spout = ScopeIntegrationSerializer()
    ndi = ScopeIntegrationSerializer()
    syphon = ScopeIntegrationSerializer()


class ScopeInputSourceSerializer(serializers.Serializer):
    source_id = serializers.CharField()
    source_name = serializers.CharField()
    source_description = serializers.CharField()
    available = serializers.BooleanField()


class ScopeInputSourcesSerializer(serializers.Serializer):
    input_sources = ScopeInputSourceSerializer(many=True)


class ScopeCloudStatusSerializer(serializers.Serializer):
    connected = serializers.BooleanField()
    connecting = serializers.BooleanField()
    error = serializers.CharField(allow_null=True)
    connect_stage = serializers.CharField(allow_null=True)
    webrtc_connected = serializers.BooleanField()
    app_id = serializers.CharField(allow_null=True)
    connection_id = serializers.CharField(allow_null=True)
    credentials_configured = serializers.BooleanField()
    stats = serializers.DictField(allow_null=True)
    last_close_code = serializers.IntegerField(allow_null=True)
    last_close_reason = serializers.CharField(allow_null=True)


# --- pipelines in Scope's terms ----------------------------------------------------------


def _property(spec: ParameterSpec, order: int) -> dict[str, Any]:
    """A parameter as a JSON Schema property; ``ui`` marks it a runtime control (live over the data channel)."""
    label = spec.label or spec.name
    prop: dict[str, Any] = {"title": label, "description": label, "type": JSON_TYPES[spec.kind],
                            "default": spec.default}
    if spec.kind == "choice":
        prop["enum"] = list(spec.choices)
    if spec.minimum is not None:
        prop["minimum"] = spec.minimum
    if spec.maximum is not None:
        prop["maximum"] = spec.maximum
    prop["ui"] = {"category": "configuration", "is_load_param": False, "order": order, "label": label}
    return prop


def _description(pipeline: type[Pipeline]) -> str:
    doc = (pipeline.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _plugin_name(pipeline: type[Pipeline]) -> str | None:
    """None for this server's built-ins; else the package an entry point loaded the pipeline from."""
    module = pipeline.__module__
    return None if module.startswith("media_pipeline.") else module.split(".")[0]


def pipeline_schema(name: str, pipeline: type[Pipeline]) -> dict[str, Any]:
    """Scope's per-pipeline metadata for one of this server's pipelines: video in, video out, no models."""
    return {
        "id": name,
        "name": getattr(pipeline, "label", name),
        "description": _description(pipeline),
        "version": str(getattr(pipeline, "version", DEFAULT_VERSION)),
        "docs_url": None,
        "estimated_vram_gb": None,
        "requires_models": False,
        "supports_lora": False,
        "supports_vace": False,
        "usage": [],
        "config_schema": {
            "title": f"{pipeline.__name__}Config",
            "type": "object",
            "properties": {spec.name: _property(spec, order) for order, spec in
                           enumerate(pipeline.parameter_specs, start=1)},
        },
        "supported_modes": ["video"],
        "default_mode": "video",
        "supports_prompts": False,
        "default_temporal_interpolation_method": None,
        "default_temporal_interpolation_steps": None,
        "default_spatial_interpolation_method": None,
        "supports_cache_management": False,
        "supports_kv_cache_bias": False,
        "supports_quantization": False,
        "min_dimension": 1,
        "recommended_quantization_vram_threshold": None,
        "modified": False,
        "produces_video": True,
        "produces_audio": False,
        "inputs": ["video"],
        "outputs": ["video"],
        "plugin_name": _plugin_name(pipeline),
    }


def _known_pipeline(pipeline_id: Any, field: str) -> str:
    pipelines = available_pipelines()
    # Membership is tested only on str, so an unhashable value cannot raise.
    if not isinstance(pipeline_id, str) or pipeline_id not in pipelines:
        raise ScopeError(
            errors.INVALID_MESSAGE,
            f"'{field}' must be one of: {', '.join(sorted(pipelines))}; got {pipeline_id!r}.",
        )
    return pipeline_id


def _remembered_load(request: Request) -> dict[str, Any] | None:
    loaded = request.session.get(SESSION_KEY)
    if isinstance(loaded, dict) and loaded.get("pipeline_id") in available_pipelines():
        return loaded
    return None


def _uses_browser_session(request: Request) -> bool:
    # A script with a token keeps no cookies: remembering its load would only leave session rows behind.
    return not isinstance(request.successful_authenticator, TokenAuthentication)


# --- views ------------------------------------------------------------------------------


class PipelineStatusView(APIView):
    """``GET pipeline/status``: always ``loaded``; every pipeline is ready for the next offer."""

    permission_classes = [StreamingAllowed]

    @extend_schema(responses={200: ScopePipelineStatusSerializer, 401: ERROR})
    def get(self, request: Request) -> Response:
        loaded = _remembered_load(request) if _uses_browser_session(request) else None
        return Response(
            {
                "status": "loaded",
                "pipeline_id": loaded["pipeline_id"] if loaded else settings.SCOPE_DEFAULT_PIPELINE,
                "load_params": loaded["load_params"] if loaded else None,
                "loaded_lora_adapters": None,
                "error": None,
                "loading_stage": None,
                "produces_video": True,
                "produces_audio": False,
            }
        )


class PipelineLoadView(APIView):
    """``POST pipeline/load``: checks the request; nothing is loaded ahead of the offer here.

    One pipeline per session: the request must name exactly one pipeline node,
    a pipeline this server has; known parameters in its ``load_params`` must be
    valid (others, such as Scope's ``height``/``width``, are ignored).
    """

    permission_classes = [StreamingAllowed]
    # JSON only, as Scope sends it: the body nests lists of objects, which no form can carry.
    # (Also: under daphne, Twisted answers a multipart body with no parts by a bare 400 before Django sees it.)
    parser_classes = [parser for parser in api_settings.DEFAULT_PARSER_CLASSES if issubclass(parser, JSONParser)]

    @extend_schema(
        request=ScopePipelineLoadRequestSerializer,
        responses={200: ScopeMessageSerializer, 400: ERROR, 401: ERROR},
    )
    def post(self, request: Request) -> Response:
        body = ScopePipelineLoadRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        if data.get("pipelines"):
            items = [(item["pipeline_id"], item.get("load_params"), "pipelines[].pipeline_id")
                     for item in data["pipelines"]]
        elif data.get("pipeline_ids"):
            items = [(pipeline_id, data.get("load_params"), "pipeline_ids") for pipeline_id in data["pipeline_ids"]]
        else:
            raise ScopeError(errors.INVALID_MESSAGE, "Either 'pipelines' or 'pipeline_ids' must be given.")
        for pipeline_id, _, field in items:
            _known_pipeline(pipeline_id, field)
        if len(items) > 1:
            raise ScopeError(
                errors.INVALID_MESSAGE,
                f"This server runs one pipeline per session; got {len(items)} "
                f"({', '.join(pipeline_id for pipeline_id, _, _ in items)}). Chains are not supported.",
            )
        pipeline_id, load_params, _ = items[0]
        # Same rules as an offer's initialParameters: known parameters checked, others ignored.
        validate_parameters({**(load_params or {}), "pipeline": pipeline_id},
                            default_pipeline=settings.SCOPE_DEFAULT_PIPELINE)
        if _uses_browser_session(request):
            request.session[SESSION_KEY] = {"pipeline_id": pipeline_id, "load_params": load_params}
        return Response({"message": f"Pipeline '{pipeline_id}' is ready; it starts with the next offer."})


class PipelineSchemasView(APIView):
    """``GET pipelines/schemas``: every pipeline in Scope's metadata shape, the default first."""

    permission_classes = [StreamingAllowed]

    @extend_schema(responses={200: ScopePipelineSchemasSerializer, 401: ERROR})
    def get(self, request: Request) -> Response:
        pipelines = available_pipelines()
        # Scope's UI falls back to the first pipeline listed when its own default is absent.
        names = sorted(pipelines, key=lambda name: name != settings.SCOPE_DEFAULT_PIPELINE)
        return Response({"pipelines": {name: pipeline_schema(name, pipelines[name]) for name in names}})


class ModelStatusView(APIView):
    """``GET models/status?pipeline_id=``: no pipeline here needs downloaded model files."""

    permission_classes = [StreamingAllowed]

    @extend_schema(
        parameters=[OpenApiParameter("pipeline_id", OpenApiTypes.STR, required=True,
                                     description="A pipeline name from pipelines/schemas.")],
        responses={200: ScopeModelStatusSerializer, 400: ERROR, 401: ERROR},
    )
    def get(self, request: Request) -> Response:
        if "pipeline_id" not in request.query_params:
            raise ScopeError(errors.INVALID_MESSAGE, "'pipeline_id' is required.")
        _known_pipeline(request.query_params["pipeline_id"], "pipeline_id")
        return Response({"downloaded": True, "progress": None})


class HardwareInfoView(APIView):
    """``GET hardware/info``: no VRAM figure (the web process never touches the GPU), no Spout/NDI/Syphon."""

    permission_classes = [StreamingAllowed]

    @extend_schema(responses={200: ScopeHardwareInfoSerializer, 401: ERROR})
    def get(self, request: Request) -> Response:
        unavailable = {"available": False, "reason": UNAVAILABLE_HERE, "install_hint": None}
        return Response({"vram_gb": None, "spout": unavailable, "ndi": unavailable, "syphon": unavailable})


class InputSourcesView(APIView):
    """``GET input-sources``: none; the browser's own camera or file is the only source."""

    permission_classes = [StreamingAllowed]

    @extend_schema(responses={200: ScopeInputSourcesSerializer, 401: ERROR})
    def get(self, request: Request) -> Response:
        return Response({"input_sources": []})


class CloudStatusView(APIView):
    """``GET cloud/status``: never connected; this server is not a relay to Scope's cloud."""

    permission_classes = [StreamingAllowed]

    @extend_schema(responses={200: ScopeCloudStatusSerializer, 401: ERROR})
    def get(self, request: Request) -> Response:
        return Response(
            {
                "connected": False,
                "connecting": False,
                "error": None,
                "connect_stage": None,
                "webrtc_connected": False,
                "app_id": None,
                "connection_id": None,
                "credentials_configured": False,
                "stats": None,
                "last_close_code": None,
                "last_close_reason": None,
            }
        )
