"""One billing record per finished run, written in the run's final transaction."""

from django.conf import settings
from django.db import models

from webapp.clock import redis_now


class Bill(models.Model):
    run = models.OneToOneField(
        "runner.Run", on_delete=models.CASCADE, related_name="bill"
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="bills"
    )
    # Set with the run's finished_at, on the Redis server's clock like it, so
    # that bills of runners whose clocks differ sort and group by day alike.
    created_at = models.DateTimeField(default=redis_now, db_index=True)
    # False for runs that failed because of the platform; amount is then 0.
    billed = models.BooleanField(default=True)
    # The runner components the policy read, in microseconds.
    components = models.JSONField()
    billable_us = models.BigIntegerField()
    billed_ms = models.BigIntegerField()
    rate_microcredits_per_second = models.BigIntegerField()
    minimum_ms = models.BigIntegerField()
    amount_microcredits = models.BigIntegerField()
    policy = models.CharField(max_length=100)
    formula = models.TextField()
    # True when the run's price cap (Run.max_price_microcredits) lowered
    # amount_microcredits to the cap; the formula then ends in min(..., cap).
    capped = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return f"bill for run {self.run_id}: {self.amount_microcredits} µcr"
