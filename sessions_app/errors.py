"""Error codes shared by the socket and the REST API, and the words shown for them."""

from typing import Final


class ScopeError(Exception):
    """A refusal the client should see: a ``code`` from the design and a message."""

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

# What a person is told when the server ends their session.
CLOSE_MESSAGES: Final = {
    "CLIENT_DISCONNECT": "You left the session.",
    "SESSION_TERMINATED": "Session ended by an operator.",
    "PEER_FAILED": "The video connection failed or was closed.",
    "WORKER_LOST": "Lost connection to the media server.",
    "SERVER_SHUTDOWN": "The server is restarting; start again in a moment.",
    "IDLE_TIMEOUT": "No video arrived from your camera for too long.",
    "SIGNALING_LOST": "Lost connection to the server.",
    "ERROR": "Something went wrong on the server, so the session was ended.",
}


# WebSocket close code per close reason (None: the socket is already gone).
CLOSE_CODES: Final = {
    "CLIENT_DISCONNECT": None,
    "MAX_DURATION_EXCEEDED": 4008,
    "SESSION_TERMINATED": 4009,
    "PEER_FAILED": 4010,
    "WORKER_LOST": 4011,
    "SERVER_SHUTDOWN": 4012,
    "IDLE_TIMEOUT": 4013,
    "SIGNALING_LOST": None,
    "ERROR": 4500,
}


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
    return CLOSE_MESSAGES.get(reason, reason)
