"""The media worker: the registry of its sessions' peers, their dispatch, and the services they report to.

It listens on its own channel-layer channel for ``peer.*`` messages (one
handler each) and reports every state change through ``sessions_app.services``.
What one session holds — its aiortc peer, track, pipeline and files — and the
close that releases it are ``peer.SessionPeer``'s. The same class runs inside
the web process (embedded) and as ``manage.py mediaworker`` (scaled).
"""

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable

import torch
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from sessions_app import errors, services
from sessions_app.db_lanes import liveness_db
from sessions_app.errors import ScopeError
from sessions_app.messages import (
    PeerCandidate,
    PeerCleanup,
    PeerClose,
    PeerOffer,
    PeerParameters,
    PeerUnview,
    PeerView,
    PeerViewCandidate,
    SignalingAnswer,
    SignalingError,
)
from sessions_app.models import CloseReason
from sessions_app.services import TeardownStep
from sessions_app.session_files import remove_session_files

from . import collector
from .batching import FrameBatcher
from .native_heap import release_free_heap
from .owned_tasks import OwnedTasks
from .peer import PeerEvents, SessionPeer
from .pipelines import pick_device

logger = logging.getLogger(__name__)

CLEANUP_BACKOFF_CAP_SECONDS = 60.0
DB_CALL_TIMEOUT_SECONDS = 10.0


async def _db(func: Callable[..., Any], **kwargs: Any) -> Any:
    """Run a service off the event loop, bounded; never behind the web process's request handling (embedded)."""
    return await asyncio.wait_for(liveness_db(func, **kwargs), DB_CALL_TIMEOUT_SECONDS)


def _negotiation_error(exc: Exception, session_id: str, request_id: Any) -> SignalingError:
    """The reply to an offer the worker could not answer: the error's own code, or ERROR for the unexpected."""
    code, text = (exc.code, exc.message) if isinstance(exc, ScopeError) else ("ERROR", "Negotiation failed.")
    return {"type": "signaling.error", "session_id": session_id, "code": code, "error": text, "request_id": request_id}


class MediaWorker:
    def __init__(self, *, capacity: int, device: torch.device | None = None) -> None:
        self.capacity = capacity
        self.device = device or pick_device()
        if self.device.type == "cpu":
            torch.set_num_threads(settings.SCOPE_TORCH_THREADS)
        self.channel_layer = get_channel_layer()
        self.channel_name = ""
        self.worker_id: int | None = None
        self._peers: dict[str, SessionPeer] = {}
        # Each session's max-duration timer: the worker enforces deadlines itself.
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._session_locks: dict[str, asyncio.Lock] = {}
        self._tasks = OwnedTasks(logger)
        self._loops: list[asyncio.Task] = []
        # Torch and codec work for every session on this device runs on this thread.
        self._pipeline_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipeline-{self.device}")
        # Sessions running the same pipeline and parameters share forward passes on that thread.
        self._frame_batcher = FrameBatcher(self._pipeline_executor, window_seconds=settings.SCOPE_BATCH_WINDOW_MS / 1000,
                                           max_batch=settings.SCOPE_MAX_BATCH)
        self._handlers: dict[str, Callable[[Any], Awaitable[None]]] = {
            "peer.offer": self.peer_offer,
            "peer.candidate": self.peer_candidate,
            "peer.parameters": self.peer_parameters,
            "peer.close": self.peer_close,
            "peer.cleanup": self.peer_cleanup,
            "peer.view": self.peer_view,
            "peer.view_candidate": self.peer_view_candidate,
            "peer.unview": self.peer_unview,
        }
        # Retries of session files this worker could not remove, by session.
        self._cleanup_retries: dict[str, asyncio.Task] = {}
        # A trim of the C heap is running (one at a time: a teardown meanwhile is covered by the next).
        self._heap_trimming = False

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self.channel_name = await self.channel_layer.new_channel("mediaworker.")
        worker = await _db(
            services.worker_register,
            channel_name=self.channel_name,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=str(self.device),
            capacity=self.capacity,
        )
        self.worker_id = worker.pk
        collector.observe_pauses()
        frozen = collector.freeze_start_up_objects()
        self._loops = [
            asyncio.create_task(self._receive_loop(), name="mediaworker-receive"),
            asyncio.create_task(self._heartbeat_loop(), name="mediaworker-heartbeat"),
            asyncio.create_task(self._idle_loop(), name="mediaworker-idle"),
        ]
        logger.info("media worker %s on %s, capacity %s, channel %s; %s start-up objects left out of garbage "
                    "collection", self.worker_id, self.device, self.capacity, self.channel_name, frozen)

    async def stop(self) -> None:
        """Drain: take no new sessions, close every session held (SERVER_SHUTDOWN), stop listening. Idempotent."""
        if self.worker_id is not None:
            await _db(services.worker_drain, worker_id=self.worker_id)
        for task in self._loops:
            task.cancel()
        for session_id in list(self._peers):
            await self._close_for(session_id, CloseReason.SERVER_SHUTDOWN, "shutdown")
            await self._teardown(session_id, CloseReason.SERVER_SHUTDOWN)
        retries = list(self._cleanup_retries.values())
        for task in [*self._loops, *self._tasks, *retries]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, *retries, return_exceptions=True)
        self._loops = []
        await self._frame_batcher.stop()
        if self.worker_id is not None:
            await _db(services.worker_retire, worker_id=self.worker_id)
        self._pipeline_executor.shutdown(wait=False, cancel_futures=True)

    async def _receive_loop(self) -> None:
        while True:
            # Outlasting a Redis outage is the channel layer's job (scope_site/channel_layers.py).
            message = await self.channel_layer.receive(self.channel_name)
            handler = self._handlers.get(message.get("type", ""))
            if handler is None:
                logger.warning("media worker ignores message of type %r", message.get("type"))
                continue
            # Each message runs on its own task so a slow negotiation never
            # holds up another session's close; per-session locks keep order.
            self._tasks.spawn(handler(message), f"{message['type']}-{message.get('session_id', '')}")

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(settings.SCOPE_HEARTBEAT_SECONDS)
            try:
                await self._report()
            except Exception:
                logger.exception("heartbeat failed")

    async def _idle_loop(self) -> None:
        """End sessions whose inbound media stopped for SCOPE_IDLE_TIMEOUT_SECONDS (a vanished client)."""
        idle_after = settings.SCOPE_IDLE_TIMEOUT_SECONDS
        while True:
            await asyncio.sleep(min(1.0, idle_after / 4))
            now = time.monotonic()
            for peer in list(self._peers.values()):
                frames_in = peer.frame_counts().frames_in
                if frames_in != peer.media_frames_seen:
                    peer.media_frames_seen, peer.media_seen_at = frames_in, now
                elif not peer.closing and now - peer.media_seen_at > idle_after:
                    peer.media_seen_at = now  # one close request per idle period
                    self._tasks.spawn(self._close_for(peer.session_id, CloseReason.IDLE_TIMEOUT, "idle"),
                                f"idle-{peer.session_id}")

    async def _report(self) -> None:
        reply = await _db(
            services.worker_heartbeat,
            worker_id=self.worker_id,
            peer_count=self.peer_count,
            asyncio_tasks=len(asyncio.all_tasks()),
            frames={sid: peer.frame_counts() for sid, peer in self._peers.items()},
        )
        if reply.returned:
            logger.warning("worker %s had been declared gone: dropping the peers of its ended sessions, "
                           "taking sessions again", self.worker_id)
        for session_id, reason in reply.closed.items():
            peer = self._peers.get(session_id)
            if peer is not None and not peer.closing:
                logger.warning("session %s is closed (%s) but this worker still held its peer: dropping it",
                               session_id, reason)
                self._tasks.spawn(self._teardown(session_id, reason), f"drop-{session_id}")

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._session_locks.setdefault(session_id, asyncio.Lock())

    # --- peer.offer --------------------------------------------------------

    async def peer_offer(self, message: PeerOffer) -> None:
        session_id = message["session_id"]
        peer = SessionPeer(
            session_id=session_id, pipeline=message["pipeline"], parameters=message["parameters"],
            device=self.device, frame_batcher=self._frame_batcher, events=self._events_for(session_id),
        )
        async with self._lock(session_id):
            self._peers[session_id] = peer
            try:
                answer = await asyncio.wait_for(peer.open(sdp=message["sdp"], sdp_type=message["sdp_type"]),
                                                settings.SCOPE_NEGOTIATION_TIMEOUT_SECONDS)
            except Exception as exc:
                if not isinstance(exc, ScopeError):
                    logger.exception("negotiation of session %s failed", session_id)
                await self._reply(message, _negotiation_error(exc, session_id, message["request_id"]))
                await _db(services.session_close, session_id=session_id, reason=CloseReason.ERROR,
                          by=f"worker:{self.worker_id}:negotiation")
                return
            if peer.closing:
                return  # closed while negotiating: its teardown is waiting for this lock
            response: SignalingAnswer = {
                "type": "signaling.answer", "session_id": session_id, "sdp": answer.sdp, "sdp_type": answer.type,
                "request_id": message["request_id"],
            }
            # The answer goes first and is recorded after: the client's setup waits on
            # the answer, not on the database. A session closed meanwhile gets its
            # close right behind it.
            if not await self._reply(message, response):
                await _db(services.session_close, session_id=session_id, reason=CloseReason.ERROR,
                          by=f"worker:{self.worker_id}:answer-undeliverable")
                return
            deadline_at = await _db(services.session_answered, session_id=session_id)
            if deadline_at is not None:
                self._arm_deadline(session_id, deadline_at)

    async def _reply(self, offer: PeerOffer | PeerView, reply: SignalingAnswer | SignalingError) -> bool:
        """Send the offer's reply; False if the channel layer could not (the client will never hear it)."""
        try:
            await self.channel_layer.send(offer["reply_channel"], reply)
        except Exception as exc:
            logger.warning("session %s: could not send the %s: %s", offer["session_id"], reply["type"], exc)
            return False
        return True

    def _events_for(self, session_id: str) -> PeerEvents:
        async def parameters_applied(pipeline: str, parameters: dict[str, Any]) -> None:
            try:
                await _db(services.session_set_parameters, session_id=session_id, pipeline=pipeline,
                          parameters=parameters, notify_worker=False)
            except ScopeError:
                pass  # the session is closing: nothing left to record

        return PeerEvents(
            connection_state=lambda state: self._tasks.spawn(self._connection_state_changed(session_id, state),
                                                       f"state-{session_id}"),
            pipeline_failed=lambda exc: self._pipeline_failed(session_id, exc),
            parameters_applied=parameters_applied,
            viewer_gone=lambda viewer_id, why: self._tasks.spawn(
                self._viewer_left(session_id, viewer_id, why), f"viewer-left-{viewer_id}"),
        )

    def _arm_deadline(self, session_id: str, deadline_at: datetime) -> None:
        """The worker enforces max duration itself: a timer, not a poll."""
        if session_id not in self._peers:
            return
        delay = max(0.0, (deadline_at - timezone.now()).total_seconds())
        self._deadlines[session_id] = asyncio.get_running_loop().call_later(
            delay, lambda: self._tasks.spawn(self._close_for(session_id, CloseReason.MAX_DURATION_EXCEEDED, "deadline"),
                                       f"deadline-{session_id}")
        )

    async def _close_for(self, session_id: str, reason: str, cause: str) -> None:
        await _db(services.session_close, session_id=session_id, reason=reason, by=f"worker:{self.worker_id}:{cause}")

    def _pipeline_failed(self, session_id: str, exc: BaseException) -> None:
        peer = self._peers.get(session_id)
        logger.error("session %s: pipeline %s failed", session_id, peer.pipeline if peer else "?", exc_info=exc)
        self._tasks.spawn(self._close_for(session_id, CloseReason.ERROR, "pipeline"), f"error-{session_id}")

    async def _connection_state_changed(self, session_id: str, state: str) -> None:
        peer = self._peers.get(session_id)
        if peer is None or peer.closing:
            return
        if state == "connected":
            await _db(services.session_live, session_id=session_id)
        elif state == "closed":
            # Not closed by us (peer.closing is unset): the client's DTLS close, as Scope's Stop does.
            await self._close_for(session_id, CloseReason.PEER_CLOSED, "peer-closed")
        elif state == "failed":
            await self._close_for(session_id, CloseReason.PEER_FAILED, "peer-failed")

    # --- peer.candidate / peer.parameters ------------------------------------

    async def peer_candidate(self, message: PeerCandidate) -> None:
        async with self._lock(message["session_id"]):
            peer = self._peers.get(message["session_id"])
            if peer is not None:
                await peer.add_candidate(message["candidate"])

    async def peer_parameters(self, message: PeerParameters) -> None:
        peer = self._peers.get(message["session_id"])
        if peer is None or peer.closing:
            return
        parameters = dict(message["parameters"])
        await peer.apply_parameters(parameters.pop("pipeline", peer.pipeline), parameters)

    # --- peer.view / peer.view_candidate / peer.unview: WHEP viewers ------------

    async def peer_view(self, message: PeerView) -> None:
        session_id, viewer_id = message["session_id"], message["viewer_id"]
        peer = self._peers.get(session_id)
        try:
            if peer is None or peer.closing:
                raise ScopeError(errors.UNKNOWN_SESSION, f"Session {session_id} has ended.")
            answer = await asyncio.wait_for(peer.broadcast.add_viewer(viewer_id=viewer_id, sdp=message["sdp"]),
                                            settings.SCOPE_NEGOTIATION_TIMEOUT_SECONDS)
        except Exception as exc:
            if not isinstance(exc, ScopeError):
                logger.exception("session %s: viewer %s's negotiation failed", session_id, viewer_id)
            await self._reply(message, _negotiation_error(exc, session_id, viewer_id))
            await self._viewer_left(session_id, viewer_id, "negotiation_failed")
            return
        reply: SignalingAnswer = {"type": "signaling.answer", "session_id": session_id, "sdp": answer.sdp,
                                  "sdp_type": answer.type, "request_id": viewer_id}
        if not await self._reply(message, reply):
            await peer.broadcast.remove_viewer(viewer_id)
            await self._viewer_left(session_id, viewer_id, "answer_undeliverable")

    async def peer_view_candidate(self, message: PeerViewCandidate) -> None:
        peer = self._peers.get(message["session_id"])
        if peer is not None:
            await peer.broadcast.add_candidate(viewer_id=message["viewer_id"], raw=message["candidate"])

    async def peer_unview(self, message: PeerUnview) -> None:
        peer = self._peers.get(message["session_id"])
        if peer is not None:
            await peer.broadcast.remove_viewer(message["viewer_id"])

    async def _viewer_left(self, session_id: str, viewer_id: str, reason: str) -> None:
        try:
            await _db(services.viewer_leave, session_id=session_id, viewer_id=viewer_id, reason=reason,
                      notify_worker=False)
        except ScopeError:
            pass  # the session is gone: its close recorded its viewers

    # --- peer.close --------------------------------------------------------

    async def peer_close(self, message: PeerClose) -> None:
        await self._teardown(message["session_id"], message["reason"])

    async def _teardown(self, session_id: str, reason: str) -> None:
        """Release the session's peer (once, whoever asks), record the steps, retry files that stayed."""
        peer = self._peers.get(session_id)
        if peer is not None:
            peer.closing = True  # before the lock: a pending negotiation must not answer
        deadline = self._deadlines.pop(session_id, None)
        if deadline is not None:
            deadline.cancel()
        async with self._lock(session_id):
            peer = self._peers.pop(session_id, None)
            steps: list[TeardownStep] = []
            frames = None
            if peer is not None:
                steps = await peer.close(reason)
                frames = peer.frame_counts()
            await _db(services.session_closed, session_id=session_id, steps=steps, frames=frames)
        if peer is not None and not self._heap_trimming:
            self._heap_trimming = True
            self._tasks.spawn(self._release_free_heap(), f"heap-trim-{session_id}")
        failed = services.failed_cleanup(steps)
        if failed is not None:
            give_up_at = time.time() + settings.SCOPE_CLEANUP_GIVE_UP_SECONDS
            self._retry_cleanup(session_id, failed.detail["files_dir"], give_up_at)
        self._session_locks.pop(session_id, None)
        await self._report()

    async def _release_free_heap(self) -> None:
        """The closed session's codec and SRTP memory is free: give its pages back (off the loop)."""
        try:
            await asyncio.to_thread(release_free_heap)
        finally:
            self._heap_trimming = False

    # --- peer.cleanup: files that could not be removed at close -------------------

    async def peer_cleanup(self, message: PeerCleanup) -> None:
        """The sweep's reminder (this worker may have restarted since the cleanup failed)."""
        self._retry_cleanup(message["session_id"], message["files_dir"], message["give_up_at"])

    def _retry_cleanup(self, session_id: str, files_dir: str, give_up_at: float) -> None:
        retry = self._cleanup_retries.get(session_id)
        if retry is None or retry.done():
            self._cleanup_retries[session_id] = asyncio.ensure_future(
                self._remove_files_with_backoff(session_id, Path(files_dir), give_up_at)
            )

    async def _remove_files_with_backoff(self, session_id: str, files_dir: Path, give_up_at: float) -> None:
        """Retry (1 s, doubling, capped at a minute) until the files go, then the session closes; give up loudly."""
        delay = 1.0
        try:
            while True:
                await asyncio.sleep(min(delay, max(0.0, give_up_at - time.time())))
                try:
                    removed = await asyncio.to_thread(remove_session_files, files_dir)
                except OSError as exc:
                    if time.time() >= give_up_at:
                        await _db(services.session_cleanup_given_up, session_id=session_id, error=str(exc))
                        return
                    logger.warning("session %s: files still not removable: %s", session_id, exc)
                    delay = min(CLEANUP_BACKOFF_CAP_SECONDS, delay * 2)
                    continue
                await _db(services.session_cleanup_done, session_id=session_id, files_removed=removed)
                return
        finally:
            self._cleanup_retries.pop(session_id, None)
