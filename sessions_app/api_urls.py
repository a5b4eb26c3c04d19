"""``/api/v1/`` routes. Each answers with and without a trailing slash, never redirecting."""

from django.urls import re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from . import api, scope_compat, whip


class OptionalSlashRouter(SimpleRouter):
    def __init__(self) -> None:
        super().__init__()
        # SimpleRouter only offers "/" or ""; its patterns take any regex here.
        self.trailing_slash = "/?"


router = OptionalSlashRouter()
router.register("webrtc/offer", api.OfferViewSet, basename="webrtc-offer")
router.register("sessions", api.SessionViewSet, basename="session")
router.register("workers", api.WorkerViewSet, basename="worker")

urlpatterns = [
    re_path(r"^webrtc/ice-servers/?$", api.IceServersView.as_view(), name="webrtc-ice-servers"),
    re_path(r"^pipelines/?$", api.PipelinesView.as_view(), name="pipelines"),
    # Daydream Scope's UI routes, in Scope's shapes (docs/scope-compat.md).
    re_path(r"^pipeline/status/?$", scope_compat.PipelineStatusView.as_view(), name="scope-pipeline-status"),
    re_path(r"^pipeline/load/?$", scope_compat.PipelineLoadView.as_view(), name="scope-pipeline-load"),
    re_path(r"^pipelines/schemas/?$", scope_compat.PipelineSchemasView.as_view(), name="scope-pipeline-schemas"),
    re_path(r"^models/status/?$", scope_compat.ModelStatusView.as_view(), name="scope-model-status"),
    re_path(r"^hardware/info/?$", scope_compat.HardwareInfoView.as_view(), name="scope-hardware-info"),
    re_path(r"^input-sources/?$", scope_compat.InputSourcesView.as_view(), name="scope-input-sources"),
    re_path(r"^cloud/status/?$", scope_compat.CloudStatusView.as_view(), name="scope-cloud-status"),
    # WHIP publishing and WHEP playback (RFC 9725).
    re_path(r"^whip/?$", whip.WhipView.as_view(), name="whip"),
    re_path(r"^whip/(?P<session_id>[^/]+)/?$", whip.WhipSessionView.as_view(), name="whip-session"),
    re_path(r"^whep/(?P<session_id>[^/]+)/?$", whip.WhepView.as_view(), name="whep"),
    re_path(r"^whep/(?P<session_id>[^/]+)/(?P<viewer_id>[^/]+)/?$", whip.WhepViewerView.as_view(),
            name="whep-viewer"),
    re_path(r"^schema/?$", SpectacularAPIView.as_view(), name="schema"),
    re_path(r"^schema/ui/?$", SpectacularSwaggerView.as_view(url_name="schema"), name="schema-ui"),
    *router.urls,
]
