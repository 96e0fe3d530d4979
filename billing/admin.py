from django.contrib import admin

from billing.models import Bill
from webapp.admin_base import ViewOnlyModelAdmin


@admin.register(Bill)
class BillAdmin(ViewOnlyModelAdmin):
    """Bills, viewed only: each is written with its run and follows from it.

    A finished run has exactly one bill, so a bill is never deleted on its
    own; deleting its owner deletes both.
    """

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
