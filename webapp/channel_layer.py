"""Connection settings of the channel layer that carries live run events."""

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def channel_layer_host(url: str) -> dict:
    """Return channels_redis' host entry for the Redis server at ``url``.

    After a Redis restart, the layer's idle pub/sub connection is stale and
    the next subscribe fails on it, which refused the first websocket after
    every restart. One immediate retry reconnects first. A server that is
    really down fails the retry too.
    """
    return {"address": url, "retry": Retry(NoBackoff(), 1)}
