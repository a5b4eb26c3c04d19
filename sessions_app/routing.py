from django.urls import path

from .consumers import SignalingConsumer
from .dashboard import DashboardConsumer

websocket_urlpatterns = [
    path("ws/webrtc/", SignalingConsumer.as_asgi()),
    path("ws/dashboard/", DashboardConsumer.as_asgi()),
]
