"""conversations/layers.RedisChannelLayer: the messages buffered for a channel
whose consumer has gone are dropped once nobody has read them for the
layer's expiry (channels-redis keeps them for good, django/channels_redis
#384), and a channel that is read keeps every message."""

import asyncio
import os
import uuid

import pytest

from conversations.layers import RedisChannelLayer

REDIS_URL = os.environ.get("REDIS_URL", "")


def layer(url: str = "redis://127.0.0.1:6379/0") -> RedisChannelLayer:
    # Made, never connected, unless a test sends or receives.
    return RedisChannelLayer(
        hosts=[{"address": url, "protocol": 2}], expiry=60, prefix=f"test-{uuid.uuid4().hex}"
    )


def test_a_queue_unread_for_an_expiry_is_dropped_and_one_read_meanwhile_is_kept():
    channels = layer()
    start = channels.swept_at
    for message in ({"n": 1}, {"n": 2}):
        channels.receive_buffer["x!gone"].put_nowait(message)
        channels.receive_buffer["x!reading"].put_nowait(message)

    assert channels.sweep(now=start + 30) == 0  # not yet an expiry since the last sweep
    assert channels.sweep(now=start + 61) == 0  # first seen unread
    channels.receive_buffer["x!reading"].get_nowait()  # its consumer takes one
    assert channels.sweep(now=start + 122) == 1

    assert "x!gone" not in channels.receive_buffer
    assert channels.receive_buffer["x!reading"].get_nowait() == {"n": 2}


def test_a_queue_made_again_after_its_consumer_emptied_it_is_not_taken_for_the_old_one():
    channels = layer()
    start = channels.swept_at
    channels.receive_buffer["x!busy"].put_nowait({"n": 1})
    channels.sweep(now=start + 61)
    # Read to empty, so receive() deleted the queue; the next message made
    # a new one, whose head is a new message.
    del channels.receive_buffer["x!busy"]
    channels.receive_buffer["x!busy"].put_nowait({"n": 2})

    assert channels.sweep(now=start + 122) == 0
    assert channels.receive_buffer["x!busy"].qsize() == 1


@pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL")
async def test_a_group_message_to_a_channel_that_left_is_freed_through_redis():
    channels = layer(REDIS_URL)
    try:
        reader, gone = await channels.new_channel(), await channels.new_channel()
        for channel in (reader, gone):
            await channels.group_add("room", channel)
        await channels.group_send("room", {"type": "chat", "n": 1})
        # The reader's receive() takes the process's messages from Redis,
        # the one for the channel nobody reads among them.
        assert (await asyncio.wait_for(channels.receive(reader), 5))["n"] == 1
        assert channels.receive_buffer[gone].qsize() == 1

        for _ in range(2):  # two sweeps an expiry apart
            channels.swept_at -= channels.expiry
            await channels.group_send("room", {"type": "chat", "n": 2})
            assert (await asyncio.wait_for(channels.receive(reader), 5))["n"] == 2
        # The second sweep freed the two messages that had waited since the
        # first; only the one sent after it waits.
        assert channels.receive_buffer[gone].qsize() == 1
    finally:
        await channels.flush()
        await channels.close_pools()
