"""Checks on client SDP before anything is created or sent to a worker."""

from aiortc.sdp import SessionDescription
from django.conf import settings

from . import errors
from .errors import ScopeError

MAX_SDP_BYTES = 60_000
# Each media section becomes a transceiver on the worker; a camera and a data channel need two.
MAX_MEDIA_SECTIONS = 4


def count_candidates(sdp: str) -> int:
    """The ICE candidates an SDP names (its ``a=candidate:`` lines, the way aiortc reads them)."""
    return sum(line.startswith("a=candidate:") for line in sdp.splitlines())


def validate_offer(sdp: object, sdp_type: object) -> str:
    """Return the offer's SDP if it is one a worker can answer, else raise INVALID_SDP.

    An offer naming more ICE candidates than a session may have over its life is RATE_LIMITED.
    """
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
    if len(description.media) > MAX_MEDIA_SECTIONS:
        raise ScopeError(
            errors.INVALID_SDP,
            f"The offer has {len(description.media)} media sections; at most {MAX_MEDIA_SECTIONS} are accepted.",
        )
    if not any(media.kind == "video" for media in description.media):
        raise ScopeError(errors.INVALID_SDP, "The offer has no video section.")
    if not all(media.ice.usernameFragment and media.dtls for media in description.media if media.kind != "application"):
        raise ScopeError(errors.INVALID_SDP, "The offer lacks ICE credentials or a DTLS fingerprint.")
    cap = settings.SCOPE_MAX_CANDIDATES_PER_SESSION
    if count_candidates(sdp) > cap:
        raise ScopeError(errors.RATE_LIMITED, f"The offer names more than {cap} ICE candidates, a session's most.")
    return sdp
