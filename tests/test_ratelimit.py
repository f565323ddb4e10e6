"""The per-user send limit: a fixed one-minute window, counted atomically
(in Redis when REDIS_URL is set, else in this process)."""

import asyncio
import uuid

import pytest

from conversations.ratelimit import WINDOW, allow_send

START = 1_700_000_040.0  # the first second of a window


@pytest.fixture
def user_id() -> int:
    # The in-process counter outlives a test: each test counts a new user.
    return uuid.uuid4().int % 2**31


@pytest.fixture(autouse=True)
def limit(settings) -> int:
    settings.CHAT_RATE_LIMIT = 3
    return 3


async def test_the_limit_passes_then_refuses_with_the_seconds_to_the_windows_end(user_id):
    passed = [(await allow_send(user_id, START + 10)).allowed for _ in range(3)]
    refused = await allow_send(user_id, START + 10.4)
    assert passed == [True] * 3
    assert (refused.allowed, refused.retry_after) == (False, 50)


async def test_retry_after_is_at_least_a_second_at_the_end_of_a_window(user_id):
    for _ in range(3):
        await allow_send(user_id, START + 59.9)
    assert (await allow_send(user_id, START + 59.9)).retry_after == 1


async def test_sends_are_allowed_again_when_the_window_ends(user_id):
    # Sending on while refused does not push the end of the window back.
    for second in range(10):
        await allow_send(user_id, START + second)
    assert not (await allow_send(user_id, START + WINDOW - 1)).allowed
    assert (await allow_send(user_id, START + WINDOW)).allowed


async def test_each_user_has_a_window_of_their_own(user_id):
    for _ in range(4):
        await allow_send(user_id, START)
    assert (await allow_send(user_id + 1, START)).allowed


async def test_a_burst_in_parallel_passes_exactly_the_limit(user_id):
    allowances = await asyncio.gather(*(allow_send(user_id, START + 5) for _ in range(40)))
    assert sum(a.allowed for a in allowances) == 3
    assert {a.retry_after for a in allowances if not a.allowed} == {55}
