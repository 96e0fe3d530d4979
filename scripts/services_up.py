"""Exit 0 when PostgreSQL and Redis answer on 127.0.0.1, else 1."""

import os
import sys

import psycopg
import redis

database = os.environ.get(
    "TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"
)
cache = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
try:
    psycopg.connect(database, connect_timeout=3).close()
    redis.Redis.from_url(cache, socket_connect_timeout=3).ping()
except (psycopg.Error, redis.RedisError) as error:
    print(f"not available: {error}", file=sys.stderr)
    sys.exit(1)
