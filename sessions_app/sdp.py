"""Checks on client SDP before anything is created or sent to a worker."""

from aiortc.sdp import SessionDescription

from . import errors
from .errors import ScopeError

MAX_SDP_BYTES = 60_000


def validate_offer(sdp: object, sdp_type: object) -> str:
    """Return the offer's SDP if it is one a worker can answer, else raise INVALID_SDP."""
    if sdp_type != "offer":
        raise ScopeError(errors.INVALID_SDP, f"Expected an SDP of type 'offer', got {sdp_type!r}.")
    if not isinstance(sdp, str) or not sdp.strip():
        raise ScopeError(errors.INVALID_SDP, "The offer has no SDP text.")
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise ScopeError(errors.INVALID_SDP, "The SDP is too large.")
    if not sdp.lstrip().startswith("v=0"):
        raise ScopeError(errors.INVALID_SDP, "The SDP does not start with 'v=0'.")
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # the parser raises many kinds on malformed input
        raise ScopeError(errors.INVALID_SDP, f"The SDP could not be parsed: {exc}") from exc
    if not any(media.kind == "video" for media in description.media):
        raise ScopeError(errors.INVALID_SDP, "The offer has no video section.")
    if not all(media.ice.usernameFragment and media.dtls for media in description.media if media.kind != "application"):
        raise ScopeError(errors.INVALID_SDP, "The offer lacks ICE credentials or a DTLS fingerprint.")
    return sdp
