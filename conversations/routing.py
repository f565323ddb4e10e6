from django.urls import path

from .consumers import ChatConsumer

# Channels routes ASGI apps with Django's path(); django-stubs types path()'s
# view as a Django view only.
websocket_urlpatterns = [path("ws/chat/", ChatConsumer.as_asgi())]  # type: ignore[arg-type]
