"""Who is on a socket: a session cookie (browsers, which must also send an
allowed Origin) or an `Authorization: Bearer` API token (scripts, which
have no Origin to send)."""

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import AllowedHostsOriginValidator
from django.contrib.auth.models import AnonymousUser

from .models import ApiToken


def bearer_token(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class TokenAuthMiddleware:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        plain = bearer_token(scope)
        if plain is None:  # websocket_auth sends only scopes with a token here
            raise ValueError("TokenAuthMiddleware needs an Authorization: Bearer token.")
        token = await database_sync_to_async(ApiToken.objects.authenticate)(plain)
        scope = {
            **scope,
            "user": token.user if token else AnonymousUser(),
            "api_token": token,
        }
        return await self.inner(scope, receive, send)


def websocket_auth(inner):
    by_cookie = AllowedHostsOriginValidator(AuthMiddlewareStack(inner))
    by_token = TokenAuthMiddleware(inner)

    async def application(scope, receive, send):
        handler = by_token if bearer_token(scope) else by_cookie
        return await handler(scope, receive, send)

    return application
