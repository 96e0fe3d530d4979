"""Single-statement writes for the run path, without the ORM's query building.

Each run is inserted, claimed and finished once; through the ORM those four
statements took about 0.95 ms of mostly query compilation on a 2-core
machine.  These helpers build each statement's SQL once per shape and adapt
every value with the field's own ``get_db_prep_save``, so SQLite and
PostgreSQL receive exactly what the ORM would send.
"""

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

from django.db import OperationalError, connection, models

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _column(model: type[models.Model], name: str) -> models.Field:
    return model._meta.pk if name == "pk" else model._meta.get_field(name)


@functools.cache
def _update_sql(model: type[models.Model], set_names: tuple, where_names: tuple) -> str:
    quote = connection.ops.quote_name
    assignments = ", ".join(
        f"{quote(_column(model, n).column)} = %s" for n in set_names
    )
    conditions = " AND ".join(
        f"{quote(_column(model, n).column)} = %s" for n in where_names
    )
    return f"UPDATE {quote(model._meta.db_table)} SET {assignments} WHERE {conditions}"


def update_where(model: type[models.Model], values: dict, where: dict) -> int:
    """UPDATE the rows matching every ``where`` equality; return how many."""
    sql = _update_sql(model, tuple(values), tuple(where))
    params = [
        _column(model, name).get_db_prep_save(value, connection)
        for name, value in values.items()
    ]
    params += [
        _column(model, name).get_db_prep_value(value, connection, prepared=False)
        for name, value in where.items()
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


@functools.cache
def _select_sql(model: type[models.Model], columns: tuple, where_names: tuple) -> str:
    quote = connection.ops.quote_name
    conditions = " AND ".join(
        f"{quote(_column(model, n).column)} = %s" for n in where_names
    )
    selected = ", ".join(quote(_column(model, column).column) for column in columns)
    return f"SELECT {selected} FROM {quote(model._meta.db_table)} WHERE {conditions}"


def select_row(model: type[models.Model], columns: tuple, where: dict):
    """Return ``columns`` of the first row matching ``where`` as a tuple, or None.

    Values are returned as the database driver gives them, without the
    fields' conversion (SQLite gives a boolean as 0 or 1), so use it for
    plain text, numbers and booleans read with bool().
    """
    params = [
        _column(model, name).get_db_prep_value(value, connection, prepared=False)
        for name, value in where.items()
    ]
    with connection.cursor() as cursor:
        cursor.execute(_select_sql(model, columns, tuple(where)), params)
        return cursor.fetchone()


def _insert_fields(model: type[models.Model]) -> list[models.Field]:
    return [
        field
        for field in model._meta.concrete_fields
        if not isinstance(field, models.AutoField | models.BigAutoField)
    ]


@functools.cache
def _insert_sql(model: type[models.Model]) -> str:
    quote = connection.ops.quote_name
    fields = _insert_fields(model)
    columns = ", ".join(quote(field.column) for field in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    return (
        f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders})"
    )


def insert(instance: models.Model) -> None:
    """INSERT a new instance whose primary key, if any, is set by a default.

    Fields get their ``pre_save`` value (``auto_now_add`` timestamps), as in
    ``save()``; no signals are sent, and an auto-increment id is not read back.
    """
    params = [
        field.get_db_prep_save(field.pre_save(instance, add=True), connection)
        for field in _insert_fields(type(instance))
    ]
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(type(instance)), params)
    instance._state.adding = False
    instance._state.db = connection.alias


def retry_if_disconnected(write: Callable[[], T], description: str) -> T:
    """Call ``write``, and once more on a new connection if the old one was lost.

    A runner's job thread keeps its database connection between jobs, so a
    session that the server ended meanwhile (a restart, a failover,
    ``pg_terminate_backend``) fails the next write although the server
    is reachable again. ``write`` must be safe to repeat: the run path's writes
    are conditional on the run's state, so when a first attempt committed
    before the connection broke, the second one updates no row.
    """
    used = connection.connection
    try:
        return write()
    except OperationalError as error:
        if used is None or connection.in_atomic_block or not _connection_lost(used):
            raise
        logger.warning(
            "%s: the database connection was lost (%s); retrying on a new one",
            description,
            str(error).strip(),
        )
        if connection.connection is used:
            connection.close()
        return write()


def _connection_lost(used) -> bool:
    # psycopg marks a connection that the server ended as closed. When the
    # rollback of a failed transaction fails too, Django drops the
    # connection, and may have opened another one by now.
    return used is not connection.connection or getattr(used, "closed", False)
