"""How many `send` and `regenerate` frames a user may make in a minute."""

from django.conf import settings
from django.core.cache import cache


async def allow_send(user_id: int) -> bool:
    key = f"chat-sends:{user_id}"
    # One counter per user per minute, shared by every process when the
    # cache is Redis.
    if await cache.aadd(key, 1, timeout=60):
        return True
    try:
        return await cache.aincr(key) <= settings.CHAT_RATE_LIMIT
    except ValueError:  # expired between add and incr
        await cache.aset(key, 1, timeout=60)
        return True
