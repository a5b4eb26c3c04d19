"""One log line per lifecycle step, on the ``scope.lifecycle`` logger, for operators' log systems.

Every session step (``lifecycle.session_step``: created, placed, offered,
answered, live, closing, peer_closed, pipeline_stopped, cleaned_up, closed) and
worker step (``lifecycle.worker_step``: registered, lost, returned, draining,
retired) is logged once, by the process that recorded it, after its
transaction committed. Each line carries the same fields as ``extra``, so in
JSON they are top-level keys (scope_site/logs.py):

- ``event``: ``session.<step>`` or ``worker.<step>``; ``step``: the step alone
- ``session_id``, ``connection_id`` (the signaling socket; null for HTTP
  signaling and worker steps), ``worker_id`` (null until placed), ``reason``
  (the close reason, from ``closing`` on; else null)
- sessions: ``state``, ``owner``, ``pipeline``, ``detail`` (the trail event's
  detail), ``at`` (when the step happened, which for a teardown step is the
  worker's own measure); on ``closed``, ``frames_in`` and ``frames_out``
- workers: ``host``, ``detail``, ``at``

Steps log at INFO; a worker ``lost`` at WARNING. Nothing here logs at ERROR,
and nothing raises into the services' commit hooks.
"""

from __future__ import annotations

import logging
from typing import Any

from . import lifecycle

logger = logging.getLogger("scope.lifecycle")


def session_fields(step: lifecycle.SessionStep) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event": f"session.{step.kind}",
        "step": step.kind,
        "session_id": step.session_id,
        "worker_id": step.worker_id,
        "connection_id": step.connection_id or None,
        "reason": step.close_reason or None,
        "state": step.state,
        "owner": step.owner,
        "pipeline": step.pipeline or None,
        "detail": dict(step.detail),
        "at": step.at.isoformat(),
    }
    if step.kind == "closed":
        fields.update(frames_in=step.frames_in, frames_out=step.frames_out)
    return fields


def worker_fields(step: lifecycle.WorkerStep) -> dict[str, Any]:
    return {
        "event": f"worker.{step.kind}",
        "step": step.kind,
        "session_id": None,
        "worker_id": step.worker_id,
        "connection_id": None,
        "reason": None,
        "host": step.host,
        "detail": dict(step.detail),
        "at": step.at.isoformat(),
    }


def log_session_step(sender: Any, step: lifecycle.SessionStep, **kwargs: Any) -> None:
    try:
        fields = session_fields(step)
        worker = f" on worker {step.worker_id}" if step.worker_id is not None else ""
        reason = f" ({step.close_reason})" if step.close_reason else ""
        logger.info("session %s: %s%s%s", step.session_id, step.kind, reason, worker, extra=fields)
    except Exception:  # a log line must never break the commit hooks after it
        logger.warning("could not log session step %r", step, exc_info=True)


def log_worker_step(sender: Any, step: lifecycle.WorkerStep, **kwargs: Any) -> None:
    try:
        level = logging.WARNING if step.kind == "lost" else logging.INFO
        logger.log(level, "worker %s on %s: %s", step.worker_id, step.host, step.kind, extra=worker_fields(step))
    except Exception:
        logger.warning("could not log worker step %r", step, exc_info=True)


# Connected when the app is ready (apps.py imports this module); once per process, however often.
lifecycle.session_step.connect(log_session_step, dispatch_uid="scope.lifecycle.session_log")
lifecycle.worker_step.connect(log_worker_step, dispatch_uid="scope.lifecycle.worker_log")
