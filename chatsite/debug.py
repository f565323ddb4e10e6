"""What Django's traceback page (with DEBUG on) and its error mails may show:
Django hides settings by their name (PASSWORD, SECRET, KEY, ...), but a
password inside a URL (REDIS_URL, CACHES' LOCATION, the channel layer's
hosts, LLM_BASE_URL, DATABASE_URL in the environment) has an innocent name."""

import re
from typing import Any

from django.views.debug import SafeExceptionReporterFilter

# scheme://user:password@host -> scheme://user:********@host; the user name,
# host, port and path stay, so the page still tells which server it was.
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:@/\s]*):(?P<password>[^@/\s]+)@", re.I)


def mask_url_passwords(text: str) -> str:
    return URL_PASSWORD.sub(lambda m: f"{m['head']}:{CredentialsFilter.cleansed_substitute}@", text)


class CredentialsFilter(SafeExceptionReporterFilter):
    def cleanse_setting(self, key, value) -> Any:
        # Also reached for each item of a dict, list or tuple, and for each
        # request.META entry (the process environment, under runserver).
        cleansed = super().cleanse_setting(key, value)
        # isinstance() also says yes for a lazy string (django-axes has some),
        # which re.sub() will not take as it is.
        return mask_url_passwords(str(cleansed)) if isinstance(cleansed, str) else cleansed

    def cleanse_special_types(self, request, value) -> Any:
        # A traceback's local variables: a connection URL is often one.
        value = super().cleanse_special_types(request, value)
        if isinstance(value, str | dict | list | tuple):
            return self.cleanse_setting("", value)
        return value
