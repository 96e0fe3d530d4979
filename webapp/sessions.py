"""The session store: Django's database store, with keys that PostgreSQL can match."""

from django.contrib.sessions.backends import db


class SessionStore(db.SessionStore):
    """Django's database session store that treats a key with a NUL as invalid.

    A session cookie can carry a NUL character: Django unquotes a quoted
    cookie value, so ``"\\000..."`` becomes one. Django checks only a key's
    length, and PostgreSQL rejects a query with a NUL, so every request
    with such a cookie returned 500. An invalid key starts a new session.
    """

    def _validate_session_key(self, key: str | None) -> bool:
        return super()._validate_session_key(key) and "\x00" not in key
