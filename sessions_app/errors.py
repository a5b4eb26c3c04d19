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

CLOSE_MESSAGES: Final = {
    "CLIENT_DISCONNECT": "The signaling socket was closed.",
    "MAX_DURATION_EXCEEDED": "The session reached its maximum duration.",
    "SESSION_TERMINATED": "The session was ended by an operator.",
    "PEER_FAILED": "The peer connection failed or was closed.",
    "WORKER_LOST": "The media worker stopped responding.",
    "SERVER_SHUTDOWN": "The server is shutting down.",
    "IDLE_TIMEOUT": "No media arrived for too long.",
    "SIGNALING_LOST": "The signaling server stopped responding.",
    "ERROR": "The session failed with an error.",
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
