"""Helpers shared by the tests, imported by name (`from tests.helpers import
...`): conftest.py holds fixtures only.

The benchmarks and tests/live.py import this module without configuring
Django, so the few helpers that need the app import it when called."""

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from channels.testing import WebsocketCommunicator
from django.test import Client

PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def self_signed_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context whose certificate, for 127.0.0.1, nobody trusts,
    and that certificate's file: made now, so that no key is ever
    committed. (cryptography comes with daphne, through autobahn.)"""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


def logged_in(user: Any) -> Client:
    """A test client with user's session, for tests that need more than one."""
    client = Client()
    client.force_login(user)
    return client


def streamed_text(frames: list[dict], field: str = "content") -> str:
    """The text the delta frames carried, in order."""
    return "".join(f.get(field, "") for f in frames if f["type"] == "delta")


async def finish_replies(timeout: float = 10.0) -> None:
    """Replies outlive their sockets by design; a test waits for them so
    none writes to the database after the test has ended."""
    from conversations import replies

    await replies.wait_all(timeout)


@asynccontextmanager
async def chat_socket(user: Any, *, ready: bool = True) -> AsyncIterator[WebsocketCommunicator]:
    """A connected WebsocketCommunicator for user, past the ready frame."""
    from conversations.consumers import ChatConsumer

    communicator = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    assert connected
    try:
        if ready:
            frame = await communicator.receive_json_from(timeout=10)
            assert frame["type"] == "ready"
            communicator.ready = frame
        yield communicator
    finally:
        await communicator.disconnect()


def site_socket(**headers: str) -> WebsocketCommunicator:
    """A handshake through the whole site (chatsite.asgi), auth and all."""
    from chatsite.asgi import application

    pairs = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return WebsocketCommunicator(application, "/ws/chat/", headers=pairs)


# A cookie socket's headers as the site's own page sends them.
SITE = {"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000"}


async def open_socket(communicator: WebsocketCommunicator) -> WebsocketCommunicator:
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from(timeout=10))["type"] == "ready"
    return communicator


async def session_socket(client: Client) -> WebsocketCommunicator:
    """A cookie socket for a test client's session, from the site's page."""
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    return await open_socket(site_socket(Cookie=cookie, **SITE))


async def token_socket(user: Any) -> WebsocketCommunicator:
    from asgiref.sync import sync_to_async

    from conversations.models import ApiToken

    _, plain = await sync_to_async(ApiToken.issue)(user, "script")
    return await open_socket(site_socket(Authorization=f"Bearer {plain}"))


async def answers(ws: WebsocketCommunicator) -> bool:
    await ws.send_json_to({"type": "ping", "id": "still"})
    return await ws.receive_json_from(timeout=5) == {"type": "pong", "id": "still"}


async def receive_until(
    communicator: WebsocketCommunicator, frame_type: str, timeout: float = 10.0
) -> list[dict]:
    """Every frame up to and including the first of frame_type."""
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await communicator.receive_json_from(timeout=timeout)
            frames.append(frame)
            if frame["type"] == frame_type:
                return frames


async def orphaned_reply(owner: Any) -> tuple[Any, Any]:
    """A conversation of owner's whose reply, "half an" of it saved at seq 3,
    is left streaming with no writer (its process died); and that reply."""
    from conversations.models import Conversation

    conversation = await Conversation.objects.acreate(owner=owner, model="fake")
    await conversation.messages.acreate(role="user", content="hi")
    reply = await conversation.messages.acreate(
        role="assistant", status="streaming", content="half an", seq=3
    )
    return conversation, reply


class TcpProxy:
    """A loopback TCP proxy to a server (Postgres, say) that a test can cut:
    every connection through it dropped and new ones refused, as when the
    server goes away; restore() lets connections through again. Only the
    test's own connections go through it."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refusing = threading.Event()
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            try:
                if self.refusing.is_set():
                    raise ConnectionRefusedError
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            self._drop(end)

    def _drop(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut(self) -> None:
        self.refusing.set()
        with self.lock:
            dropped = list(self.open)
        for sock in dropped:
            self._drop(sock)

    def restore(self) -> None:
        self.refusing.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()
