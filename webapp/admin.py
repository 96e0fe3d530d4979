from django.contrib import admin

from webapp.models import ApiToken


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
    readonly_fields = ("key_hash", "prefix", "created_at", "last_used_at")
    actions = ["revoke"]

    # A key is shown once, when the Tokens page or `createtoken` issues it.
    # This form has no key, so it could only add a row that no key matches.
    def has_add_permission(self, request):
        return False

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            token.revoke()
