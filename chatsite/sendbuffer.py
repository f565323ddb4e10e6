"""A bound on what one WebSocket may leave unread, under daphne.

Daphne gives the ASGI app no back-pressure: the consumer's send goes
straight to autobahn, whose Twisted transport buffers whatever the client
does not read, without limit. One socket that never reads, asking again and
again for a long conversation, grew daphne by gigabytes (issue 9, item 1).
So every `websocket.send` first looks at what the transport still holds:
over CHAT_SEND_BUFFER bytes, the send waits for the client to read; still
over after CHAT_SEND_TIMEOUT seconds, the socket is closed with 4002 and
the frame dropped. Waiting, rather than closing at once, keeps a big but
legitimate replay (a long conversation to a slow phone) working: the
consumer is simply held back while the client catches up."""

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from conversations.protocol import CLOSE_TOO_SLOW

logger = logging.getLogger(__name__)

POLL = 0.05  # seconds between looks at a full buffer

Reply = Callable[[Any, Any, dict], Awaitable[None]]


def unsent_bytes(transport: Any) -> int:
    """What a Twisted TCP transport has taken but the kernel has not: its
    dataBuffer past offset, plus the writes not yet joined into it. Another
    transport (TLS served by daphne itself) counts as empty."""
    buffered = getattr(transport, "dataBuffer", b"")
    return len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


def is_open(protocol: Any) -> bool:
    return getattr(protocol, "state", None) == getattr(protocol, "STATE_OPEN", object())


def is_closing(protocol: Any) -> bool:
    """Closing or closed: past the point where autobahn will send."""
    state = getattr(protocol, "state", None)
    return state is not None and state in (
        getattr(protocol, "STATE_CLOSING", object()),
        getattr(protocol, "STATE_CLOSED", object()),
    )


async def room_to_send(protocol: Any, limit: int, seconds: float) -> bool:
    """Wait until the socket holds at most limit unsent bytes; False if it
    still holds more after that many seconds, or stopped being open."""
    try:
        async with asyncio.timeout(seconds):
            while unsent_bytes(protocol.transport) > limit:
                if not is_open(protocol):
                    return False
                await asyncio.sleep(POLL)
    except TimeoutError:
        return False
    return True


def bounded(handle_reply: Reply) -> Reply:
    """Daphne's Server.handle_reply, sending only while the socket has room."""

    async def handle_bounded_reply(server: Any, protocol: Any, message: dict) -> None:
        if message.get("type") == "websocket.send" and is_closing(protocol):
            # Autobahn raises on a send once the close handshake has begun;
            # raised into the consumer, that killed it before disconnect()
            # and left its groups in the channel layer for a day. The frame
            # could not arrive anyway.
            return
        if message.get("type") == "websocket.send" and is_open(protocol):
            limit, timeout = settings.CHAT_SEND_BUFFER, settings.CHAT_SEND_TIMEOUT
            if not await room_to_send(protocol, limit, timeout):
                if is_open(protocol):
                    logger.warning(
                        "closing %r: %d bytes unread for %s s",
                        protocol,
                        unsent_bytes(protocol.transport),
                        timeout,
                    )
                    # The close frame waits behind the backlog; autobahn drops
                    # the connection, backlog and all, if no answer comes.
                    protocol.sendClose(code=CLOSE_TOO_SLOW)
                return
        await handle_reply(server, protocol, message)

    handle_bounded_reply.bounded = True  # type: ignore[attr-defined]
    return handle_bounded_reply


def bound_send_buffers() -> None:
    """Install the bound on daphne's server, once; a no-op elsewhere."""
    # Daphne has imported its server before it loads us; importing it here
    # would only load daphne into processes that do not serve with it.
    server = sys.modules.get("daphne.server")
    if server is None:  # not under daphne (tests, manage.py)
        return
    if not getattr(server.Server.handle_reply, "bounded", False):
        server.Server.handle_reply = bounded(server.Server.handle_reply)
