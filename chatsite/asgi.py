import asyncio
import os
import sys

from chatsite.memory import tune_allocator

# First: glibc ties each thread to an arena as the thread first allocates,
# and Django's set-up below already starts some.
tune_allocator()

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
# Django must be set up before anything imports models.
django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter

from chatsite.sendbuffer import bound_send_buffers
from conversations import replies
from conversations.auth import websocket_auth
from conversations.routing import websocket_urlpatterns

application = ProtocolTypeRouter(
    {
        "http": django_application,
        # types-channels wants its own pattern type, which Django's path()
        # (what channels documents for routes) is not declared to return.
        "websocket": websocket_auth(URLRouter(websocket_urlpatterns)),  # type: ignore[arg-type]
    }
)


def finish_replies_on_shutdown() -> None:
    """Under daphne, a shutdown (a deploy, Ctrl-C) would drop the running
    replies mid-sentence: have the reactor wait while each one saves its
    text as interrupted and tells its tabs, as daphne does for sockets."""
    # Daphne installs its reactor before it loads us; importing the
    # reactor here would install another one.
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return
    from twisted.internet import defer

    async def interrupt_all() -> None:
        replies.interrupt_all()
        await replies.wait_all(timeout=5)

    reactor.addSystemEventTrigger(
        "before",
        "shutdown",
        lambda: defer.Deferred.fromFuture(asyncio.ensure_future(interrupt_all())),
    )


finish_replies_on_shutdown()
bound_send_buffers()
