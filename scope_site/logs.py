"""How every process of this server logs: one line per record on stderr, as JSON or as readable text.

``SCOPE_LOG_FORMAT`` picks the format: ``json`` (a JSON object per line, for a
log system to parse) or ``text`` (for people at a terminal); unset, it is
``text`` when stderr is a terminal and ``json`` otherwise. settings.LOGGING
uses ``FORMATTERS`` and ``LOGGERS`` and is applied by ``configure()``
(``LOGGING_CONFIG``), so daphne, ``manage.py mediaworker`` and Celery
(scope_site/celery.py keeps Celery from reconfiguring) log alike, warnings and
uncaught exceptions included.

A JSON line carries ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``,
``pid`` and ``message``, then every ``extra=`` field of the call as a
top-level key (the lifecycle lines' ``session_id``, ``worker_id``, …; see
sessions_app/lifecycle_log.py). The text format is the same record as
``<time> <LEVEL> <logger> <pid>: <message> key=value …``.

daphne writes its access log straight to stdout; ``route_daphne_access_log()``
sends it through logging instead (logger ``daphne.access``), as structured
lines like the rest.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

from django.core.exceptions import ImproperlyConfigured
from pythonjsonlogger.core import RESERVED_ATTRS, merge_record_extra

FORMATS = ("json", "text")
ACCESS_LOGGER = "daphne.access"

# A JSON line's own fields, and the names they take (the rest are the call's extras).
_JSON_FIELDS = ["levelname", "name", "process", "message"]
_JSON_RENAMES = {"levelname": "level", "name": "logger", "process": "pid"}
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s"
# Record attributes that are never extras: the standard ones, and those a formatter adds.
_NOT_EXTRAS = frozenset([*RESERVED_ATTRS, "taskName", "color_message"])


def log_format(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> str:
    """``SCOPE_LOG_FORMAT``, or its default: ``text`` when ``stream`` (stderr) is a terminal, else ``json``."""
    environ = os.environ if environ is None else environ
    raw = environ.get("SCOPE_LOG_FORMAT", "").strip().lower()
    if raw:
        if raw not in FORMATS:
            raise ImproperlyConfigured(f"SCOPE_LOG_FORMAT must be json or text, not {environ['SCOPE_LOG_FORMAT']!r}")
        return raw
    return "text" if _is_terminal(sys.stderr if stream is None else stream) else "json"


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or already closed
        return False


# settings.LOGGING's formatters: the handler on stderr uses the one named by log_format().
FORMATTERS: dict[str, dict[str, Any]] = {
    "json": {
        "()": "pythonjsonlogger.json.JsonFormatter",
        "fmt": _JSON_FIELDS,
        "rename_fields": _JSON_RENAMES,
        "timestamp": True,  # the record's time as a UTC datetime, written ISO 8601
    },
    "text": {"()": "scope_site.logs.TextFormatter", "format": _TEXT_FORMAT},
}

# settings.LOGGING's loggers, besides the libraries' levels set there.
LOGGERS: dict[str, dict[str, Any]] = {
    # Django's own handlers (plain text to the console when DEBUG) would print
    # a second, unformatted copy: their records go to the root like the rest.
    "django": {"handlers": [], "propagate": True},
    "django.server": {"handlers": [], "propagate": True},
    # One line per request or socket event, whatever LOG_LEVEL; daphne -v 0 turns it off.
    ACCESS_LOGGER: {"level": "INFO"},
}


def configure(config: dict[str, Any]) -> None:
    """settings.LOGGING_CONFIG: apply ``config``, and send what Python would print raw to stderr through it too.

    Warnings (``py.warnings``) and uncaught exceptions, the main thread's
    (``sys.excepthook``) and other threads' (``threading.excepthook``), become
    records like any other, so a JSON log holds nothing but JSON lines.
    """
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("scope.uncaught").critical(
        "uncaught %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb)
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else "?"
    logging.getLogger("scope.uncaught").critical(
        "uncaught %s in thread %s: %s", args.exc_type.__name__, thread, args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback), extra={"thread_name": thread},
    )


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return merge_record_extra(record, {}, reserved=_NOT_EXTRAS)


def _text_value(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, separators=(",", ":"))
    if isinstance(value, (bool, int, float)):
        return str(value)
    text = str(value)
    plain = text and not any(c.isspace() or c in "\"'=" for c in text)
    return text if plain else json.dumps(text)


class TextFormatter(logging.Formatter):
    """The plain line, with the call's extras appended as ``key=value``.

    Strings with spaces or quotes are quoted (JSON), dicts and lists written as
    compact JSON; None and ``{}`` are left out.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = " ".join(
            f"{key}={_text_value(value)}" for key, value in _extras(record).items() if value is not None and value != {}
        )
        return f"{line} {fields}" if fields else line


# --- daphne's access log ----------------------------------------------------------

_WEBSOCKET_ACTIONS = {"connecting": "WSCONNECTING", "rejected": "WSREJECT", "connected": "WSCONNECT",
                      "disconnected": "WSDISCONNECT"}


def _log_access(self, protocol: str, action: str, details: dict[str, Any]) -> None:
    """daphne's ``AccessLogGenerator.__call__``: the same entries, as records of ``daphne.access``."""
    if protocol == "http" and action == "complete":
        method, status, size = details["method"], details["status"], details["size"]
    elif protocol == "websocket" and action in _WEBSOCKET_ACTIONS:
        method, status, size = _WEBSOCKET_ACTIONS[action], None, None
    else:
        return
    path, client = details.get("path"), details.get("client")
    shown = " ".join(str(part) for part in (method, path, status, size) if part is not None)
    logging.getLogger(ACCESS_LOGGER).info(
        "%s %s", client, shown,
        extra={"client": client, "method": method, "path": path, "status": status, "size": size},
    )


def route_daphne_access_log() -> None:
    """daphne's access log goes through logging (JSON or text like every line), not raw to stdout.

    daphne builds its ``AccessLogGenerator`` after loading the application, so
    patching the class here (process.apply_patches, daphne version-guarded)
    covers it. ``daphne -v 0`` still turns the access log off; ``--access-log
    FILE`` is not honoured (the lines go to stderr with the rest).
    """
    from daphne.access import AccessLogGenerator

    AccessLogGenerator.__call__ = _log_access
