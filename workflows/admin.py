from django.contrib import admin

from workflows.models import Workflow, WorkflowVersion


class WorkflowVersionInline(admin.TabularInline):
    model = WorkflowVersion
    extra = 0
    fields = ("number", "digest", "created_at")
    readonly_fields = fields
    can_delete = False

    # A version is written by a save that compiled its definition; the admin
    # has no definition field, so it could only add an empty row.
    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "owner", "updated_at")
    search_fields = ("name", "slug", "owner__username")
    inlines = [WorkflowVersionInline]
    # A workflow moved to another user would take its runs' history along
    # while the runs and bills stay with their owner.
    readonly_fields = ("owner", "revision")

    # Workflows are created with their first version, in the builder or the
    # API. One created here would have no version to run.
    def has_add_permission(self, request):
        return False

    def save_model(self, request, obj, form, change):
        # An editor open in the builder saves against the revision it
        # loaded, so a rename here must move it on too.
        if form.changed_data:
            obj.revision += 1
        super().save_model(request, obj, form, change)
