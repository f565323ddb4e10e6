"""Who is on a socket: a session cookie (browsers, which must also send the
site's own Origin) or an `Authorization: Bearer` API token (scripts, which
have no Origin to send)."""

from urllib.parse import urlsplit

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest
from django.utils.http import is_same_domain

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


class HandshakeRequest(HttpRequest):
    """A socket's handshake as Django sees a request: its get_host() and
    scheme then follow ALLOWED_HOSTS, USE_X_FORWARDED_HOST and
    SECURE_PROXY_SSL_HEADER exactly as they do for the site's pages."""

    def __init__(self, scope) -> None:
        super().__init__()
        self.scope = scope
        for name, value in scope.get("headers", ()):
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            self.META[key] = value.decode("latin-1")
        server = scope.get("server") or ("", "")
        self.META["SERVER_NAME"], self.META["SERVER_PORT"] = str(server[0]), str(server[1])

    def _get_scheme(self) -> str:
        return "https" if self.scope.get("scheme") == "wss" else "http"


def origin_allowed(scope, origin: str) -> bool:
    """Django's CSRF origin check (CsrfViewMiddleware._origin_verified) for a
    socket: the page must come from the site's own scheme, host and port,
    or from CSRF_TRUSTED_ORIGINS (where *.example.com takes subdomains).
    Comparing host names only, as AllowedHostsOriginValidator does, let a
    page on any other port or scheme of the host open alice's socket."""
    request = HandshakeRequest(scope)
    try:
        if origin == f"{request.scheme}://{request.get_host()}":
            return True
    except DisallowedHost:
        pass
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in [o for o in trusted if "*" not in o]:
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    wildcards = [urlsplit(o) for o in trusted if "*" in o]
    return any(
        w.scheme == parsed.scheme and is_same_domain(parsed.netloc, w.netloc.lstrip("*"))
        for w in wildcards
    )


class SameOriginOnly:
    """Cookie sockets only from the site's own pages: a browser sends the
    cookie whichever page opens the socket, and the Origin says which."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        origin = next((v for n, v in scope.get("headers", ()) if n == b"origin"), None)
        if origin is None or not origin_allowed(scope, origin.decode("latin-1")):
            return await WebsocketDenier()(scope, receive, send)
        return await self.inner(scope, receive, send)


def websocket_auth(inner):
    by_cookie = SameOriginOnly(AuthMiddlewareStack(inner))
    by_token = TokenAuthMiddleware(inner)

    async def application(scope, receive, send):
        handler = by_token if bearer_token(scope) else by_cookie
        return await handler(scope, receive, send)

    return application
