"""A check that management commands make before they touch the database."""

from django.core.management.base import CommandError
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor


def check_database() -> None:
    """Raise CommandError unless every migration has been applied.

    Without it, a command run on a new data directory stops with Django's
    traceback about a missing table.
    """
    try:
        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except DatabaseError as error:
        raise CommandError(f"cannot read the database: {error}") from None
    if pending:
        raise CommandError(
            "the database is not set up; run 'python manage.py migrate' (or "
            "'python manage.py up', which migrates) first"
        )
