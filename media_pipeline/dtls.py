"""The DTLS role of the worker's answers: the server's, wherever the offer leaves the choice to us.

aiortc answers an ``actpass`` offer as the DTLS client, and its client offers
only ECDHE-ECDSA cipher suites: a peer with an RSA certificate (GStreamer's
webrtcbin, as in Debian's WHIP client) then fails the handshake with "no
shared cipher". As the DTLS server aiortc uses its own ECDSA certificate, which
every client here accepts, so that is the role its answers take.
"""

from aiortc import RTCSessionDescription


def as_dtls_server(*, offer_sdp: str, answer: RTCSessionDescription) -> RTCSessionDescription:
    """``answer`` with ``a=setup:passive`` unless the offer insists on being the DTLS server itself."""
    if "a=setup:passive" in offer_sdp:
        return answer
    return RTCSessionDescription(sdp=answer.sdp.replace("a=setup:active", "a=setup:passive"), type=answer.type)
