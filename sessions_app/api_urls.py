"""``/api/v1/`` routes. Each answers with and without a trailing slash, never redirecting."""

from django.urls import re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from . import api


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
    re_path(r"^schema/?$", SpectacularAPIView.as_view(), name="schema"),
    re_path(r"^schema/ui/?$", SpectacularSwaggerView.as_view(url_name="schema"), name="schema-ui"),
    *router.urls,
]
