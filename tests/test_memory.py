"""chatsite/memory.py: the site's processes tune glibc's allocator, and the
environment's own tuning wins."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from chatsite import memory


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.answer = answer
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.answer


def test_two_arenas_and_big_blocks_mapped_on_their_own():
    libc = FakeLibc()
    done = memory.tune_allocator(libc, environ={})
    assert libc.calls == [(memory.M_ARENA_MAX, 2), (memory.M_MMAP_THRESHOLD, 128 * 1024)]
    assert done == {"MALLOC_ARENA_MAX": 2, "MALLOC_MMAP_THRESHOLD_": 128 * 1024}


def test_the_environments_own_tuning_wins():
    libc = FakeLibc()
    done = memory.tune_allocator(libc, environ={"MALLOC_ARENA_MAX": "8"})
    assert libc.calls == [(memory.M_MMAP_THRESHOLD, 128 * 1024)]
    assert done == {"MALLOC_MMAP_THRESHOLD_": 128 * 1024}


def test_a_value_the_allocator_refuses_is_not_reported_as_set():
    assert memory.tune_allocator(FakeLibc(answer=0), environ={}) == {}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_both_settings():
    # In a process of its own: the tuning is the whole process's.
    code = "from chatsite.memory import tune_allocator; print(tune_allocator(environ={}))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "{'MALLOC_ARENA_MAX': 2, 'MALLOC_MMAP_THRESHOLD_': 131072}"
