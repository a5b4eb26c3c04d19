"""Daydream Scope's UI routes (sessions_app/scope_compat.py), against the real URLconf.

Each test asserts the fields Scope's frontend reads (frontend/src/lib/api.ts and
the hooks that use it: usePipelines, usePipeline, useStreamState, StreamPage).
"""

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from media_pipeline.parameters import apply_update
from media_pipeline.pipelines import available_pipelines, validate_parameters
from tests import scope_fixtures

pytestmark = pytest.mark.django_db

# Every route this module adds, with a request that succeeds.
ROUTES = [
    ("get", "/api/v1/pipeline/status", None),
    ("post", "/api/v1/pipeline/load", {"pipeline_ids": ["passthrough"]}),
    ("get", "/api/v1/pipelines/schemas", None),
    ("get", "/api/v1/models/status?pipeline_id=passthrough", None),
    ("get", "/api/v1/hardware/info", None),
    ("get", "/api/v1/input-sources", None),
    ("get", "/api/v1/cloud/status", None),
]

# PipelineSchemaInfo in api.ts, every field usePipelines.transformSchemas reads included.
SCHEMA_INFO_FIELDS = {
    "id", "name", "description", "version", "docs_url", "estimated_vram_gb", "requires_models", "supports_lora",
    "supports_vace", "usage", "config_schema", "supported_modes", "default_mode", "supports_prompts",
    "default_temporal_interpolation_method", "default_temporal_interpolation_steps",
    "default_spatial_interpolation_method", "supports_cache_management", "supports_kv_cache_bias",
    "supports_quantization", "min_dimension", "recommended_quantization_vram_threshold", "modified", "plugin_name",
    "inputs", "outputs", "produces_video", "produces_audio",
}
STATUS_FIELDS = {"status", "pipeline_id", "load_params", "loaded_lora_adapters", "error", "loading_stage",
                 "produces_video", "produces_audio"}


@pytest.fixture(autouse=True)
def anonymous_streaming(settings):
    """The embedded default, where Scope's UI (which sends no credentials) can stream."""
    settings.SCOPE_ALLOW_ANONYMOUS = True
    settings.SCOPE_DEFAULT_PIPELINE = "passthrough"


def client_for(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def call(client: APIClient, method: str, path: str, body=None):
    return getattr(client, method)(path, body, format="json") if body is not None else getattr(client, method)(path)


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]


# --- routing and permissions ----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize("slash", ["", "/"])
def test_every_route_answers_with_and_without_a_trailing_slash(method, path, body, slash):
    route, _, query = path.partition("?")
    response = call(APIClient(), method, route + slash + (f"?{query}" if query else ""), body)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_routes_follow_the_streaming_permission(settings, alice, method, path, body):
    settings.SCOPE_ALLOW_ANONYMOUS = False
    assert_error(call(APIClient(), method, path, body), 401, "UNAUTHORIZED")
    assert call(client_for(alice), method, path, body).status_code == 200
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token not-a-real-key")
    settings.SCOPE_ALLOW_ANONYMOUS = True
    assert_error(call(bad, method, path, body), 401, "UNAUTHORIZED")


def test_the_openapi_schema_lists_every_route():
    response = APIClient().get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for _, path, _ in ROUTES:
        route = path.partition("?")[0]
        assert route + "/" in paths or route in paths, sorted(paths)


# --- pipelines/schemas ------------------------------------------------------------------------


def test_schemas_list_every_pipeline_in_scopes_shape_default_first():
    response = APIClient().get("/api/v1/pipelines/schemas")
    assert response.status_code == 200
    pipelines = response.json()["pipelines"]
    assert set(pipelines) == set(available_pipelines())
    # Scope's UI picks the first listed when its own default (longlive) is absent.
    assert next(iter(pipelines)) == "passthrough"
    for pipeline_id, info in pipelines.items():
        assert SCHEMA_INFO_FIELDS <= set(info), SCHEMA_INFO_FIELDS - set(info)
        assert info["id"] == pipeline_id
        assert isinstance(info["name"], str) and info["name"]
        assert info["supported_modes"] == ["video"] and info["default_mode"] == "video"
        # No prompts, no models: the UI sends no prompts and skips the download dialog.
        assert info["supports_prompts"] is False
        assert info["requires_models"] is False
        assert info["supports_lora"] is info["supports_vace"] is info["supports_quantization"] is False
        assert info["produces_video"] is True and info["produces_audio"] is False
        assert info["usage"] == []
        assert info["config_schema"]["type"] == "object"
        assert isinstance(info["config_schema"]["properties"], dict)


def test_schemas_describe_parameters_as_live_controls():
    pipelines = APIClient().get("/api/v1/pipelines/schemas/").json()["pipelines"]
    assert pipelines["blur"]["name"] == "Blur"
    assert pipelines["passthrough"]["config_schema"]["properties"] == {}
    radius = pipelines["blur"]["config_schema"]["properties"]["radius"]
    # inferPrimitiveFieldType: integer with minimum and maximum → a slider.
    assert radius["type"] == "integer"
    assert (radius["minimum"], radius["maximum"], radius["default"]) == (0, 15, 2)
    # is_load_param false: editable while streaming, sent as {radius: n} on the data channel.
    assert radius["ui"]["is_load_param"] is False
    assert radius["ui"]["category"] == "configuration"
    strength = pipelines["edges"]["config_schema"]["properties"]["strength"]
    assert strength["type"] == "number" and strength["minimum"] == 0.1 and strength["maximum"] == 10.0


def test_default_pipeline_setting_decides_the_first_listed(settings):
    settings.SCOPE_DEFAULT_PIPELINE = "blur"
    assert next(iter(APIClient().get("/api/v1/pipelines/schemas").json()["pipelines"])) == "blur"


# --- pipeline/load and pipeline/status --------------------------------------------------------


def test_status_reads_loaded_before_any_load():
    response = APIClient().get("/api/v1/pipeline/status")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == STATUS_FIELDS
    assert body["status"] == "loaded"
    assert body["pipeline_id"] == "passthrough"
    assert body["load_params"] is None
    assert body["error"] is None and body["loading_stage"] is None
    # StreamPage copies these into the offer's initialParameters.
    assert body["produces_video"] is True and body["produces_audio"] is False


def test_scopes_load_request_is_accepted_and_status_then_names_it():
    client = APIClient()
    request = scope_fixtures.scope_load_request_for_blur()
    response = client.post("/api/v1/pipeline/load", request, format="json")
    assert response.status_code == 200, response.content
    assert isinstance(response.json()["message"], str)
    # usePipeline polls status until "loaded": here it is at once.
    status = client.get("/api/v1/pipeline/status").json()
    assert status["status"] == "loaded"
    assert status["pipeline_id"] == "blur"
    assert status["load_params"] == request["pipelines"][0]["load_params"]
    # Another browser has loaded nothing.
    assert APIClient().get("/api/v1/pipeline/status").json()["pipeline_id"] == "passthrough"


def test_legacy_pipeline_ids_form_is_accepted():
    client = APIClient()
    response = client.post("/api/v1/pipeline/load/", {"pipeline_ids": ["edges"], "load_params": {"strength": 2.5}},
                           format="json")
    assert response.status_code == 200, response.content
    status = client.get("/api/v1/pipeline/status/").json()
    assert (status["pipeline_id"], status["load_params"]) == ("edges", {"strength": 2.5})


def test_a_token_client_loads_without_a_session(alice):
    client = client_for(alice)
    response = client.post("/api/v1/pipeline/load", {"pipeline_ids": ["invert"]}, format="json")
    assert response.status_code == 200
    assert "sessionid" not in response.cookies
    assert client.get("/api/v1/pipeline/status").json()["pipeline_id"] == "passthrough"


@pytest.mark.parametrize(
    "body",
    [
        {"pipelines": [{"node_id": "x", "pipeline_id": "longlive", "load_params": None}]},
        {"pipeline_ids": ["no-such-pipeline"]},
        {"pipeline_ids": [""]},
        {"pipeline_ids": [7]},
    ],
)
def test_load_of_an_unknown_pipeline_is_invalid_message(body):
    response = APIClient().post("/api/v1/pipeline/load", body, format="json")
    assert_error(response, 400, "INVALID_MESSAGE")
    assert "passthrough" in response.json()["detail"]  # it names what is available


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"pipelines": [], "pipeline_ids": []},
        {"pipelines": None, "pipeline_ids": None},
        {"pipelines": "blur"},
        {"pipelines": [{"pipeline_id": "blur"}]},  # node_id missing
        {"pipelines": [None]},
        {"pipeline_ids": [None]},
        {"pipeline_ids": "blur"},
        {"pipeline_ids": ["blur"], "load_params": ["radius", 3]},
        {"pipeline_ids": ["blur"], "load_params": {"radius": 99}},
        {"pipeline_ids": ["blur"], "load_params": {"radius": "three"}},
        {"pipelines": [{"node_id": "a", "pipeline_id": "blur"}, {"node_id": "b", "pipeline_id": "invert"}]},
        [],
    ],
)
def test_bad_load_requests_are_invalid_message(body):
    client = APIClient()
    assert_error(client.post("/api/v1/pipeline/load", body, format="json"), 400, "INVALID_MESSAGE")
    # A refused load changes nothing.
    assert client.get("/api/v1/pipeline/status").json()["pipeline_id"] == "passthrough"


def test_load_with_a_body_that_is_not_json_is_invalid_message():
    response = APIClient().post("/api/v1/pipeline/load", "pipeline_ids=blur", content_type="text/plain")
    assert_error(response, 400, "INVALID_MESSAGE")
    response = APIClient().post("/api/v1/pipeline/load", "{not json", content_type="application/json")
    assert_error(response, 400, "INVALID_MESSAGE")
    # JSON only: a form cannot carry the nested body Scope sends.
    response = APIClient().post("/api/v1/pipeline/load", {"pipeline_ids": "blur"}, format="multipart")
    assert_error(response, 400, "INVALID_MESSAGE")


def test_load_ignores_parameters_the_pipeline_does_not_have():
    # Scope adds height/width (and loras, vace_enabled, quantization for its own pipelines).
    body = {"pipelines": [{"node_id": "invert", "pipeline_id": "invert",
                           "load_params": {"height": 320, "width": 576, "quantization": None, "vace_enabled": True}}],
            "connection_id": "abc", "user_id": "u1"}
    assert APIClient().post("/api/v1/pipeline/load", body, format="json").status_code == 200


def test_a_signed_in_browser_must_send_its_csrf_token(alice):
    """Scope's UI sends none, so it drives this server anonymously (embedded) rather than signed in."""
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.get("/api/v1/pipeline/status").status_code == 200
    assert_error(client.post("/api/v1/pipeline/load", {"pipeline_ids": ["blur"]}, format="json"), 403,
                 "UNAUTHORIZED")


def test_status_and_load_refuse_other_methods():
    assert APIClient().post("/api/v1/pipeline/status", {}, format="json").status_code == 405
    assert APIClient().get("/api/v1/pipeline/load").status_code == 405


# --- the other routes the UI calls around a stream -----------------------------------------------


def test_models_are_always_downloaded_for_a_known_pipeline():
    response = APIClient().get("/api/v1/models/status", {"pipeline_id": "blur"})
    assert response.status_code == 200
    assert response.json() == {"downloaded": True, "progress": None}


@pytest.mark.parametrize("query", [{}, {"pipeline_id": "longlive"}, {"pipeline_id": ""}])
def test_model_status_without_a_known_pipeline_is_invalid_message(query):
    assert_error(APIClient().get("/api/v1/models/status", query), 400, "INVALID_MESSAGE")


def test_hardware_info_shape():
    body = APIClient().get("/api/v1/hardware/info").json()
    assert body["vram_gb"] is None
    for integration in ("spout", "ndi", "syphon"):
        assert body[integration]["available"] is False
        assert isinstance(body[integration]["reason"], str)
        assert "install_hint" in body[integration]


def test_input_sources_are_none():
    assert APIClient().get("/api/v1/input-sources").json() == {"input_sources": []}


def test_cloud_status_reads_not_connected():
    body = APIClient().get("/api/v1/cloud/status").json()
    # StreamPage waits for the cloud only when connecting and not connected.
    assert body["connected"] is False and body["connecting"] is False
    for field in ("error", "app_id", "connection_id", "last_close_code", "last_close_reason", "connect_stage"):
        assert body[field] is None
    assert body["credentials_configured"] is False


# --- the fixtures: what Scope sends, as this server reads it -----------------------------------------


def test_scopes_default_offer_parameters_run_the_default_pipeline():
    parameters = scope_fixtures.scope_initial_parameters()
    assert {"input_mode", "prompts", "pipeline_ids", "recording", "graph"} <= set(parameters)
    assert validate_parameters(parameters, default_pipeline="passthrough") == ("passthrough", {})


def test_scopes_offer_for_blur_runs_blur_with_its_radius():
    parameters = scope_fixtures.scope_initial_parameters_for_blur()
    assert validate_parameters(parameters, default_pipeline="passthrough") == ("blur", {"radius": 5})


def test_scopes_data_channel_updates_apply():
    assert apply_update(pipeline="blur", parameters={"radius": 5},
                        update=scope_fixtures.scope_schema_field_update()) == ("blur", {"radius": 7})
    # Keys the pipeline does not know are ignored, never refused.
    for update in (scope_fixtures.scope_pause_update(), scope_fixtures.scope_prompt_update()):
        assert apply_update(pipeline="blur", parameters={"radius": 5}, update=update) == ("blur", {"radius": 5})


def test_fixture_helpers_hand_out_copies():
    first = scope_fixtures.scope_initial_parameters()
    first["graph"]["nodes"].clear()
    assert scope_fixtures.scope_initial_parameters()["graph"]["nodes"]
