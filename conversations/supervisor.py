"""Keeps `serve`'s child processes (the site, the bundled model) running: each
one's output goes to a log file of its own, a death is reported with its cause
and the log's last lines, and the child is restarted with a growing pause, a
bounded number of times."""

import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path

# What a signal usually means here, for the one line a person reads first.
SIGNAL_HINTS = {
    signal.SIGILL: "a CPU-specific build? Rebuild portably: see LLAMA_CMAKE_ARGS in the Makefile",
    signal.SIGKILL: "out of memory? See `dmesg`",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGBUS: "a crash in native code",
}


def describe_exit(returncode: int) -> str:
    """'exited with code 1' or 'killed by SIGILL (illegal instruction): …'."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        number = signal.Signals(-returncode)
    except ValueError:
        return f"killed by signal {-returncode}"
    text = f"killed by {number.name} ({(signal.strsignal(number) or '').lower()})"
    hint = SIGNAL_HINTS.get(number)
    return f"{text}: {hint}" if hint else text


def answers(url: str) -> bool:
    """True once something speaks HTTP at url, whatever its status."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


class Child:
    """One supervised process. `probe` is a URL that answers once it is ready;
    `ready_message` is printed each time it does."""

    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str],
        log_dir: Path,
        probe: str = "",
        ready_message: str = "",
        echo: bool = False,
        essential: bool = False,
    ):
        self.name = name
        self.command = command
        self.env = env
        self.log = log_dir / f"{name}.log"
        self.probe = probe
        self.ready_message = ready_message
        self.echo = echo  # also copy its output to our terminal
        self.essential = essential  # without it there is nothing left to serve
        self.process: subprocess.Popen | None = None
        self.ready = False
        self.started_at = 0.0
        self.restarts = 0
        self.deaths = 0
        self.restart_at: float | None = None
        self.given_up = False
        self._copier: threading.Thread | None = None

    @property
    def started(self) -> subprocess.Popen:
        """The process, for code that runs only after start() (it stays set
        after the process exits)."""
        if self.process is None:
            raise RuntimeError(f"{self.name} has not been started.")
        return self.process

    def start(self, out: Callable[[str], None]) -> None:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.ready, self.started_at, self.restart_at = False, time.monotonic(), None
        self._copier = threading.Thread(target=self._copy_output, args=(out,), daemon=True)
        self._copier.start()

    def _copy_output(self, out: Callable[[str], None]) -> None:
        # Read as bytes: a dying native library may write anything.
        stdout = self.started.stdout
        if stdout is None:  # start() always asks for a pipe
            raise RuntimeError(f"{self.name} has no output pipe.")
        with self.log.open("ab") as log:
            for line in stdout:
                log.write(line)
                log.flush()
                if self.echo:
                    out(line.decode(errors="replace").rstrip("\n"))

    def finished_output(self) -> None:
        """Waits (briefly) until the log holds everything the child wrote."""
        if self._copier:
            self._copier.join(timeout=5)

    def tail(self, lines: int = 20) -> list[str]:
        try:
            with self.log.open("rb") as log:
                last = deque(log, maxlen=lines)
        except FileNotFoundError:
            return []
        return [line.decode(errors="replace").rstrip("\n") for line in last]

    def stop(self, timeout: float = 10) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.finished_output()


class SiteDown(Exception):
    """An essential child died and used up its restarts."""


class Supervisor:
    """Restarts a child that dies up to `max_restarts` times, after pauses of
    first_delay seconds, doubling each time; a child that stayed up for `stable_after`
    seconds starts again from the first pause."""

    def __init__(
        self,
        out: Callable[[str], None],
        *,
        max_restarts: int = 5,
        first_delay: float = 1.0,
        stable_after: float = 300.0,
        tick: float = 0.25,
    ):
        self.out = out
        self.max_restarts = max_restarts
        self.first_delay = first_delay
        self.stable_after = stable_after
        self.tick = tick
        self.children: list[Child] = []
        self.stopping = False

    def start(self, child: Child) -> None:
        self.children.append(child)
        child.start(self.out)
        self.out(f"Started {child.name} (pid {child.started.pid}); its output goes to {child.log}")

    def check(self) -> None:
        """One round: report deaths, restart whoever is due, announce readiness."""
        now = time.monotonic()
        for child in self.children:
            if child.given_up:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start(self.out)
                    self.out(f"Restarted {child.name} (pid {child.started.pid}).")
                continue
            returncode = child.started.poll()
            if returncode is not None and not self.stopping:
                self._died(child, returncode, now)
            elif not child.ready and child.probe and answers(child.probe):
                child.ready = True
                if child.ready_message:
                    self.out(child.ready_message)

    def _died(self, child: Child, returncode: int, now: float) -> None:
        child.finished_output()
        child.deaths += 1
        child.ready = False
        self.out(f"{child.name} (pid {child.started.pid}) {describe_exit(returncode)}.")
        self.out(f"The last lines of {child.log}:")
        for line in child.tail():
            self.out(f"  | {line}")
        if now - child.started_at >= self.stable_after:
            child.restarts = 0
        if child.restarts >= self.max_restarts:
            child.given_up = True
            self.out(f"{child.name} died {self.max_restarts + 1} times; not restarting it again.")
            if child.essential:
                raise SiteDown(f"{child.name} {describe_exit(returncode)}; see {child.log}.")
            return
        delay = self.first_delay * 2**child.restarts
        child.restarts += 1
        child.restart_at = now + delay
        self.out(
            f"Restarting {child.name} in {delay:g} s "
            f"(restart {child.restarts} of {self.max_restarts})."
        )

    def wait_ready(self, child: Child, seconds: float) -> bool:
        """Runs rounds until child answers its probe (perhaps after a restart
        already due), dies, or time is up."""
        deaths = child.deaths
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping:
            self.check()
            if child.ready and child.restart_at is None:
                return True
            if child.deaths > deaths or child.given_up:
                return False
            self.sleep_a_round()
        return False

    def sleep_a_round(self) -> None:
        time.sleep(self.tick)

    def stop_on_signals(self) -> None:
        """SIGINT and SIGTERM end `run` (and `wait_ready`) at the next round."""

        def stop(signum, frame):
            self.stopping = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)

    def run(self) -> None:
        """Rounds until asked to stop."""
        while not self.stopping:
            self.check()
            self.sleep_a_round()

    def stop(self) -> None:
        self.stopping = True
        # The site first, so no reply starts on a model that is going away.
        for child in reversed(self.children):
            child.stop()
