"""One Redis connection pool per process for Django's Redis cache.

Django keeps a cache object per thread and per async context (its caches
are asgiref Locals), and each RedisCache object makes its own connection
pool. Under ASGI every socket's task, every reply's writer and every
sync_to_async call has a context of its own: each made a new pool and
opened a new connection to Redis, and the soak counted a hundred and more
pools alive in one process. With this as the cache's `pool_class`, all of
them share one pool (per URL and options): the cache objects stay per
context, as Django makes them, with their key prefixes."""

import threading
from typing import Any

import redis

_shared: dict[str, "SharedConnectionPool"] = {}
_shared_lock = threading.Lock()


class SharedConnectionPool(redis.ConnectionPool):
    @classmethod
    def from_url(cls, url: str, **options: Any) -> "SharedConnectionPool":
        # repr: the options are plain values (numbers, strings, classes),
        # and the same settings give the same text.
        key = repr((url, sorted(options.items())))
        with _shared_lock:
            pool = _shared.get(key)
            if pool is None:
                pool = _shared[key] = super().from_url(url, **options)
            return pool
