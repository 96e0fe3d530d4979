"""Runs, uploaded model weights and the fleet's eviction settings."""

import uuid
from pathlib import Path

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver


class Run(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    class Source(models.TextChoices):
        API = "api", "API"
        ROBOFLOW = "roboflow", "Roboflow route"
        UI = "ui", "Browser"
        CLI = "cli", "Command line"

    class Priority(models.TextChoices):
        # Sent to the first free runner, which loads the models it lacks.
        STANDARD = "standard"
        # Waits for a live runner that has the run's models loaded, even a
        # busy one, instead of loading them cold elsewhere (runner.dispatch).
        ECONOMY = "economy"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="runs"
    )
    workflow_version = models.ForeignKey(
        "workflows.WorkflowVersion",
        null=True,
        blank=True,
        # A version with runs cannot be deleted on its own, but goes with its
        # owner, whose runs are deleted too.
        on_delete=models.RESTRICT,
        related_name="runs",
    )
    # Set instead of workflow_version for an inline specification.
    inline_definition = models.JSONField(null=True, blank=True)
    definition_digest = models.CharField(max_length=64)
    token = models.ForeignKey(
        "webapp.ApiToken",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="runs",
    )
    source = models.CharField(max_length=16, choices=Source.choices)
    priority = models.CharField(
        max_length=16, choices=Priority.choices, default=Priority.STANDARD
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    parameters = models.JSONField(default=dict)
    # Per image input: list of {"format", "width", "height", "bytes"}.
    image_info = models.JSONField(default=dict)
    batch_size = models.PositiveIntegerField(default=1)
    # Models the run uses and whether each was predicted hot at submission.
    model_refs = models.JSONField(default=list)
    queue_name = models.CharField(max_length=200, blank=True)
    runner_name = models.CharField(max_length=200, blank=True, db_index=True)
    # The runner process that claimed the run (RunnerRuntime.instance). A
    # process paused past RUNNER_DEAD_AFTER_S can find a new process under
    # its name, so the name alone does not show which of the two claimed a run.
    runner_instance = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # When the run was queued, in ns since the epoch on the Redis server's
    # clock (webapp/clock.py). Queue time runs from here to the runner's
    # start, on the same clock.
    queued_at_ns = models.BigIntegerField(default=0)
    request_us = models.BigIntegerField(default=0)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    outputs = models.JSONField(null=True, blank=True)
    breakdown = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    warnings = models.JSONField(default=list)
    cold = models.BooleanField(default=False)
    total_us = models.BigIntegerField(null=True, blank=True)
    runner_total_us = models.BigIntegerField(null=True, blank=True)
    # The maximum amount the run may be billed, in micro-credits. Null means
    # no cap.
    max_price_microcredits = models.BigIntegerField(null=True, blank=True)
    # The estimate computed to check the price cap before the run was
    # stored: price, hot or cold, runner and latency. Null for runs sent
    # without a cap, which are not estimated.
    price_estimate = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return f"run {self.id} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.SUCCEEDED, self.Status.FAILED)


class ModelUpload(models.Model):
    """Weights a user uploaded; usable under ``model_id`` by that user only."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="model_uploads"
    )
    model_id = models.CharField(max_length=200)
    path = models.CharField(max_length=500)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    task = models.CharField(max_length=50)
    class_names = models.JSONField(default=list)
    # Whether the checkpoint records a training run (ultralytics' train_args).
    # Weights saved from an untrained architecture do not, and their runs
    # are labelled untrained like a YAML architecture's.
    trained = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "model_id"], name="unique_upload_model_id"
            )
        ]

    def __str__(self) -> str:
        return f"{self.owner}:{self.model_id}"


class FleetSettings(models.Model):
    """Eviction settings that every runner applies between jobs.

    One row, edited in the admin. Runners read it every heartbeat interval,
    so a change reaches the whole fleet within a few seconds, at each
    runner's next pause between jobs.
    """

    ROW_ID = 1

    class Policy(models.TextChoices):
        LRU = "lru", "Least recently used"
        LFU = "lfu", "Least frequently used"
        GDSF = "gdsf", "Greedy-dual-size-frequency"
        TTL = "ttl", "Keep-alive (TTL), then least recently used"
        HISTOGRAM = "histogram", "Per-model idle-time histogram, then LRU"

    # The largest values the admin accepts: 16 TiB of models, and a model
    # idle for 30 days, far beyond any machine or sensible keep-alive. They
    # keep the values exact in JSON and within PostgreSQL's integer.
    MAX_MEMORY_BUDGET_MB = 16 * 1024 * 1024
    MAX_KEEP_ALIVE_S = 30 * 24 * 3600

    memory_budget_mb = models.PositiveIntegerField(
        "memory budget (MiB)",
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_MEMORY_BUDGET_MB)],
        help_text="Memory every runner may fill with loaded models. Blank keeps "
        "each runner's own budget from --memory-budget-mb or "
        "RUNNER_MEMORY_BUDGET_MB. A runner over a lowered budget evicts models "
        "at once, between jobs.",
    )
    eviction_policy = models.CharField(
        max_length=16,
        choices=Policy.choices,
        default=Policy.LRU,
        help_text="Which loaded models a runner unloads. To make room: LRU "
        "unloads the model used least recently; LFU the one called fewest "
        "times since it loaded (ties go to the least recently used); GDSF "
        "the lowest clock + calls × cold-load seconds / bytes, so models slow "
        "to load or small stay longer. Keep-alive (TTL) also unloads any "
        "model idle longer than the keep-alive, between jobs, and evicts by "
        "LRU to make room. Histogram does the same with a keep-alive per "
        "model, the 99th percentile of its idle times between runs, once "
        "it has 10 of them. Compare them on real traffic with "
        "'manage.py simulate_eviction' (docs/operations.md).",
    )
    keep_alive_s = models.PositiveIntegerField(
        "keep-alive (seconds)",
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_KEEP_ALIVE_S)],
        help_text="For the keep-alive (TTL) policy: seconds a model may stay "
        "idle before its runner unloads it, between jobs. For the histogram "
        "policy: the keep-alive of a model with fewer than 10 idle times "
        "recorded. Blank means 300 s. Other policies ignore it.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "fleet settings"
        verbose_name_plural = "fleet settings"

    def __str__(self) -> str:
        return "Fleet settings"

    def save(self, *args, **kwargs) -> None:
        # Runners read row ROW_ID only. A row added while the table is empty
        # would otherwise take the database's next id and go unread.
        self.pk = self.ROW_ID
        super().save(*args, **kwargs)

    @classmethod
    def current(cls) -> "FleetSettings":
        """Return the stored settings, or the defaults when none were saved."""
        return cls.objects.filter(pk=cls.ROW_ID).first() or cls(pk=cls.ROW_ID)


class RunnerEnd(models.Model):
    """The latest end of one runner name, as the fleet page lists it.

    Redis keeps the same record (runner.fleet.record_end). The row keeps it
    through a Redis server that restarts without its data. Times are in ms
    on the Redis server's clock, as in the Redis record.
    """

    name = models.CharField(max_length=200, unique=True)
    reason = models.TextField()
    ended_at_ms = models.BigIntegerField(db_index=True)
    last_heartbeat_ms = models.BigIntegerField(null=True, blank=True)
    # The ended process's instance id (see Run.runner_instance); blank when
    # Redis had no record of it.
    instance = models.CharField(max_length=64, blank=True)

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@receiver(post_delete, sender=ModelUpload)
def remove_upload_file(sender, instance: ModelUpload, **kwargs) -> None:
    """Remove an upload's file once its row's deletion commits.

    Covers the rows deleted along with their owner, whose files were left
    on disk before.
    """
    path = Path(instance.path)
    transaction.on_commit(lambda: path.unlink(missing_ok=True))
