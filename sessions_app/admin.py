"""Admin: records are read-only; the writes are terminating sessions (through ``services``) and webhooks.

Webhook endpoints are ordinary editable records (Django's model permissions);
their deliveries are a read-only log whose one write is retrying failed ones.
"""

from django import forms
from django.contrib import admin, messages
from django.db.models import Case, IntegerField, QuerySet, Value, When
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import ngettext

from . import selectors, services, webhooks
from .models import CloseReason, SessionEvent, StreamSession, WebhookDelivery, WebhookEndpoint, WebhookEvent, Worker

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


class WebhookEndpointForm(forms.ModelForm):
    url = forms.URLField(max_length=500, assume_scheme="https", help_text="http or https; it gets a signed POST per event.")
    events = forms.MultipleChoiceField(
        choices=WebhookEvent.choices, widget=forms.CheckboxSelectMultiple, help_text="The events this endpoint gets."
    )

    class Meta:
        model = WebhookEndpoint
        fields = ("url", "description", "events", "active", "secret")


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    form = WebhookEndpointForm
    list_display = ("url", "description", "events", "active", "created_at")
    list_filter = ("active",)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(StaffReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "id", "event", "endpoint", "status", "attempts", "last_status_code", "last_error", "created_at", "delivered_at"
    )
    list_filter = ("status", "event", "endpoint")
    list_select_related = ("endpoint",)
    fields = (
        "endpoint", "event", "status", "attempts", "last_status_code", "last_error", "created_at", "delivered_at",
        "next_attempt_at", "payload",
    )
    readonly_fields = fields
    actions = ["retry_deliveries"]

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.is_active and request.user.is_staff

    @admin.action(description="Retry selected failed deliveries", permissions=["retry"])
    def retry_deliveries(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        failed = list(queryset.filter(status=WebhookDelivery.Status.FAILED).values_list("pk", flat=True))
        WebhookDelivery.objects.filter(pk__in=failed, status=WebhookDelivery.Status.FAILED).update(
            status=WebhookDelivery.Status.PENDING, attempts=0, next_attempt_at=timezone.now()
        )
        for pk in failed:
            webhooks.dispatcher.submit(pk)
        self.message_user(
            request,
            ngettext("Retrying %(count)d delivery.", "Retrying %(count)d deliveries.", len(failed)) % {"count": len(failed)},
            messages.SUCCESS if failed else messages.WARNING,
        )
