"""Workflow definitions, stored per user and versioned.

Editing a workflow never changes a stored version: it adds a new one, and
every run points at the version it ran. Deleting a workflow hides it and
keeps its versions, so its runs and bills keep what they ran.
"""

from django.conf import settings
from django.db import models, transaction
from django.db.models import Max
from django.utils import timezone
from django.utils.text import slugify

from webapp.models import lock_user_row
from workflows.compiler import definition_digest


class LiveWorkflowManager(models.Manager):
    """Workflows that are not deleted: what every page and route works with."""

    def get_queryset(self):
        return super().get_queryset().filter(deleted_at__isnull=True)


class Workflow(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="workflows"
    )
    name = models.CharField(max_length=200)
    # The id used in Roboflow-compatible URLs: POST /<workspace>/workflows/<slug>.
    slug = models.SlugField(max_length=200)
    description = models.TextField(blank=True)
    # Goes up by one with every saved change: name, description or a new
    # version. An editor sends the revision it loaded, so a save from a stale
    # page cannot undo a rename that created no version.
    revision = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Set when the owner deletes the workflow. The row stays, because runs
    # point at its versions, but no page or route finds it any more. Its
    # slug stays taken, so its Roboflow URL never reaches another workflow.
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = LiveWorkflowManager()
    # Deleted workflows too: for the billing history and slug uniqueness.
    all_objects = models.Manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "slug"], name="unique_workflow_slug"
            )
        ]
        ordering = ["-updated_at"]
        # Related lookups (a run's version's workflow) find deleted ones too.
        base_manager_name = "all_objects"

    def __str__(self) -> str:
        return f"{self.owner}/{self.slug}"

    def latest_version(self) -> "WorkflowVersion":
        return self.versions.order_by("-number").first()

    @classmethod
    def create_with_version(
        cls, owner, name: str, definition: dict, slug: str | None = None
    ) -> "Workflow":
        with transaction.atomic():
            # Locking the owner's row orders the owner's concurrent creates,
            # so each one finds the slugs the previous ones committed.
            lock_user_row(owner.pk)
            workflow = cls.objects.create(
                owner=owner, name=name, slug=slug or cls.unique_slug(owner, name)
            )
            workflow.add_version(definition)
        return workflow

    @classmethod
    def unique_slug(cls, owner, name: str) -> str:
        base = slugify(name)[:180] or "workflow"
        slug, counter = base, 2
        while cls.all_objects.filter(owner=owner, slug=slug).exists():
            slug = f"{base}-{counter}"
            counter += 1
        return slug

    def mark_deleted(self) -> bool:
        """Mark the workflow deleted, keeping its rows. Return whether it was live.

        The row is locked FOR UPDATE first, so the delete waits for the runs
        being stored, which hold the row FOR KEY SHARE
        (``dispatch.lock_live_workflow``). A plain UPDATE of a column that
        is no key would not wait for them.
        """
        with transaction.atomic():
            live = Workflow.objects.filter(pk=self.pk)
            if not list(live.select_for_update().values_list("pk", flat=True)):
                return False
            return bool(live.update(deleted_at=timezone.now()))

    def add_version(self, definition: dict) -> "WorkflowVersion":
        """Store ``definition`` as the next version (callers compile it first)."""
        with transaction.atomic():
            # The workflow's row lock orders concurrent edits. The highest
            # number is read after the lock, in a statement of its own, so
            # under PostgreSQL's READ COMMITTED it reads the version that the
            # previous holder of the lock committed.
            (revision,) = (
                Workflow.objects.select_for_update()
                .filter(pk=self.pk)
                .values_list("revision", flat=True)
            )
            last = self.versions.aggregate(Max("number"))["number__max"] or 0
            version = WorkflowVersion.objects.create(
                workflow=self,
                number=last + 1,
                definition=definition,
                digest=definition_digest(definition),
            )
            # The first version is part of creating the workflow.
            self.revision = revision + 1 if last else revision
            self.save(update_fields=["revision", "updated_at"])
        return version


class WorkflowVersion(models.Model):
    workflow = models.ForeignKey(
        Workflow, on_delete=models.CASCADE, related_name="versions"
    )
    number = models.PositiveIntegerField()
    definition = models.JSONField()
    # SHA-256 of the canonical definition; the runners' plan cache key.
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["workflow", "number"], name="unique_workflow_version"
            )
        ]
        ordering = ["-number"]

    def __str__(self) -> str:
        return f"{self.workflow} v{self.number}"
