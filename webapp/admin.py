from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from billing.models import Bill
from runner.models import ModelUpload, Run
from webapp.models import ApiToken


class AccountAdmin(UserAdmin):
    """Django's user admin, which also deletes a user's runs and bills.

    Runs, bills, tokens and uploads have no delete permission in the admin,
    each for a reason given in its own admin class, but all go with their
    owner. Django's delete page requires that permission for
    every object the deletion cascades to, so it rejected every user who
    had a run.
    """

    def get_deleted_objects(self, objs, request):
        deleted, counts, perms_needed, protected = super().get_deleted_objects(
            objs, request
        )
        cascaded = {
            Run._meta.verbose_name,
            Bill._meta.verbose_name,
            ApiToken._meta.verbose_name,
            ModelUpload._meta.verbose_name,
        }
        return deleted, counts, perms_needed - cascaded, protected


admin.site.unregister(get_user_model())
admin.site.register(get_user_model(), AccountAdmin)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "user",
        "prefix",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    # Only the name can change. A token moved to another user would spend
    # that user's credits, and one un-revoked would work again.
    readonly_fields = (
        "user",
        "key_hash",
        "prefix",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    actions = ["revoke"]

    # A key is shown once, when the Tokens page or `createtoken` issues it.
    # This form has no key, so it could only add a row that no key matches.
    def has_add_permission(self, request):
        return False

    # Bills name the token their run was sent with; deleting it would move
    # them under "no token". Revoking stops the key and keeps that record.
    def has_delete_permission(self, request, obj=None):
        return False

    # Django offers an action without permissions to every user who may
    # view the list, so a staff user with only the view permission could
    # revoke everyone's tokens.
    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        for token in queryset:
            token.revoke()
