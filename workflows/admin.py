from django import forms
from django.contrib import admin
from django.db.models import F

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


class WorkflowAdminForm(forms.ModelForm):
    """The workflow form, rejected when the workflow changed since it was loaded.

    A rename here from a page loaded before another edit would write the
    old values of the other fields back, as a stale builder tab would.
    """

    loaded_revision = forms.IntegerField(widget=forms.HiddenInput, required=False)

    class Meta:
        model = Workflow
        fields = ("name", "slug", "description")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.fields["loaded_revision"].initial = self.instance.revision

    def clean_slug(self) -> str:
        # Django's own unique check skips the (owner, slug) constraint because
        # owner is not a form field, and would miss deleted workflows, which
        # keep their slugs. Without this check the save fails with a 500.
        slug = self.cleaned_data["slug"]
        conflicting = Workflow.all_objects.filter(
            owner_id=self.instance.owner_id, slug=slug
        ).exclude(pk=self.instance.pk)
        if conflicting.exists():
            raise forms.ValidationError(
                f"The slug '{slug}' is already used by another workflow of "
                f"{self.instance.owner}, possibly a deleted one, whose slug stays "
                "taken so that its Roboflow URL never reaches another workflow. "
                "Choose another slug."
            )
        return slug

    def clean(self):
        cleaned = super().clean()
        loaded = cleaned.get("loaded_revision")
        if self.instance.pk is None or loaded is None:
            return cleaned
        current = (
            Workflow.objects.filter(pk=self.instance.pk)
            .values_list("revision", flat=True)
            .first()
        )
        if current != loaded:
            raise forms.ValidationError(
                f"This workflow was changed elsewhere (revision {current}) since "
                f"this page was loaded (revision {loaded}); nothing was saved. "
                "Reload the page and make your change again."
            )
        return cleaned


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    form = WorkflowAdminForm
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
        # loaded, so a change here must move it on too, counted in the
        # database so that a concurrent save cannot take the same number.
        if [name for name in form.changed_data if name != "loaded_revision"]:
            obj.revision = F("revision") + 1
        super().save_model(request, obj, form, change)
        obj.refresh_from_db(fields=["revision"])
