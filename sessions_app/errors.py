"""Error codes shared by the socket and the REST API, and the words shown for them."""

from dataclasses import dataclass
from typing import Final


class ScopeError(Exception):
    """A refusal the client should see: one of the protocol's error ``code``s and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


INVALID_MESSAGE: Final = "INVALID_MESSAGE"
INVALID_SDP: Final = "INVALID_SDP"
UNKNOWN_SESSION: Final = "UNKNOWN_SESSION"
NO_CAPACITY: Final = "NO_CAPACITY"
UNAUTHORIZED: Final = "UNAUTHORIZED"
RATE_LIMITED: Final = "RATE_LIMITED"

@dataclass(frozen=True)
class CloseRule:
    """What ending a session for one reason means for its signaling socket and its user."""

    # The WebSocket close code when this ends the socket's last open session;
    # None: the socket stays open (the client may offer again) or is already gone.
    socket_code: int | None
    message: str
    # The client may offer again on the same socket (Scope's Stop closes only its peer).
    keeps_socket: bool = False


# Every close reason, with its socket code and the words shown to a person.
CLOSE_RULES: Final[dict[str, CloseRule]] = {
    "CLIENT_DISCONNECT": CloseRule(None, "You left the session."),
    "MAX_DURATION_EXCEEDED": CloseRule(4008, "Time limit reached."),
    "SESSION_TERMINATED": CloseRule(4009, "Session ended by an operator."),
    "PEER_CLOSED": CloseRule(None, "The video connection was closed.", keeps_socket=True),
    "PEER_FAILED": CloseRule(None, "The video connection failed.", keeps_socket=True),
    "WORKER_LOST": CloseRule(4011, "Lost connection to the media server."),
    "SERVER_SHUTDOWN": CloseRule(4012, "The server is restarting; start again in a moment."),
    "IDLE_TIMEOUT": CloseRule(4013, "Nothing arrived from your side for too long (no offer, or no video)."),
    # Its web process stalled past the bound and came back: the client should connect again (1012, restart).
    "SIGNALING_LOST": CloseRule(1012, "Lost connection to the server."),
    "ERROR": CloseRule(4500, "Something went wrong on the server, so the session was ended."),
}


def socket_close_code(reason: str) -> int | None:
    rule = CLOSE_RULES.get(reason)
    return rule.socket_code if rule is not None else None


def keeps_socket(reason: str) -> bool:
    rule = CLOSE_RULES.get(reason)
    return rule is not None and rule.keeps_socket


def _duration_words(seconds: float) -> str:
    """``3600`` → "60 minutes", ``90`` → "90 seconds", ``5400`` → "90 minutes"."""
    whole = round(seconds)
    if whole >= 120 and whole % 60 == 0:
        return f"{whole // 60} minutes"
    return "1 second" if whole == 1 else f"{whole} seconds"


def close_message(reason: str, *, max_session_seconds: float) -> str:
    """The words for a close reason, with the time limit spelled out where it applies."""
    if reason == "MAX_DURATION_EXCEEDED":
        return f"Time limit of {_duration_words(max_session_seconds)} reached."
    rule = CLOSE_RULES.get(reason)
    return rule.message if rule is not None else reason
