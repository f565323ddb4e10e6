"""bench/relay.py's short version runs on every CI pass: it must run and
every relayed reply must be whole. Its figures are printed, never checked:
times are for docs/performance.md, not for a test."""

import os
import subprocess
import sys

import pytest

from tests.live import ROOT

pytestmark = pytest.mark.slow


def test_the_relay_benchmark_runs_and_every_reply_arrives_whole(tmp_path):
    figures = tmp_path / "relay.json"
    two = bool(os.environ.get("REDIS_URL"))  # processes share replies through Redis
    command = [sys.executable, "bench/relay.py", "--quick", "--json", str(figures)]
    result = subprocess.run(
        [*command, "--processes", "2" if two else "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| server CPU per relayed token (µs) |" in result.stdout
    assert figures.exists()
