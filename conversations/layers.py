"""The channel layer, typed: channels returns None when CHANNEL_LAYERS is not
set, and every caller here needs one, so the absence is one clear error
rather than an AttributeError on None wherever it is first used."""

from channels.layers import BaseChannelLayer, get_channel_layer
from django.core.exceptions import ImproperlyConfigured


def channel_layer() -> BaseChannelLayer:
    layer = get_channel_layer()
    if layer is None:
        raise ImproperlyConfigured("No channel layer: settings.CHANNEL_LAYERS is not set.")
    return layer
