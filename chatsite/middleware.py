from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

# Our pages load nothing from elsewhere and run no inline script, so even
# if model output slipped past the sanitiser it could neither run script
# nor fetch a remote image. The admin, which shows users' text to staff, gets
# the same policy: Django 5.2's admin templates have no inline script or
# style attribute (constants travel in data- attributes of <script src>),
# and its scripts change styles through the DOM, which CSP allows.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


def content_security_policy(get_response: Callable[[HttpRequest], HttpResponse]):
    def middleware(request: HttpRequest) -> HttpResponse:
        response = get_response(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response

    return middleware
