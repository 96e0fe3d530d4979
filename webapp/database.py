"""Name the configured database in messages, without its credentials."""

from django.conf import settings


def database_place() -> str:
    """Name the database in use, without its user or password."""
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        return f"SQLite file {database['NAME']}"
    host = database.get("HOST") or "localhost"
    port = f":{database['PORT']}" if database.get("PORT") else ""
    return f"{database['NAME']} on {host}{port}"
