"""Which open sockets a sign-in still stands behind (issue 9, item 4).

The handshake checks the session cookie or the token once; a logout, a
password change or a deactivated account must also end the sockets already
open, in every process, and the next frame on one must not be served.

Two things carry the news. A per-user channel-layer group wakes every
socket of the user, in whichever process, to re-check itself. And an
"epoch" in the cache, changed before the group hears of it, lets a socket
notice a change with one cache read per frame, even if the frame races the
event: only when the epoch moved does the socket re-check (a query)."""

import uuid
from dataclasses import dataclass
from functools import partial
from importlib import import_module

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.auth.signals import user_logged_out
from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver
from django.utils.crypto import constant_time_compare

from .layers import channel_layer
from .models import ApiToken

SIGNED_OUT = {"type": "user.signed_out"}


def user_group(user_id: int) -> str:
    """The channel-layer group of every socket of one user."""
    return f"user.{user_id}"


def _epoch_key(user_id: int) -> str:
    return f"signin-epoch:{user_id}"


def _ended_key(session_key: str) -> str:
    return f"signin-ended:{session_key}"


def epoch(user_id: int) -> str | None:
    return cache.get(_epoch_key(user_id))


async def aepoch(user_id: int) -> str | None:
    # Read before every frame: not on the one thread that the database
    # work of every socket queues for (cache.aget would be).
    return await sync_to_async(epoch, thread_sensitive=False)(user_id)


def signed_out(user_id: int) -> None:
    """Some sign-in of the user ended: every socket of the user re-checks,
    in whichever process. The epoch moves first, so a frame that arrives
    before the event is checked too."""
    cache.set(_epoch_key(user_id), uuid.uuid4().hex, timeout=None)
    async_to_sync(channel_layer().group_send)(user_group(user_id), SIGNED_OUT)


@dataclass(frozen=True)
class SignIn:
    """What a socket was opened with: a session (cookie sockets) or a token.
    A socket given its user with neither (a test's scope, another
    middleware) stands as long as the user is active."""

    user_id: int
    session_key: str | None = None
    token_id: int | None = None

    def holds(self) -> bool:
        """Whether this sign-in still stands: the user active, and the token
        not revoked, or the session not logged out and made with the
        password the user has now."""
        user = get_user_model().objects.filter(pk=self.user_id, is_active=True).first()
        if user is None:
            return False
        if self.token_id is not None:
            return ApiToken.objects.active().filter(pk=self.token_id, user=user).exists()
        if self.session_key is None:
            return True
        if cache.get(_ended_key(self.session_key)):
            return False
        # load() only reads: a missing or expired session is {}.
        data = import_module(settings.SESSION_ENGINE).SessionStore(self.session_key).load()
        if data.get(SESSION_KEY) != user._meta.pk.value_to_string(user):
            return False
        # As django.contrib.auth.get_user() verifies a session, without
        # its side effects (flushing or cycling the browser's session).
        session_hash = data.get(HASH_SESSION_KEY) or ""
        hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
        return bool(session_hash) and any(constant_time_compare(session_hash, h) for h in hashes)


@receiver(user_logged_out)
def end_the_sessions_sockets(sender, request, user, **kwargs) -> None:
    if user is None or request is None or not request.session.session_key:
        return
    session_key = request.session.session_key
    # The session is flushed only after this signal: a socket that checks
    # in between must already find it ended.
    cache.set(_ended_key(session_key), True, settings.SESSION_COOKIE_AGE)
    # And a page told its socket is signed out asks the site whether it is:
    # take the session out of the store now, so the answer is already no.
    # (request.session itself is left for the other receivers, and flushed.)
    request.session.delete(session_key)
    signed_out(user.pk)


SIGN_IN_FIELDS = ("password", "is_active")


@receiver(pre_save, sender=settings.AUTH_USER_MODEL)
def remember_sign_in_fields(sender, instance, update_fields=None, **kwargs) -> None:
    if instance._state.adding or instance.pk is None:
        return
    if update_fields is not None and not set(SIGN_IN_FIELDS) & set(update_fields):
        return  # last_login on every login, say
    saved = sender.objects.filter(pk=instance.pk).values_list(*SIGN_IN_FIELDS).first()
    instance._saved_sign_in = saved


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def end_sockets_on_new_password_or_deactivation(sender, instance, created, **kwargs) -> None:
    saved = instance.__dict__.pop("_saved_sign_in", None)
    if created or saved is None:
        return
    if saved != tuple(getattr(instance, field) for field in SIGN_IN_FIELDS):
        # After the commit, so that the sockets re-check against the new row.
        transaction.on_commit(partial(signed_out, instance.pk))


@receiver(post_delete, sender=settings.AUTH_USER_MODEL)
def end_sockets_of_a_deleted_user(sender, instance, **kwargs) -> None:
    # However the user goes (the account page, the admin, a shell): every
    # socket re-checks, finds nobody, and closes. The pk is read now: the
    # instance loses it once deleted.
    transaction.on_commit(partial(signed_out, instance.pk))
