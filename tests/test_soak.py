"""bench/soak.py: its checks, which must catch a lost or wrong reply, and a
one-minute soak (CI's version), which fails only on one, never on a time."""

import importlib.util
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.live import ROOT


def load_soak() -> Any:
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = load_soak()
T0 = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
PROMPT = "s1p1 river stone lamp"


def row(id: str, role: str, content: str, status: str = "complete", at: float = 0, **extra):
    return {
        "id": id,
        "conversation_id": extra.pop("conversation", "C"),
        "role": role,
        "content": content,
        "reasoning": "",
        "status": status,
        "superseded": extra.pop("superseded", False),
        "created": T0 + timedelta(seconds=at),
        "error_code": "",
        "finish_reason": extra.pop("finish_reason", ""),
    }


def request(id: int, at: float, content: str, finished: bool = True, prompt: str = PROMPT):
    return {
        "id": id,
        "time": (T0 + timedelta(seconds=at)).timestamp(),
        "model": soak.MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "content": content,
        "reasoning": "",
        "events": 1,
        "finished": finished,
    }


def check(rows: list[dict], sent: list[dict], acked: dict | None = None) -> list[str]:
    shared = soak.Shared(site=None, seed=0, deadline=0.0, think=1.0)
    shared.acked.update(acked or {})
    problems, _ = soak.check_replies(shared, {"C"}, rows, sent)
    return problems


def test_a_complete_reply_with_all_the_model_sent_passes() -> None:
    rows = [row("U", "user", PROMPT), row("R", "assistant", PROMPT, at=1)]
    assert check(rows, [request(1, 1.1, PROMPT)], {"U": ("C", PROMPT)}) == []


def test_a_complete_reply_missing_the_end_of_what_the_model_sent_is_wrong() -> None:
    rows = [row("U", "user", PROMPT), row("R", "assistant", PROMPT[:-3], at=1)]
    [problem] = check(rows, [request(1, 1.1, PROMPT)])
    assert problem.startswith("reply R") and "the server wrote" in problem


def test_a_complete_reply_to_a_stream_that_never_finished_is_wrong() -> None:
    rows = [row("U", "user", PROMPT), row("R", "assistant", PROMPT[:5], at=1)]
    assert check(rows, [request(1, 1.1, PROMPT[:5], finished=False)])


def test_a_stopped_reply_may_end_short_of_what_was_sent_but_never_differ() -> None:
    user = row("U", "user", PROMPT)
    short = row("R", "assistant", PROMPT[:10], "stopped", at=1)
    assert check([user, short], [request(1, 1.1, PROMPT[:15], finished=False)]) == []
    changed = row("R", "assistant", PROMPT[:9] + "X", "stopped", at=1)
    assert check([user, changed], [request(1, 1.1, PROMPT[:15], finished=False)])


def test_a_reply_cut_at_the_length_cap_may_end_short_of_what_was_sent() -> None:
    user = row("U", "user", PROMPT)
    cut = row("R", "assistant", PROMPT[:10], at=1, finish_reason="length")
    assert check([user, cut], [request(1, 1.1, PROMPT[:15], finished=False)]) == []
    uncut = row("R", "assistant", PROMPT[:10], at=1)
    assert check([user, uncut], [request(1, 1.1, PROMPT[:15], finished=False)])


def test_each_reply_of_a_regenerated_turn_is_held_to_its_own_request() -> None:
    rows = [
        row("U", "user", PROMPT),
        row("R1", "assistant", PROMPT[:5], "stopped", at=1, superseded=True),
        row("R2", "assistant", PROMPT, at=3),
    ]
    first, second = request(1, 1.1, PROMPT[:5], finished=False), request(2, 3.1, PROMPT)
    assert check(rows, [first, second]) == []
    # The same texts the other way round: the first reply would have lost text.
    first["content"], second["content"] = second["content"], first["content"]
    assert check(rows, [first, second])


def test_a_reply_still_streaming_at_the_end_is_wrong() -> None:
    rows = [row("U", "user", PROMPT), row("R", "assistant", PROMPT, "streaming", at=1)]
    [problem] = check(rows, [request(1, 1.1, PROMPT)])
    assert problem.endswith("left streaming")


def test_a_reply_with_text_the_model_was_never_asked_for_is_wrong() -> None:
    rows = [row("U", "user", PROMPT), row("R", "assistant", "made up", "stopped", at=1)]
    assert check(rows, [])
    # Stopped before it asked: nothing to hold, and nothing held.
    empty = [row("U", "user", PROMPT), row("R", "assistant", "", "stopped", at=1)]
    assert check(empty, []) == []


def test_a_request_for_a_stored_prompt_with_no_stored_reply_is_a_lost_reply() -> None:
    [problem] = check([row("U", "user", PROMPT)], [request(1, 1.1, PROMPT)])
    assert problem == f"request 1 for {PROMPT[:30]!r} has no stored reply"


def test_an_acknowledged_message_missing_from_the_database_is_lost() -> None:
    [problem] = check([], [], {"U": ("C", PROMPT)})
    assert "acknowledged message U" in problem
    # Unless its conversation was deleted.
    assert check([], [], {"U": ("gone", PROMPT)}) == []


def test_a_client_view_unlike_the_database_is_reported_and_one_alike_is_not() -> None:
    rows = [row("U", "user", PROMPT), row("R", "assistant", PROMPT, at=1)]
    held = {
        "U": {"role": "user", "content": PROMPT, "reasoning": "", "status": "complete"},
        "R": {"role": "assistant", "content": PROMPT, "reasoning": "", "status": "complete"},
    }
    client = SimpleNamespace(index=7, view={"C": held}, resyncing=set(), watched={"C"})
    assert soak.compare_views([client], {"C"}, rows) == []
    held["R"]["content"] = PROMPT[:-1]
    [problem] = soak.compare_views([client], {"C"}, rows)
    assert problem.startswith("socket 7, conversation C, message R")
    assert soak.compare_views([client], set(), rows) == ["socket 7 shows deleted C"]


@pytest.mark.slow
def test_a_one_minute_soak_loses_and_garbles_no_reply(tmp_path: Path) -> None:
    # Two processes where the pass has Redis to join them; else one.
    processes = "2" if os.environ.get("REDIS_URL") else "1"
    argv = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "1"]
    argv += ["--sockets", "40", "--users", "8", "--processes", processes, "--seed", "1"]
    argv += ["--json", str(tmp_path / "soak.json")]
    result = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    # Only a lost or wrong reply fails the run: times and memory are printed.
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert (tmp_path / "soak.json").exists()


def a_client() -> Any:
    shared = soak.Shared(site=SimpleNamespace(ports=[1]), seed=0, deadline=0.0, think=1.0)
    return soak.Client(shared, 0, soak.User("u", "t", "big", browser=None))


def conversation_frame(request_id: str) -> dict:
    return {"type": "conversation", "conversation": {"id": "C"}, "id": request_id}


def message_frame(request_id: str | None = None, **fields) -> dict:
    message = {"id": "U", "role": "user", "content": PROMPT, "reasoning": "", "seq": 0}
    message.update(status="complete", superseded=False, **fields)
    return {"type": "message", "conversation": "C", "message": message, "id": request_id}


async def test_a_client_shows_what_its_subscribe_replays() -> None:
    client = a_client()
    await client.subscribe("C")  # no socket: the frame goes nowhere
    await client.handle(conversation_frame("sub-1"))
    await client.handle(message_frame("sub-1"))
    message = message_frame()["message"]
    assert client.view == {"C": {"U": {key: message[key] for key in soak.VIEW_KEYS}}}


async def test_a_subscribe_answered_after_the_client_left_the_conversation_is_not_shown() -> None:
    client = a_client()
    await client.subscribe("C")
    await client.leave_one()  # an unsubscribe, sent before the answer came
    await client.handle(conversation_frame("sub-1"))
    await client.handle(message_frame("sub-1"))
    assert client.view == {} and client.watched == set()


async def test_a_client_resubscribes_on_a_gap_and_skips_a_repeated_delta() -> None:
    client = a_client()
    await client.subscribe("C")
    await client.handle(conversation_frame("sub-1"))
    await client.handle({"type": "start", "conversation": "C", "message": "R", "model": "m"})
    delta = {"type": "delta", "conversation": "C", "message": "R", "content": "ab", "seq": 1}
    await client.handle(delta)
    await client.handle(delta)  # again: already held
    assert client.view["C"]["R"]["content"] == "ab"
    await client.handle({**delta, "seq": 3})  # seq 2 went missing
    assert client.view["C"]["R"]["content"] == "ab" and "C" in client.resyncing
