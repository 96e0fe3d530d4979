"""Admin pages: runs, uploaded models, the live runner fleet and its settings."""

from datetime import UTC

from django.conf import settings
from django.contrib import admin
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import dateformat

from runner import fleet
from runner.ended import ended_runners
from runner.eviction import DEFAULT_KEEP_ALIVE_S
from runner.models import FleetSettings, ModelUpload, Run
from runner.registry import ModelSource
from webapp.admin_base import ViewOnlyModelAdmin


@admin.register(Run)
class RunAdmin(ViewOnlyModelAdmin):
    """Runs, viewed only: each is the record its bill was computed from.

    Deleting a run would delete its bill with it, and billing histories
    would lose it without a trace. Runs are made by run requests.
    """

    list_display = (
        "id",
        "owner",
        "status",
        "source",
        "runner_name",
        "cold",
        "total_ms",
        "created_at",
    )
    list_filter = ("status", "source", "cold", "runner_name")
    search_fields = ("id", "owner__username")
    readonly_fields = [field.name for field in Run._meta.fields]

    @admin.display(description="Total (ms)", ordering="total_us")
    def total_ms(self, run):
        return None if run.total_us is None else f"{run.total_us / 1000:.1f}"

    def get_urls(self):
        fleet_view = self.admin_site.admin_view(self.fleet_view)
        return [path("fleet/", fleet_view, name="runner_fleet"), *super().get_urls()]

    def fleet_view(self, request):
        # A name that ended and is live again, as a new process or as the
        # same one resumed, would appear twice among the runners, so its end
        # is listed apart.
        ended = ended_runners()
        runners = _with_upload_owners([state.data for state in fleet.live_runners()])
        for runner in runners:
            runner["eviction_text"] = describe_eviction(
                runner.get("eviction_policy", ""), runner.get("keep_alive_s")
            )
        fleet_settings = FleetSettings.current()
        context = {
            **self.admin_site.each_context(request),
            "title": "Runner fleet",
            "runners": runners,
            "dead": fleet.dead_runner_names(),
            "ended": [
                entry
                for entry in ended
                if not entry["live_again"] and not entry["resumed"]
            ],
            "restarted": [entry for entry in ended if entry["live_again"]],
            "resumed": [entry for entry in ended if entry["resumed"]],
            "heartbeat_s": settings.GLASSBOX["RUNNER_HEARTBEAT_S"],
            "dead_after_s": settings.GLASSBOX["RUNNER_DEAD_AFTER_S"],
            "fleet_settings": fleet_settings,
            "fleet_eviction_text": describe_eviction(
                fleet_settings.eviction_policy,
                fleet_settings.keep_alive_s or DEFAULT_KEEP_ALIVE_S,
            ),
        }
        return TemplateResponse(request, "admin/runner_fleet.html", context)


@admin.register(FleetSettings)
class FleetSettingsAdmin(admin.ModelAdmin):
    """One row of settings: the list opens it, and it cannot be deleted."""

    fields = ("memory_budget_mb", "eviction_policy", "keep_alive_s", "updated_at_utc")
    readonly_fields = ("updated_at_utc",)

    @admin.display(description="Updated at (UTC)")
    def updated_at_utc(self, fleet_settings):
        if fleet_settings.updated_at is None:
            return self.get_empty_value_display()
        updated = fleet_settings.updated_at.astimezone(UTC)
        return f"{dateformat.format(updated, 'Y-m-d H:i:s')} UTC"

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        # A PositiveIntegerField's form field allows 0, which the model's
        # validator rejects: state the model's minimum of 1 instead.
        if db_field.name in ("memory_budget_mb", "keep_alive_s"):
            kwargs["min_value"] = 1
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    def has_add_permission(self, request):
        return not FleetSettings.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        FleetSettings.objects.get_or_create(pk=FleetSettings.ROW_ID)
        url = reverse("admin:runner_fleetsettings_change", args=[FleetSettings.ROW_ID])
        return HttpResponseRedirect(url)


@admin.register(ModelUpload)
class ModelUploadAdmin(ViewOnlyModelAdmin):
    """Uploaded weights, viewed only.

    Uploads are made through the API, which checks the weights first. Its
    owner deletes one with DELETE /api/models/<id>, which refuses while an
    unfinished run uses it. A row renamed here would point runs at other
    weights than they were checked under.
    """

    list_display = ("model_id", "owner", "task", "size_bytes", "created_at")
    search_fields = ("model_id", "owner__username")


def describe_eviction(policy: str, keep_alive_s: float | None) -> str:
    """Describe an eviction policy and its keep-alive in the settings form's words.

    The fleet settings line and each runner's row use it, so both read the
    same. ``keep_alive_s`` is shown only for the policies that use it.
    """
    labels = dict(FleetSettings.Policy.choices)
    label = labels.get(policy)
    if label is None:
        return policy or "unknown"
    text = label[0].lower() + label[1:]
    if policy in ("ttl", "histogram") and keep_alive_s:
        text += f"; keep-alive {keep_alive_s:g} s"
    return text


def _with_upload_owners(runners: list[dict]) -> list[dict]:
    """Name the owner of each loaded upload, since two users' uploads may share an id.

    A heartbeat names an upload by its model id and its cache key, whose
    path is the file's path under the upload directory.
    """
    loaded: dict[str, list[dict]] = {}
    for runner in runners:
        for model in runner.get("models", []):
            kind, _, rest = model.get("cache_key", "").partition(":")
            if kind == "upload":
                path = rest.rpartition(":")[0]
                source = ModelSource(
                    model_id=model.get("model_id", ""),
                    kind="upload",
                    path=path,
                    pretrained=True,
                )
                loaded.setdefault(source.local_path(), []).append(model)
    owners = dict(
        ModelUpload.objects.filter(path__in=loaded).values_list(
            "path", "owner__username"
        )
    )
    for path, models in loaded.items():
        for model in models:
            owner = owners.get(path)
            model["upload_label"] = f"upload of {owner}" if owner else "deleted upload"
    return runners
