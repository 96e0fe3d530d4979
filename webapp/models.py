"""API tokens: named, several per user, shown once, revocable at once."""

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone

from webapp.api_keys import TOKEN_PREFIX


def hash_token(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiTokenQuerySet(models.QuerySet):
    def active(self):
        return self.filter(revoked_at__isnull=True)


class ApiToken(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    # Only the SHA-256 of the key is stored; the key itself is shown once.
    key_hash = models.CharField(max_length=64, unique=True)
    # First characters of the key, so a user can tell tokens apart.
    prefix = models.CharField(max_length=12)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(cls, user, name: str) -> tuple["ApiToken", str]:
        """Create a token; return it with the plain key, which is not stored."""
        key = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user, name=name, key_hash=hash_token(key), prefix=key[:12]
        )
        return token, key

    def revoke(self) -> None:
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])


def lock_user_row(user_id: int) -> None:
    """Lock the user's row until the current transaction ends.

    Writes that must see each other's results for one user (the queued-run
    limit, workflow slugs) take it first. SQLite ignores the lock, but its
    IMMEDIATE transactions already run one at a time.
    """
    from django.contrib.auth import get_user_model

    user_model = get_user_model()
    list(user_model.objects.select_for_update().filter(pk=user_id).values("pk"))
