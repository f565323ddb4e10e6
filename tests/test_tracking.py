"""HeldReplies: what one socket holds of each live reply."""

import pytest

from conversations.tracking import HeldReplies, Verdict


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def held(clock) -> HeldReplies:
    return HeldReplies(clock)


def test_the_first_delta_after_start_is_sent(held):
    held.started("r", "c")
    assert held.accept("r", 1, "c") == Verdict.SEND
    assert held.replies["r"].seq == 1


def test_each_next_delta_is_sent(held):
    held.started("r", "c")
    verdicts = [held.accept("r", seq, "c") for seq in (1, 2, 3)]
    assert verdicts == [Verdict.SEND] * 3


def test_a_repeated_delta_is_skipped(held):
    held.started("r", "c")
    held.accept("r", 1, "c")
    held.accept("r", 2, "c")
    assert held.accept("r", 2, "c") == Verdict.SKIP
    assert held.accept("r", 1, "c") == Verdict.SKIP
    assert held.replies["r"].seq == 2


def test_a_delta_past_the_next_is_a_gap_and_changes_nothing(held):
    held.started("r", "c")
    held.accept("r", 1, "c")
    assert held.accept("r", 3, "c") == Verdict.GAP
    assert held.replies["r"].seq == 1
    # The missing one still comes next.
    assert held.accept("r", 2, "c") == Verdict.SEND


def test_the_first_delta_of_a_reply_never_started_here_is_sent_and_held(held):
    assert held.accept("r", 5, "c") == Verdict.SEND
    assert held.accept("r", 6, "c") == Verdict.SEND
    assert held.accept("r", 6, "c") == Verdict.SKIP


def test_after_a_snapshot_its_deltas_are_skipped_and_the_next_sent(held):
    held.hold("r", 4, "c")
    assert [held.accept("r", seq, "c") for seq in (3, 4)] == [Verdict.SKIP] * 2
    assert held.accept("r", 5, "c") == Verdict.SEND
    assert held.accept("r", 7, "c") == Verdict.GAP


def test_a_start_after_a_snapshot_keeps_the_snapshots_seq(held):
    held.hold("r", 4, "c")
    held.started("r", "c")
    assert held.accept("r", 4, "c") == Verdict.SKIP
    assert held.accept("r", 5, "c") == Verdict.SEND


def test_after_end_the_reply_is_no_longer_held_or_watched(held, clock):
    held.started("r", "c")
    held.accept("r", 1, "c")
    held.release("r")
    assert "r" not in held
    held.heard("r")  # a late heartbeat does not bring it back
    assert "r" not in held
    clock.now += 60
    assert held.silent(15) == []


def test_releasing_a_conversation_releases_only_its_replies(held):
    held.started("r1", "c1")
    held.started("r2", "c1")
    held.started("r3", "c2")
    held.release_conversation("c1")
    assert list(held.replies) == ["r3"]


def test_a_reply_is_silent_only_once_the_limit_has_passed(held, clock):
    held.started("r", "c")
    clock.now += 15
    assert held.silent(15) == []
    clock.now += 0.5
    assert held.silent(15) == ["r"]


def test_a_silent_reply_is_counted_as_heard_when_reported(held, clock):
    held.started("r", "c")
    clock.now += 16
    assert held.silent(15) == ["r"]
    assert held.silent(15) == []
    clock.now += 16
    assert held.silent(15) == ["r"]


@pytest.mark.parametrize(
    "keep_alive",
    [
        pytest.param(lambda held: held.heard("r"), id="a-heartbeat"),
        pytest.param(lambda held: held.accept("r", 1, "c"), id="a-delta"),
        pytest.param(lambda held: held.hold("r", 3, "c"), id="a-snapshot"),
    ],
)
def test_a_reply_heard_from_is_not_silent(held, clock, keep_alive):
    held.started("r", "c")
    clock.now += 10
    keep_alive(held)
    clock.now += 10
    assert held.silent(15) == []


def test_a_skipped_delta_is_not_a_sign_of_life(held, clock):
    held.hold("r", 4, "c")
    clock.now += 10
    held.accept("r", 4, "c")
    clock.now += 10
    assert held.silent(15) == ["r"]


def test_a_reply_off_the_path_is_ignored_until_a_snapshot_holds_it_again(held):
    held.hold("r", 4, "c")
    held.ignore("r", "c")
    assert held.is_ignored("r") and "r" not in held
    assert held.silent(0) == []  # nobody waits for its writer here

    held.hold("r", 9, "c")

    assert not held.is_ignored("r")
    assert held.accept("r", 10, "c") == Verdict.SEND


def test_leaving_a_conversation_forgets_its_ignored_replies(held):
    held.ignore("r", "c")
    held.ignore("s", "other")

    held.release_conversation("c")

    assert not held.is_ignored("r") and held.is_ignored("s")
    held.release("s")
    assert not held.is_ignored("s")
