"""Cap incoming WebSocket messages at the protocol's 64 KiB.

An ASGI application may only close with 1000 or 3000–4999, so the 1009
("message too big") the protocol promises must come from the WebSocket layer
itself. daphne's own limit is 1 MiB and is set from its command line; this
lowers it for every socket the process serves, whatever the command line says.
"""

from daphne.ws_protocol import WebSocketFactory

MAX_MESSAGE_BYTES = 64 * 1024
_LIMITS = ("maxMessagePayloadSize", "maxFramePayloadSize")
_set_protocol_options = WebSocketFactory.setProtocolOptions


def _capped_protocol_options(self, **options):
    for name in _LIMITS:
        if name in options and (not options[name] or options[name] > MAX_MESSAGE_BYTES):
            options[name] = MAX_MESSAGE_BYTES
    # Send the close frame (with its code) before dropping the connection.
    options["failByDrop"] = False
    return _set_protocol_options(self, **options)


def install() -> None:
    WebSocketFactory.setProtocolOptions = _capped_protocol_options
