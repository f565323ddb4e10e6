"""`manage.py serve`'s supervisor, with tiny Python children in place of the
model server: a death is explained, its log kept, and the child restarted."""

import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conversations.management.commands.serve import local_url
from conversations.supervisor import Child, SiteDown, Supervisor, describe_exit
from tests.helpers import free_port
from tests.live import ROOT


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# Says something, then dies the way a native build that uses AMX does here.
CRASH_BY_SIGILL = python(
    """
    import os, signal
    print("loading the model", flush=True)
    print("the last words", flush=True)
    os.kill(os.getpid(), signal.SIGILL)
    """
)

SLEEP = python("import time; time.sleep(600)")


class Output(list):
    def __call__(self, line: str) -> None:
        self.append(line)

    def text(self) -> str:
        return "\n".join(self)


def child(tmp_path: Path, name: str, command: list[str], **kwargs) -> Child:
    return Child(name, command, env=dict(os.environ), log_dir=tmp_path, **kwargs)


@contextmanager
def supervising(out: Output, *children: Child, **kwargs) -> Iterator[Supervisor]:
    """A quick supervisor with children started, stopped on the way out."""
    supervisor = Supervisor(out, first_delay=0.01, tick=0.01, **kwargs)
    try:
        for each in children:
            supervisor.start(each)
        yield supervisor
    finally:
        supervisor.stop()


def run_until(supervisor: Supervisor, done, rounds: int = 2000) -> None:
    for _ in range(rounds):
        supervisor.check()
        if done():
            return
        supervisor.sleep_a_round()
    raise AssertionError("the supervisor never got there")


def test_exit_codes_and_signals_are_described():
    assert describe_exit(3) == "exited with code 3"
    sigill = describe_exit(-signal.SIGILL)
    assert sigill.startswith("killed by SIGILL (illegal instruction): a CPU-specific build?")
    assert describe_exit(-signal.SIGTERM) == "killed by SIGTERM (terminated)"


def test_a_child_killed_by_a_signal_is_explained_with_its_last_log_lines(tmp_path):
    out = Output()
    crashing = child(tmp_path, "model", CRASH_BY_SIGILL)
    with supervising(out, crashing, max_restarts=1) as supervisor:
        run_until(supervisor, lambda: crashing.restart_at is not None)
    text = out.text()
    pid = crashing.process.pid
    assert f"model (pid {pid}) killed by SIGILL (illegal instruction)" in text
    assert (
        f"The last lines of {tmp_path / 'model.log'}:\n  | loading the model\n  | the last words"
        in text
    )
    assert "Restarting model in 0.01 s (restart 1 of 1)." in text


def test_a_dying_child_is_restarted_with_growing_pauses_then_given_up(tmp_path):
    out = Output()
    crashing = child(tmp_path, "model", CRASH_BY_SIGILL)
    with supervising(out, crashing, max_restarts=3) as supervisor:
        run_until(supervisor, lambda: crashing.given_up)
    restarts = [line for line in out if line.startswith("Restarting model")]
    assert restarts == [
        "Restarting model in 0.01 s (restart 1 of 3).",
        "Restarting model in 0.02 s (restart 2 of 3).",
        "Restarting model in 0.04 s (restart 3 of 3).",
    ]
    assert out[-1] == "model died 4 times; not restarting it again."
    # Every run's output is kept, not only the last one's.
    assert (tmp_path / "model.log").read_text().count("the last words") == 4


def test_the_site_stays_up_while_the_model_keeps_dying(tmp_path):
    out = Output()
    site = child(tmp_path, "daphne", SLEEP, essential=True)
    model = child(tmp_path, "model", CRASH_BY_SIGILL)
    with supervising(out, site, model, max_restarts=2) as supervisor:
        first_site = site.process
        run_until(supervisor, lambda: model.given_up)
        supervisor.check()
        assert site.process is first_site and site.process.poll() is None
    assert not any(line.startswith("daphne (pid") for line in out)


def test_the_site_dying_for_good_ends_serve(tmp_path):
    site = child(tmp_path, "daphne", python("raise SystemExit(2)"), essential=True)
    with (
        supervising(Output(), site, max_restarts=1) as supervisor,
        pytest.raises(SiteDown, match="daphne exited with code 2"),
    ):
        run_until(supervisor, lambda: False)


def test_a_child_is_announced_only_once_its_probe_answers(tmp_path):
    port = free_port()
    go = tmp_path / "go"
    server = python(
        f"""
        import http.server, os, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        handler = http.server.SimpleHTTPRequestHandler
        http.server.HTTPServer(("127.0.0.1", {port}), handler).serve_forever()
        """
    )
    out = Output()
    site = child(tmp_path, "site", server, probe=local_url("0.0.0.0", port), ready_message="up")
    with supervising(out, site) as supervisor:
        for _ in range(5):
            supervisor.check()
        assert "up" not in out
        go.touch()
        assert supervisor.wait_ready(site, seconds=60)
    assert out.count("up") == 1


def test_local_url_reaches_wildcard_and_ipv6_binds():
    assert local_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/"
    assert local_url("::", 8000) == "http://[::1]:8000/"
    assert local_url("127.0.0.1", 80) == "http://127.0.0.1:80/"


def read_until(process: subprocess.Popen, needle: str, lines: list[str]) -> str:
    for line in process.stdout:
        lines.append(line)
        if needle in line:
            return line
    raise AssertionError(f"serve ended before saying {needle!r}:\n{''.join(lines)}")


@pytest.mark.slow
def test_serve_says_running_once_the_site_answers_and_restarts_a_killed_site(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("REDIS_URL", None)
    manage = [sys.executable, "manage.py"]
    subprocess.run(
        [*manage, "migrate", "--noinput"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    command = [*manage, "serve", "--port", str(port), "--log-dir", str(tmp_path)]
    serve = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        started = read_until(serve, "Started daphne (pid", lines)
        read_until(serve, f"chatsite is running at http://127.0.0.1:{port}/", lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/accounts/login/", timeout=10) as page:
            assert page.status == 200
        pid = int(started.split("(pid ")[1].split(")")[0])
        os.kill(pid, signal.SIGKILL)
        read_until(serve, f"daphne (pid {pid}) killed by SIGKILL", lines)
        read_until(serve, "Restarting daphne in 1 s (restart 1 of 5).", lines)
        read_until(serve, "chatsite is running at", lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/accounts/login/", timeout=10) as page:
            assert page.status == 200
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0, "".join(lines)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert (tmp_path / "daphne.log").exists()
