from django.urls import path

from .consumers import SignalingConsumer

websocket_urlpatterns = [
    path("ws/webrtc/", SignalingConsumer.as_asgi()),
]
