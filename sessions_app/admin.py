"""Admin: records are read-only; the one write is terminating sessions, through ``services``."""

from django.contrib import admin, messages
from django.db.models import Case, IntegerField, QuerySet, Value, When
from django.http import HttpRequest
from django.utils.translation import ngettext

from . import selectors, services
from .models import CloseReason, SessionEvent, StreamSession, Worker

# Open sessions first, the ones most likely to need an operator on top.
STATE_RANK = Case(
    When(state=StreamSession.State.LIVE, then=Value(0)),
    When(state=StreamSession.State.NEGOTIATING, then=Value(1)),
    When(state=StreamSession.State.WAITING, then=Value(2)),
    When(state=StreamSession.State.CLOSING, then=Value(3)),
    default=Value(4),
    output_field=IntegerField(),
)


class StaffReadOnlyMixin:
    """Records change only through the services, never by editing rows.

    Staff see every session (as in the API and the dashboard), whatever their
    Django model permissions.
    """

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return request.user.is_active and request.user.is_staff

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class SessionEventInline(StaffReadOnlyMixin, admin.TabularInline):
    model = SessionEvent
    fields = ("kind", "at", "detail")
    readonly_fields = fields
    ordering = ("at", "id")
    extra = 0
    can_delete = False


@admin.register(StreamSession)
class StreamSessionAdmin(StaffReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "owner",
        "state",
        "close_reason",
        "pipeline",
        "worker",
        "created_at",
        "live_at",
        "closed_at",
        "frames_in",
        "frames_out",
    )
    list_filter = ("state", "close_reason")
    list_select_related = ("owner", "worker")
    ordering = (STATE_RANK.asc(), "-created_at")
    inlines = [SessionEventInline]
    actions = ["terminate_sessions"]

    def has_terminate_permission(self, request: HttpRequest) -> bool:
        return request.user.is_active and request.user.is_staff

    @admin.action(description="Terminate selected sessions", permissions=["terminate"])
    def terminate_sessions(self, request: HttpRequest, queryset: QuerySet[StreamSession]) -> None:
        by = f"admin:{request.user.username}"
        selected = list(queryset.values_list("pk", flat=True))
        ended = sum(
            services.session_close(session_id=str(pk), reason=CloseReason.SESSION_TERMINATED, by=by)
            for pk in selected
        )
        skipped = len(selected) - ended
        self.message_user(
            request,
            ngettext("Ended %(count)d session.", "Ended %(count)d sessions.", ended) % {"count": ended},
            messages.SUCCESS if ended else messages.WARNING,
        )
        if skipped:
            self.message_user(
                request,
                ngettext(
                    "%(count)d session was already closing or closed.",
                    "%(count)d sessions were already closing or closed.",
                    skipped,
                )
                % {"count": skipped},
                messages.INFO,
            )


@admin.register(Worker)
class WorkerAdmin(StaffReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "host",
        "pid",
        "device",
        "capacity",
        "slots_used",
        "peer_count",
        "state",
        "heartbeat_at",
    )
    list_filter = ("state", "device")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Worker]:
        return selectors.workers_with_load()

    @admin.display(description="slots used", ordering="slots_used")
    def slots_used(self, worker: Worker) -> int:
        return worker.slots_used
