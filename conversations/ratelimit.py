"""How many `send` and `regenerate` frames a user may make in a minute (and
how many accounts an IP address may create in an hour): a fixed window,
counted by one atomic increment, in Redis when the cache is Redis (so every
process shares it), else in this process."""

import math
import threading
import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache

WINDOW = 60  # seconds
_local_lock = threading.Lock()


@dataclass(frozen=True)
class Allowance:
    allowed: bool
    retry_after: int  # whole seconds (>= 1) until the window ends; 0 if allowed


async def allow_send(user_id: int, now: float | None = None) -> Allowance:
    """Counts one send for the user in the current window."""
    now = time.time() if now is None else now
    window_start = math.floor(now / WINDOW) * WINDOW
    count = await sync_to_async(_count, thread_sensitive=False)(f"rl:{user_id}:{window_start}")
    if count <= settings.CHAT_RATE_LIMIT:
        return Allowance(True, 0)
    return Allowance(False, max(1, math.ceil(window_start + WINDOW - now)))


def _count(key: str, window: int = WINDOW) -> int:
    """The key's count after one more. The key names its window, so its
    expiry only clears it away: it is set once, never renewed."""
    cache = caches["default"]
    if isinstance(cache, RedisCache):
        key = cache.make_and_validate_key(key)
        client = cache._cache.get_client(key, write=True)
        pipe = client.pipeline(transaction=False)  # one round trip
        pipe.incr(key)
        pipe.expire(key, 2 * window, nx=True)
        count, _ = pipe.execute()
        return count
    # add() then incr() are two steps; the lock makes them one for every
    # thread of this process, whatever the cache backend.
    with _local_lock:
        cache.add(key, 0, timeout=2 * window)
        return cache.incr(key)


SIGNUP_WINDOW = 3600  # seconds


def allow_signup(ip_address: str, now: float | None = None) -> bool:
    """Counts one account about to be created from ip_address this hour;
    False past settings.SIGNUP_RATE_LIMIT (0: no limit)."""
    if not settings.SIGNUP_RATE_LIMIT:
        return True
    now = time.time() if now is None else now
    window_start = math.floor(now / SIGNUP_WINDOW) * SIGNUP_WINDOW
    count = _count(f"signup:{ip_address}:{window_start}", SIGNUP_WINDOW)
    return count <= settings.SIGNUP_RATE_LIMIT
