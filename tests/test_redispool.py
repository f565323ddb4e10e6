"""chatsite/redispool.py: every cache object Django makes for Redis, one per
thread and async context, shares the process's one connection pool."""

import threading

import pytest
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache

POOL = {"OPTIONS": {"pool_class": "chatsite.redispool.SharedConnectionPool"}}


def pool_of(cache: RedisCache):
    return cache._cache._get_connection_pool(write=True)


def test_cache_objects_of_one_server_share_a_pool_and_of_another_do_not():
    # Pools connect only when asked for a connection: no Redis needed.
    one = RedisCache("redis://127.0.0.1:6379/0", {**POOL, "KEY_PREFIX": "a"})
    two = RedisCache("redis://127.0.0.1:6379/0", {**POOL, "KEY_PREFIX": "b"})
    other = RedisCache("redis://127.0.0.1:6379/1", POOL)
    assert pool_of(one) is pool_of(two)
    assert pool_of(other) is not pool_of(one)


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL")
def test_the_sites_cache_in_every_thread_uses_one_pool():
    pools = []

    def look() -> None:
        cache = caches["default"]
        cache.set("pool-check", 1)
        pools.append(pool_of(cache))

    threads = [threading.Thread(target=look) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    look()
    assert len(pools) == 4 and all(pool is pools[0] for pool in pools)
