"""glibc's allocator, tuned for a long-lived daphne process (issue 10's soak).

A site process runs its ORM calls in a pool of threads; glibc gives each
thread that allocates an arena of its own, up to eight per core, and keeps
what a freed arena held rather than hand it back. Under the soak that made a
process's RSS climb for ten minutes while Python's own heap (tracemalloc)
grew by a few MiB. Two arenas, and blocks of 128 KiB and more (a big reply's
text, a snapshot frame) mapped on their own so that freeing them returns
them, kept RSS flat in the same run. The environment's own MALLOC_ARENA_MAX
and MALLOC_MMAP_THRESHOLD_, which glibc reads itself, win over these."""

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Mapping
from typing import Any

# mallopt's parameters, from glibc's malloc.h.
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

ARENA_MAX = 2
MMAP_THRESHOLD = 128 * 1024

TUNABLES = (
    ("MALLOC_ARENA_MAX", M_ARENA_MAX, ARENA_MAX),
    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
)


def glibc() -> Any:
    """The C library if it is glibc (musl and macOS have no mallopt of these
    parameters), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def tune_allocator(libc: Any = None, environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Set what the environment leaves unset; what was set, by its
    environment variable's name. Call it first, before threads start: glibc
    fixes an arena to each thread as it first allocates."""
    libc = libc if libc is not None else glibc()
    if libc is None:
        return {}
    done = {}
    for name, parameter, value in TUNABLES:
        if name in environ:
            continue
        # mallopt answers 1 on success, 0 for a value it refuses.
        if libc.mallopt(parameter, value) == 1:
            done[name] = value
    return done
