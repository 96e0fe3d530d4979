from django.contrib import admin

from billing.models import Bill


@admin.register(Bill)
class BillAdmin(admin.ModelAdmin):
    list_display = (
        "run",
        "owner",
        "created_at",
        "billed",
        "billed_ms",
        "amount_microcredits",
        "policy",
    )
    list_filter = ("billed", "policy")
    search_fields = ("run__id", "owner__username")
    readonly_fields = [field.name for field in Bill._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    # A finished run has exactly one bill, so a bill is never deleted on its
    # own; deleting its owner deletes both.
    def has_delete_permission(self, request, obj=None):
        return False
