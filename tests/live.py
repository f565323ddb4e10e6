"""Real servers for end-to-end tests: daphne processes serving the site, and
an HTTP client that signs up like a browser does. Loopback only."""

import asyncio
import http.cookiejar
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import PASSWORD, free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


class Site:
    """One or more daphne processes sharing a database and channel layer."""

    def __init__(self, env: dict[str, str], processes: int = 1):
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            "PYTHONFAULTHANDLER": "1",  # a crash leaves its stack in the log
        }
        self.env.pop("DATABASE_URL", None)
        self.env["REDIS_PREFIX"] = f"test-{uuid.uuid4().hex[:12]}"
        # A module's tests sign up many users from 127.0.0.1.
        self.env["SIGNUP_RATE_LIMIT"] = "0"
        self.env.update(env)
        self.count = processes
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def start(self, log_dir: Path) -> "Site":
        self.manage("migrate", "--noinput")
        self.ports = [free_port() for _ in range(self.count)]
        if self.count > 1:
            # One site on several ports: a page from any of them may open a
            # socket to any other, as behind one load balancer.
            origins = [self.env.get("CSRF_TRUSTED_ORIGINS", "")]
            origins += [f"http://127.0.0.1:{port}" for port in self.ports]
            self.env["CSRF_TRUSTED_ORIGINS"] = ",".join(filter(None, origins))
        self.logs = [log_dir / f"daphne-{index}.log" for index in range(self.count)]
        self.processes = [self._spawn(index, "w") for index in range(self.count)]
        for port, process in zip(self.ports, self.processes, strict=True):
            wait_for_port(port, process)
        return self

    def _spawn(self, index: int, log_mode: str) -> subprocess.Popen:
        port = str(self.ports[index])
        command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", port]
        command.append("chatsite.asgi:application")
        log = self.logs[index].open(log_mode)
        return subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def ws_url(self, index: int = 0) -> str:
        return f"ws://127.0.0.1:{self.ports[index]}/ws/chat/"

    def kill(self, index: int) -> None:
        self.processes[index].send_signal(signal.SIGKILL)
        self.processes[index].wait(timeout=10)

    def restart(self, index: int) -> None:
        """Start process index again, on its old port (after a kill, say);
        its log goes on in the same file."""
        if self.processes[index].poll() is None:
            raise RuntimeError(f"process {index} is still running")
        self.processes[index] = self._spawn(index, "a")
        wait_for_port(self.ports[index], self.processes[index])

    def messages(
        self,
        *columns: str,
        conversation: str | None = None,
        message: str | None = None,
    ) -> list[tuple]:
        """Columns (role, content, status unless named) of the stored
        messages, oldest first, read from the site's own database; only those
        of one conversation, or the one message, when given its id."""
        names = ", ".join(columns or ("role", "content", "status"))
        query = f"SELECT {names} FROM conversations_message"
        filters = {"conversation_id": conversation, "id": message}
        wanted = {column: key for column, key in filters.items() if key is not None}
        if wanted:
            query += " WHERE " + " AND ".join(f"{column} = %s" for column in wanted)
        query += " ORDER BY created"
        url = self.env["DATABASE_URL"]
        if url.startswith("sqlite"):
            # Django keeps a UUID as 32 hex digits in SQLite.
            keys = [uuid.UUID(key).hex for key in wanted.values()]
            with sqlite3.connect(urllib.parse.urlparse(url).path) as db:
                return db.execute(query.replace("%s", "?"), keys).fetchall()
        import psycopg

        with psycopg.connect(url) as db:
            return db.execute(query, list(wanted.values())).fetchall()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


@contextmanager
def site_database(tmp_path: Path) -> Iterator[str]:
    """A database of its own for a site under test: a fresh Postgres database
    when the run uses Postgres, else a SQLite file."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        yield f"sqlite:///{tmp_path / 'site.sqlite3'}"
        return
    import psycopg

    name = f"chatsite_live_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(url, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urllib.parse.urlparse(url)._replace(path=f"/{name}").geturl()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextmanager
def running_site(
    tmp_path: Path, llm_base_url: str, processes: int = 1, **env: str
) -> Iterator[Site]:
    """Daphne process(es) on a database of their own, talking to the model
    server at llm_base_url with `fake` as the default model."""
    with site_database(tmp_path) as database_url:
        settings = {"DATABASE_URL": database_url, "LLM_BASE_URL": llm_base_url}
        # Suggested titles off unless a test asks (as in conftest.py).
        defaults = {"DEFAULT_MODEL": "fake", "CHAT_SUGGEST_TITLES": "0"}
        site = Site({**defaults, **settings, **env}, processes).start(tmp_path)
        try:
            yield site
        finally:
            site.stop()


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, without
    persistence, that the test may kill and start again on the same port:
    nobody else uses it. Needs `redis-server` on PATH (see have_redis)."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.log = log_dir / f"redis-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.log.parent)]
        self.process = subprocess.Popen(
            command, stdout=self.log.open("a"), stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process)
        return self

    def kill(self) -> None:
        """Gone at once, as a crash is: no goodbye to its clients, and no
        data kept (groups, cache keys)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def have_redis() -> bool:
    return shutil.which("redis-server") is not None


@contextmanager
def private_redis(log_dir: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(log_dir).start()
    try:
        yield redis
    finally:
        redis.stop()


class Browser:
    """Just enough of a browser to sign up and carry the session cookie."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def get(self, path: str) -> str:
        with self.opener.open(self.base_url + path, timeout=10) as response:
            return response.read().decode()

    def post(
        self, path: str, fields: dict[str, str], form_page: str | None = None
    ) -> tuple[int, str]:
        """Submit the form of form_page (by default path itself) to path."""
        page = self.get(form_page or path)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        data = urllib.parse.urlencode({**fields, "csrfmiddlewaretoken": token.group(1)}).encode()
        with self.opener.open(self.base_url + path, data=data, timeout=10) as response:
            return response.status, response.geturl()

    def sign_up(self, username: str, password: str = PASSWORD) -> None:
        _, final_url = self.post(
            "/accounts/signup/",
            {"username": username, "password1": password, "password2": password},
        )
        assert not final_url.endswith("/accounts/signup/"), "sign-up failed"

    def log_in(self, username: str, password: str = PASSWORD) -> None:
        _, final_url = self.post("/accounts/login/", {"username": username, "password": password})
        assert not final_url.endswith("/accounts/login/"), "login failed"

    def log_out(self) -> None:
        self.post("/accounts/logout/", {}, form_page="/")

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.cookies)

    def ws_headers(self) -> dict[str, str]:
        return {"Cookie": self.cookie_header(), "Origin": self.base_url}


async def receive(ws, frame_type: str, timeout: float = 20.0, pause: float = 0) -> list[dict]:
    """Frames from a real socket up to and including the first of
    frame_type; pause between frames to play a slow reader."""
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frames.append(json.loads(await ws.recv()))
            if frames[-1]["type"] == frame_type:
                return frames
            if pause:
                await asyncio.sleep(pause)


async def connect(site: Site, index: int, browser: Browser):
    """A socket to process index, past its ready frame."""
    import websockets

    ws = await websockets.connect(
        site.ws_url(index), additional_headers=browser.ws_headers(), max_queue=None
    )
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready"
    return ws


def joined_text(frames: list[dict]) -> str:
    """The reply as a client that applies the seq rule would show it."""
    text, held = "", 0
    for frame in frames:
        if frame["type"] == "message" and frame["message"]["role"] == "assistant":
            text, held = frame["message"]["content"], frame["message"]["seq"]
        elif frame["type"] == "delta":
            assert frame["seq"] == held + 1, f"gap or repeat: held {held}, got {frame['seq']}"
            text, held = text + frame.get("content", ""), frame["seq"]
    return text


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


LONG_CONVERSATION = """
import sys
from django.contrib.auth import get_user_model
from conversations.models import Conversation, Message
owner = get_user_model().objects.get(username=sys.argv[-2])
conversation = Conversation.objects.create(owner=owner, title="long")
size = int(sys.argv[-1])
Message.objects.bulk_create(
    Message(conversation=conversation, role="user" if i % 2 == 0 else "assistant",
            content=(f"{i} " + "x" * size)[:size])
    for i in range(int(sys.argv[-3]))
)
print(conversation.pk)
"""


def long_conversation(site: Site, username: str, messages: int = 200, size: int = 2048) -> str:
    """Make a conversation of that many messages of size characters in the
    site's database; its id."""
    code = LONG_CONVERSATION.replace("sys.argv[-3]", str(messages))
    code = code.replace("sys.argv[-2]", repr(username)).replace("sys.argv[-1]", str(size))
    return site.manage("shell", "-c", code).strip().splitlines()[-1]


class RawSocket:
    """A WebSocket client on a blocking TCP socket that reads only when
    told to: the slow or hostile reader that websockets.connect (which
    always reads in the background) cannot play."""

    def __init__(self, url: str, headers: dict[str, str], receive_buffer: int = 65536):
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        uri = parse_uri(url)
        self.protocol = ClientProtocol(uri)
        self.sock = socket.socket()
        # A small receive window, so the server's backlog builds up in the
        # server rather than in this kernel's buffers.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(10)
        self.sock.connect((uri.host, uri.port))
        request = self.protocol.connect()
        for name, value in headers.items():
            request.headers[name] = value
        self.protocol.send_request(request)
        self.flush()
        response = None
        while response is None:
            self.feed(self.sock.recv(65536))
            response = next(iter(self.protocol.events_received()), None)
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def feed(self, data: bytes) -> None:
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()

    def send_json(self, frame: dict) -> None:
        self.protocol.send_text(json.dumps(frame).encode())
        self.flush()

    def drain(self, seconds: float = 30.0) -> int | None:
        """Read until the server closes the connection; its close code, or
        None when the connection dropped without a close frame."""
        deadline = time.monotonic() + seconds
        self.sock.settimeout(1)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return None
            self.feed(data)
            self.protocol.events_received()
            if self.protocol.close_rcvd is not None:
                return self.protocol.close_rcvd.code
            if not data:
                return None
        raise TimeoutError(f"the server kept the socket open for {seconds} s")

    def close(self) -> None:
        self.sock.close()


def flood(ws: RawSocket, conversation_id: str, count: int, frames: list[dict]) -> int:
    """Send count frames about the conversation, cycling through frames
    (`subscribe` ones, say), without reading; how many went out before the
    server closed the connection."""
    for sent in range(count):
        frame = {**frames[sent % len(frames)], "conversation": conversation_id, "id": str(sent)}
        try:
            ws.send_json(frame)
        except OSError:
            return sent
    return count


def user_with_token(site: Site, username: str) -> str:
    """Create a user in the site's database; a new API token of theirs."""
    site.manage(
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model; "
        f"get_user_model().objects.create_user({username!r}, password={PASSWORD!r})",
    )
    return site.manage("create_token", username).strip()


def users_with_tokens(site: Site, prefix: str, count: int) -> list[str]:
    """count users (prefix0, prefix1, ...) in one shell, not one process
    each; a new API token of each, in order."""
    code = (
        "from django.contrib.auth import get_user_model\n"
        "from conversations.models import ApiToken\n"
        f"for i in range({count}):\n"
        f"    name = f'{prefix}{{i}}'\n"
        f"    user = get_user_model().objects.create_user(name, password={PASSWORD!r})\n"
        "    print(ApiToken.issue(user, 'tests')[1])\n"
    )
    return site.manage("shell", "--no-imports", "-c", code).split()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def fake_llm_process(log: Path, *args: str) -> Iterator[str]:
    """The fake model server in its own process, so that its CPU is not the
    bench's; its base URL. Its output goes to a file: a pipe nobody reads
    would stop it once full."""
    port = free_port()
    argv = [sys.executable, str(ROOT / "tests" / "fake_llm.py"), "--port", str(port), *args]
    with log.open("w") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):  # 10 s
            if "listening" in log.read_text(errors="replace") or process.poll() is not None:
                break
            time.sleep(0.1)
        if "listening" not in log.read_text(errors="replace"):
            raise RuntimeError(f"the fake model server did not start: see {log}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
