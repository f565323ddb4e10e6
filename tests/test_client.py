"""The terminal client (clients/chat.py) as a user runs it: a subprocess
talking to a real daphne process over loopback, with an API token."""

import asyncio
import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest
import websockets

from tests.fake_llm import expected_text, reasoning_for
from tests.helpers import PASSWORD
from tests.live import ROOT, Browser, Site, running_site

pytestmark = pytest.mark.slow

CLIENT = str(ROOT / "clients" / "chat.py")
TIMEOUT = 60


@pytest.fixture(scope="module")
def site(tmp_path_factory, fake_llm_server):
    # The limit is not what is tested here, and every test sends as one user.
    with running_site(
        tmp_path_factory.mktemp("client-site"),
        fake_llm_server.base_url,
        CHAT_RATE_LIMIT="10000",
    ) as site:
        site.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model; "
            f"get_user_model().objects.create_user('erin', password={PASSWORD!r})",
        )
        site.token = site.manage("create_token", "erin").strip()
        yield site


def client_env(site: Site, url: str | None = None, token: str | None = None) -> dict[str, str]:
    # The token travels in the environment, as the client recommends; no
    # proxy settings may send loopback traffic elsewhere.
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(CHATSITE_URL=url or site.ws_url(), CHATSITE_TOKEN=token or site.token)
    return env


def run_client(site: Site, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, CLIENT, *args],
        input=None if stdin is None else stdin.encode(),
        capture_output=True,
        timeout=TIMEOUT,
        env=client_env(site),
        cwd=ROOT,
    )
    # Decoded here: text mode would turn a stray "\r" into "\n" and hide it.
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


async def start_client(site: Site, *args: str, url: str | None = None, token: str | None = None):
    return await asyncio.create_subprocess_exec(
        sys.executable,
        CLIENT,
        *args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(site, url, token),
        cwd=ROOT,
    )


async def read_until(stream: asyncio.StreamReader, needle: bytes, seconds: float = 20) -> bytes:
    data = b""
    async with asyncio.timeout(seconds):
        while needle not in data:
            chunk = await stream.read(256)
            if not chunk:
                break
            data += chunk
    return data


def conversation_of(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("[conversation ")]
    assert len(lines) == 1, stderr
    return lines[0].removeprefix("[conversation ").rstrip("]")


# Where the ways to run the client are written down. (README.md is to join
# this list once its commands name the project's interpreter.)
DOCUMENTED = (CLIENT, str(ROOT / "README.md"))


def documented_commands() -> list[list[str]]:
    """Every line in DOCUMENTED that runs the client, as words, without the
    leading VAR=value assignments."""
    commands = []
    for path in DOCUMENTED:
        with open(path, encoding="utf-8") as lines:
            runs = [line for line in lines if "clients/chat.py" in line]
        for line in runs:
            words = shlex.split(line.strip().strip("`"), comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            if "clients/chat.py" in words:
                commands.append(words)
    return commands


def test_the_documented_commands_run_the_client():
    commands = documented_commands()
    assert commands
    for words in commands:
        # The interpreter as named, from the project's own directory.
        interpreter, script = words[0], words[1]
        assert script == "clients/chat.py", words
        result = subprocess.run(
            [interpreter, script, "--help"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=ROOT,
        )
        assert result.returncode == 0, (words, result.stderr)
        assert "--token" in result.stdout


def test_a_prompt_prints_the_answer_and_exits_0(site):
    result = run_client(site, "Hello there")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text("fake") + "\n"
    conversation = conversation_of(result.stderr)
    assert site.messages(conversation=conversation) == [
        ("user", "Hello there", "complete"),
        ("assistant", expected_text("fake"), "complete"),
    ]


def test_a_failed_reply_exits_1_with_the_error_code(site):
    result = run_client(site, "--model", "nope", "Hello")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "model_not_found" in result.stderr


def test_a_refused_token_exits_2(site):
    result = subprocess.run(
        [sys.executable, CLIENT, "--token", "cs_not-a-token", "Hello"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=client_env(site),
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "refused the token" in result.stderr
    assert result.stdout == ""


def test_repl_two_prompts_then_new_and_model(site, fake_llm_server):
    lines = ["First question", "Second question", "/new", "/model fake-think", "Third", "/exit"]
    result = run_client(site, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    fake, think = expected_text("fake"), expected_text("fake-think")
    # stdin is not a terminal: no prompts, only the answers on stdout, and
    # the reasoning (undimmed) on stderr.
    assert result.stdout == f"{fake}\n{fake}\n{think}\n"
    assert reasoning_for("fake-think") in result.stderr
    assert "\x1b[" not in result.stdout + result.stderr
    first, second = (line for line in result.stderr.splitlines() if line.startswith("[conv"))
    assert first != second
    roles = [role for role, *_ in site.messages(conversation=conversation_of(first))]
    assert roles == ["user", "assistant"] * 2
    last = fake_llm_server.requests[-1]
    assert last["model"] == "fake-think"
    assert last["messages"] == [{"role": "user", "content": "Third"}]


@pytest.mark.parametrize("leave", ["/exit", "/quit"])
def test_repl_exit_and_quit_leave_without_sending_anything_more(site, fake_llm_server, leave):
    result = run_client(site, stdin=f"Question\n{leave}\nNot sent\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text("fake") + "\n"
    assert [r["messages"][-1]["content"] for r in fake_llm_server.requests[-1:]] == ["Question"]


def test_repl_new_starts_without_the_last_system_prompt_unless_one_is_set(site, fake_llm_server):
    lines = ["/system Be a pirate.", "One", "/new", "Two", "/system Be brief.", "Three"]
    result = run_client(site, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert "[new conversation, system prompt cleared]" in result.stderr
    one, two, three = (request["messages"] for request in fake_llm_server.requests[-3:])
    assert one == [
        {"role": "system", "content": "Be a pirate."},
        {"role": "user", "content": "One"},
    ]
    assert two == [{"role": "user", "content": "Two"}]
    assert three == [
        {"role": "system", "content": "Be brief."},
        *two,
        {"role": "assistant", "content": expected_text("fake")},
        {"role": "user", "content": "Three"},
    ]


def test_repl_lists_models_and_ends_at_eof(site):
    result = run_client(site, stdin="/model\n")
    assert result.returncode == 0, result.stderr
    # The server's list, sorted, with the default model marked.
    assert result.stdout.splitlines() == [
        "* fake",
        "  fake-long",
        "  fake-reasoning-field",
        "  fake-slow",
        "  fake-think",
    ]


def on_a_terminal(site: Site, keys: bytes, *args: str) -> tuple[int, str, str]:
    """Run the client with a pseudo-terminal as stdin and stdout, typing
    keys; return its exit status, the screen's bytes as text, and stderr."""
    controller, terminal = pty.openpty()
    client = subprocess.Popen(
        [sys.executable, CLIENT, *args],
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=client_env(site),
        cwd=ROOT,
    )
    os.close(terminal)
    screen = b""
    try:
        os.write(controller, keys)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 0.1)[0]:
                try:
                    screen += os.read(controller, 4096)
                except OSError:  # read to the end: the client has closed the terminal
                    break
            elif client.poll() is not None:
                break
        client.wait(timeout=10)
    finally:
        if client.poll() is None:
            client.kill()
        client.wait()
        os.close(controller)
        errors = client.stderr.read().decode()
        client.stderr.close()
    return client.returncode, screen.decode(), errors


def test_on_a_terminal_it_prompts_and_dims_the_reasoning(site):
    code, text, errors = on_a_terminal(site, b"/model fake-think\nThink\n/exit\n")
    assert code == 0, errors
    assert "> " in text and "\x1b[2mr1" in text
    answer = expected_text("fake-think")
    assert f"\x1b[0m\r\n{answer}\r\n" in text  # the answer starts on a line of its own
    assert "r1" not in errors


def test_on_a_terminal_the_repl_opens_with_a_hint_and_help_lists_the_commands(site):
    code, text, errors = on_a_terminal(site, b"/help\n/exit\n")
    assert code == 0, errors
    assert errors.splitlines()[0].startswith("[") and "/help" in errors.splitlines()[0]
    for command in COMMANDS:
        assert f"\r\n{command} " in text, command


def test_piped_the_repl_gives_no_hint_and_unknown_commands_point_to_help(site):
    result = run_client(site, stdin="/what\n/help\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "[unknown command /what; /help lists the commands]\n"
    listed = [line.split("  ")[0] for line in result.stdout.splitlines()]
    assert listed == COMMANDS


COMMANDS = [
    "/model [NAME]",
    "/new",
    "/system [TEXT]",
    "/edit TEXT",
    "/versions [[q] N]",
    "/help",
    "/exit",
]
ECHO = "fake:echo=1"  # answers with the question's words: each version its own answer
VERSIONS_HINT = (
    "[/versions lists the versions; /versions N shows version N of the last reply, "
    "/versions q N version N of the last question]"
)


def test_repl_edit_asks_the_last_question_again_and_versions_switches_back(site, fake_llm_server):
    lines = [
        f"/model {ECHO}",
        "Name a colour",
        "/edit Name a fruit",
        "/versions",
        "/versions q 1",
        "/versions",
        "/versions 2",
        "Name a tree",
    ]
    result = run_client(site, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Name a colour",
        "Name a fruit",  # the edit's reply, streamed like a send's
        "last question:",
        "  version 1 of 2: Name a colour",
        "* version 2 of 2: Name a fruit",
        "last reply:",
        "* version 1 of 1: Name a fruit",
        "Name a colour",  # /versions q 1 shows that version's reply
        "last question:",
        "* version 1 of 2: Name a colour",
        "  version 2 of 2: Name a fruit",
        "last reply:",
        "* version 1 of 1: Name a colour",
        "Name a tree",
    ]
    conversation = conversation_of(result.stderr)
    assert result.stderr.splitlines() == [
        f"[model {ECHO}]",
        f"[conversation {conversation}]",
        "[question: version 2 of 2; reply: version 1 of 1]",
        VERSIONS_HINT,
        "[question: version 1 of 2; reply: version 1 of 1]",
        VERSIONS_HINT,
        "[the last reply has only 1 version]",
    ]
    # The edit was asked without the old branch; the last send followed
    # the branch switched back to.
    edited, followed = (r["messages"] for r in fake_llm_server.requests[-2:])
    assert edited == [{"role": "user", "content": "Name a fruit"}]
    assert followed == [
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Name a colour"},
        {"role": "user", "content": "Name a tree"},
    ]
    rows = site.messages("content", "superseded", conversation=conversation)
    assert rows == [
        ("Name a colour", False),
        ("Name a colour", False),
        ("Name a fruit", True),
        ("Name a fruit", True),
        ("Name a tree", False),
        ("Name a tree", False),
    ]


def test_repl_edit_and_versions_say_how_to_use_them(site):
    lines = [
        "/edit",
        "/edit Hello",
        "/versions",
        "/versions 1",
        "Hi",
        "/versions two",
        "/versions 3",
    ]
    result = run_client(site, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text("fake") + "\n"
    conversation = conversation_of(result.stderr)
    assert result.stderr.splitlines() == [
        "[/edit TEXT asks your last question again, worded as TEXT]",
        "[nothing to edit yet: ask a question first]",
        "[no versions yet: ask a question first]",
        "[there is no reply yet to pick a version of]",
        f"[conversation {conversation}]",
        VERSIONS_HINT,
        "[the last reply has only 1 version]",
    ]
    assert len(site.messages(conversation=conversation)) == 2  # nothing sent but "Hi"


def regenerated_conversation(site: Site) -> str:
    """erin's conversation with one question and two versions of its reply,
    the second shown, saved as an older site or the admin would (a replaced
    reply superseded): the client has seen none of it."""
    code = (
        "from django.contrib.auth import get_user_model; "
        "from conversations.models import Conversation; "
        "c = Conversation.objects.create(owner=get_user_model().objects.get(username='erin')); "
        "c.messages.create(role='user', content='Pick one'); "
        "c.messages.create(role='assistant', content='first answer', superseded=True); "
        "c.messages.create(role='assistant', content='second answer'); "
        "print(c.pk)"
    )
    # The last line: the shell may first say what it imported.
    return site.manage("shell", "-c", code).split()[-1]


def test_conversation_continues_with_the_versions_the_server_has(site):
    conversation = regenerated_conversation(site)
    lines = ["/versions", "/versions 1", "/versions", "/versions 3", "/versions 0"]
    result = run_client(site, "--conversation", conversation, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "last question:",
        "* version 1 of 1: Pick one",
        "last reply:",
        # Only the path comes to a client: the other version is a name.
        "  version 1 of 2: (not seen in this session)",
        "* version 2 of 2: second answer",
        "first answer",
        "last question:",
        "* version 1 of 1: Pick one",
        "last reply:",
        "* version 1 of 2: first answer",
        "  version 2 of 2: second answer",
    ]
    assert result.stderr.splitlines() == [
        VERSIONS_HINT,
        "[question: version 1 of 1; reply: version 1 of 2]",
        VERSIONS_HINT,
        "[the last reply has 2 versions: pick 1 to 2]",
        "[the last reply has 2 versions: pick 1 to 2]",
    ]
    # The switch is the conversation's: the next session finds it there.
    again = run_client(site, "--conversation", conversation, stdin="/versions\n")
    assert again.stdout.splitlines()[3:] == [
        "* version 1 of 2: first answer",
        "  version 2 of 2: (not seen in this session)",
    ]
    assert site.messages("content", "superseded", conversation=conversation) == [
        ("Pick one", False),
        ("first answer", False),
        ("second answer", True),
    ]


# What a model may write, and what of it may reach the user: the control
# characters go, and the rest of each sequence shows as plain text. The fake
# model echoes the prompt in 5-character chunks, so sequences are split.
HOSTILE_ANSWER = [
    ("A", "A"),
    ("\x1b]52;c;aGk=\x07", "]52;c;aGk="),  # OSC 52: write the clipboard
    ("\x1b]0;owned\x1b\\", "]0;owned\\"),  # the window title
    ("\x1b[2J\x1b[1;1H", "[2J[1;1H"),  # erase, move the cursor
    ("\x1b[8mhidden\x1b[0m", "[8mhidden[0m"),  # invisible text
    ("\x1b]8;;http://x/\x1b\\link\x1b]8;;\x1b\\", "]8;;http://x/\\link]8;;\\"),
    ("\x9b31mC1\x9d0;t\x9c", "31mC10;t"),  # the one-character C1 forms
    ("\r\x08\x7f\x0b\x0c\x05", ""),  # CR, backspace, DEL, VT, FF, ENQ
    ("\tkept\nnext line é ✓ 日本", "\tkept\nnext line é ✓ 日本"),
]
HOSTILE_REASONING = [("R\x1b]0;t\x07\x1b[2K", "R]0;t[2K")]


def hostile(pieces: list[tuple[str, str]], shown: bool) -> str:
    return "".join(piece[shown] for piece in pieces)


HOSTILE_PROMPT = f"<think>{hostile(HOSTILE_REASONING, False)}</think>" + hostile(
    HOSTILE_ANSWER, False
)


def test_control_characters_from_the_model_are_removed(site):
    result = run_client(site, "--model", "fake:echo=raw", HOSTILE_PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hostile(HOSTILE_ANSWER, True) + "\n"
    # Piped, the reasoning goes to stderr, which is often still the terminal.
    assert hostile(HOSTILE_REASONING, True) + "\n" in result.stderr
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", result.stderr)


def test_on_a_terminal_only_the_clients_own_dimming_is_an_escape(site):
    code, text, errors = on_a_terminal(site, b"", "--model", "fake:echo=raw", HOSTILE_PROMPT)
    assert code == 0, errors
    assert text.startswith("\x1b[2m")  # the reasoning, dimmed
    plain = text.replace("\x1b[2m", "").replace("\x1b[0m", "")
    shown = f"{hostile(HOSTILE_REASONING, True)}\n{hostile(HOSTILE_ANSWER, True)}\n"
    assert plain == shown.replace("\n", "\r\n")  # the terminal's own newline


def test_raw_keeps_the_models_text_exactly(site):
    result = run_client(site, "--raw", "--model", "fake:echo=raw", HOSTILE_PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hostile(HOSTILE_ANSWER, False) + "\n"
    assert hostile(HOSTILE_REASONING, False) + "\n" in result.stderr


def test_server_text_in_errors_is_cleaned_even_with_raw(site):
    result = run_client(site, "--raw", "--model", "nope\x1b]0;t\x07", "Hello")
    assert result.returncode == 1
    assert "model_not_found" in result.stderr
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", result.stderr)


def test_no_reasoning_hides_the_reasoning(site):
    result = run_client(site, "--model", "fake-think", "--no-reasoning", "Think")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text("fake-think") + "\n"
    for word in reasoning_for("fake-think").split():
        assert word not in result.stdout + result.stderr


def test_conversation_continues_an_existing_one(site, fake_llm_server):
    first = run_client(site, "--system", "Be brief.", "One")
    assert first.returncode == 0, first.stderr
    conversation = conversation_of(first.stderr)
    second = run_client(site, "--conversation", conversation, "Two")
    assert second.returncode == 0, second.stderr
    assert second.stdout == expected_text("fake") + "\n"
    assert "[conversation" not in second.stderr  # no new one was made
    assert fake_llm_server.requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": expected_text("fake")},
        {"role": "user", "content": "Two"},
    ]
    missing = run_client(site, "--conversation", "00000000-0000-0000-0000-000000000000", "Hi")
    assert missing.returncode == 1
    assert "not_found" in missing.stderr


async def test_ctrl_c_stops_the_reply_and_keeps_the_repl(site):
    client = await start_client(site, "--model", "fake-slow")
    try:
        client.stdin.write(b"Tell me a long story\n")
        await client.stdin.drain()
        shown = await read_until(client.stdout, b"w2 ")
        assert shown.startswith(b"w1 ")
        client.send_signal(signal.SIGINT)
        errors = await read_until(client.stderr, b"[stopped]")
        assert b"[stopped]" in errors
        client.stdin.write(b"/exit\n")
        await client.stdin.drain()
        rest, more_errors = await asyncio.wait_for(client.communicate(), TIMEOUT)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert client.returncode == 0, errors + more_errors
    conversation = conversation_of((errors + more_errors).decode())
    rows = await asyncio.to_thread(site.messages, conversation=conversation)
    (_, partial, status) = rows[-1]
    assert status == "stopped"
    assert expected_text("fake-slow").startswith(partial) and len(partial) < len(
        expected_text("fake-slow")
    )
    # What the user saw is exactly what was kept.
    assert (shown + rest).decode() == partial + "\n"


async def test_ctrl_c_at_the_prompt_exits_cleanly(site):
    client = await start_client(site)
    try:
        client.stdin.write(b"/model\n")
        await client.stdin.drain()
        await read_until(client.stdout, b"fake-think\n")
        client.send_signal(signal.SIGINT)
        _, errors = await asyncio.wait_for(client.communicate(), TIMEOUT)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert client.returncode == 0
    assert b"Traceback" not in errors


def revoke_tokens(browser: Browser) -> None:
    """Revoke every token on the user's "API tokens" page, as the user would."""
    page = browser.get("/tokens/")
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    paths = re.findall(r'action="(/tokens/\d+/revoke/)"', page)
    assert paths
    for path in paths:
        data = urlencode({"csrfmiddlewaretoken": csrf}).encode()
        browser.opener.open(browser.base_url + path, data=data, timeout=10).close()


async def repl_with_one_answer(
    site: Site, username: str
) -> tuple[Browser, asyncio.subprocess.Process]:
    """A new user's REPL, its token from the user's own sign-up, once it has
    answered one prompt."""
    browser = Browser(site.url())
    await asyncio.to_thread(browser.sign_up, username)
    token = (await asyncio.to_thread(site.manage, "create_token", username)).strip()
    client = await start_client(site, token=token)
    try:
        client.stdin.write(b"Hello\n")
        await client.stdin.drain()
        answer = await read_until(client.stdout, b"\n")
    except BaseException:
        client.kill()
        await client.wait()
        raise
    assert answer.decode() == expected_text("fake") + "\n"
    return browser, client


async def test_a_revoked_token_ends_the_repl_with_2(site):
    browser, client = await repl_with_one_answer(site, "frank")
    try:
        await asyncio.to_thread(revoke_tokens, browser)
        # No more input: the socket's close alone ends the REPL.
        out, err = await asyncio.wait_for(client.communicate(), TIMEOUT)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert client.returncode == 2, err
    assert b"revoked" in err and out == b""


# A shell's change reaches the site's process only through a shared channel
# layer and cache.
@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs REDIS_URL: CI's second pass")
async def test_a_deactivated_account_ends_the_repl_with_2_without_reconnecting(site):
    _, client = await repl_with_one_answer(site, "grace")
    try:
        # save(), not update(): the site hears of the change by its signal.
        deactivate = (
            "from django.contrib.auth import get_user_model; "
            "u = get_user_model().objects.get(username='grace'); "
            "u.is_active = False; u.save()"
        )
        await asyncio.to_thread(site.manage, "shell", "-c", deactivate)
        out, err = await asyncio.wait_for(client.communicate(), TIMEOUT)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert client.returncode == 2, err
    assert b"deactivated" in err and b"reconnecting" not in err and out == b""


class Proxy:
    """A WebSocket relay in front of the site that, on its first connection,
    swallows one delta (a gap) or drops the client without a close frame (a
    network failure) when it sees the delta with the given seq."""

    def __init__(self, upstream: str, *, drop_seq: int = 0, cut_seq: int = 0):
        self.upstream, self.drop_seq, self.cut_seq = upstream, drop_seq, cut_seq
        self.connections = 0
        self.subscribes = 0

    async def __aenter__(self) -> str:
        self.server = await websockets.serve(self.relay, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws/chat/"

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def relay(self, client) -> None:
        self.connections += 1
        first = self.connections == 1
        headers = {"Authorization": client.request.headers["Authorization"]}
        async with websockets.connect(self.upstream, additional_headers=headers) as upstream:

            async def down() -> None:
                async for raw in upstream:
                    frame = json.loads(raw)
                    if first and frame["type"] == "delta":
                        if frame["seq"] == self.drop_seq:
                            continue
                        if frame["seq"] == self.cut_seq:
                            client.transport.abort()
                            return
                    await client.send(raw)

            async def up() -> None:
                async for raw in client:
                    self.subscribes += json.loads(raw)["type"] == "subscribe"
                    await upstream.send(raw)

            tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def run_through(site: Site, proxy: Proxy, model: str) -> tuple[int, str, str]:
    async with proxy as url:
        client = await start_client(site, "--model", model, "Go on", url=url)
        try:
            out, err = await asyncio.wait_for(client.communicate(), TIMEOUT)
        finally:
            if client.returncode is None:
                client.kill()
                await client.wait()
    return client.returncode, out.decode(), err.decode()


async def test_reconnects_after_a_dropped_connection_and_resumes_exactly(site):
    model = "fake:n=100,delay=0.03"
    proxy = Proxy(site.ws_url(), cut_seq=8)
    code, out, err = await run_through(site, proxy, model)
    assert code == 0, err
    assert "reconnecting" in err
    assert proxy.connections == 2 and proxy.subscribes == 1
    # No gap and no repeat: exactly the model's text.
    assert out == expected_text(model) + "\n"


async def test_a_gap_in_the_deltas_is_filled_by_resubscribing(site):
    model = "fake:n=60,delay=0.03"
    proxy = Proxy(site.ws_url(), drop_seq=5)
    code, out, err = await run_through(site, proxy, model)
    assert code == 0, err
    assert proxy.connections == 1 and proxy.subscribes == 1
    assert out == expected_text(model) + "\n"


async def versions_shown(client: asyncio.subprocess.Process, wanted: str) -> str:
    """Ask /versions until it lists wanted: another tab's frames reach the
    client in their own time."""
    shown = b""
    for _ in range(20):
        client.stdin.write(b"/versions\n")
        await client.stdin.drain()
        try:
            async with asyncio.timeout(1):
                while wanted.encode() not in shown:
                    shown += await client.stdout.read(256)
        except TimeoutError:
            continue
        break
    return shown.decode()


async def receive_until(tab, kind: str) -> list[dict]:
    frames: list[dict] = []
    async with asyncio.timeout(20):
        while not frames or frames[-1]["type"] != kind:
            frames.append(json.loads(await tab.recv()))
            assert frames[-1]["type"] != "error", frames[-1]
    return frames


async def test_another_tabs_edit_and_switch_move_the_repls_path(site):
    conversation = await asyncio.to_thread(regenerated_conversation, site)
    client = await start_client(site, "--conversation", conversation)
    headers = {"Authorization": f"Bearer {site.token}"}
    after_edit = (
        "last question:\n"
        "  version 1 of 2: Pick one\n"
        "* version 2 of 2: Pick two\n"
        "last reply:\n"
        "* version 1 of 1: Pick two\n"
    )
    after_switch = (
        "last question:\n"
        "* version 1 of 2: Pick one\n"
        "  version 2 of 2: Pick two\n"
        "last reply:\n"
        "  version 1 of 2: (not seen in this session)\n"
        "* version 2 of 2: second answer\n"
    )
    try:
        # The REPL reads its first line once it has the path: the other tab
        # acts after that.
        await versions_shown(client, "* version 2 of 2: second answer\n")
        async with websockets.connect(site.ws_url(), additional_headers=headers) as tab:
            await receive_until(tab, "ready")
            await tab.send(json.dumps({"type": "subscribe", "conversation": conversation}))
            await receive_until(tab, "conversation")
            question = json.loads(await tab.recv())["message"]
            assert question["content"] == "Pick one"
            edit = {"type": "edit", "conversation": conversation, "message": question["id"]}
            await tab.send(json.dumps({**edit, "content": "Pick two", "model": ECHO}))
            await receive_until(tab, "end")
            edited = await versions_shown(client, after_edit)
            switch = {"type": "switch", "conversation": conversation, "message": question["id"]}
            await tab.send(json.dumps(switch))
            assert "path" in (await receive_until(tab, "conversation"))[-1]
            switched = await versions_shown(client, after_switch)
        client.stdin.write(b"/exit\n")
        await client.stdin.drain()
        _, errors = await asyncio.wait_for(client.communicate(), TIMEOUT)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert after_edit in edited
    assert after_switch in switched
    assert client.returncode == 0 and b"Traceback" not in errors


def test_a_refused_edit_says_why_and_the_repl_goes_on(site):
    lines = ["Hi", "/model nope", "/edit Hello", "/model fake", "/edit Hello", "/versions"]
    result = run_client(site, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    fake = expected_text("fake")
    assert result.stdout.splitlines() == [
        fake,
        fake,
        "last question:",
        "  version 1 of 2: Hi",
        "* version 2 of 2: Hello",
        "last reply:",
        f"* version 1 of 1: {fake}",
    ]
    errors = result.stderr.splitlines()
    assert errors[2].startswith("chat: model_not_found: ") and "nope" in errors[2]
    assert errors[4:] == ["[question: version 2 of 2; reply: version 1 of 1]", VERSIONS_HINT]


async def test_ctrl_c_stops_an_edits_reply_and_keeps_what_was_shown(site):
    client = await start_client(site)
    try:
        client.stdin.write(b"Hello\n/model fake-slow\n/edit Tell me a long story\n")
        await client.stdin.drain()
        # The first answer is w1 … w12 too: the edit's starts on the next line.
        needle = (expected_text("fake") + "\nw1 w2 ").encode()
        first, _, shown = (await read_until(client.stdout, needle)).partition(b"\n")
        client.send_signal(signal.SIGINT)
        errors = await read_until(client.stderr, b"[stopped]")
        client.stdin.write(b"/exit\n")
        await client.stdin.drain()
        rest, more_errors = await asyncio.wait_for(client.communicate(), TIMEOUT)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert client.returncode == 0, errors + more_errors
    assert first.decode() == expected_text("fake")
    conversation = conversation_of((errors + more_errors).decode())
    rows = await asyncio.to_thread(site.messages, conversation=conversation)
    assert [row[:2] for row in rows[:3]] == [
        ("user", "Hello"),
        ("assistant", expected_text("fake")),
        ("user", "Tell me a long story"),
    ]
    (_, partial, status) = rows[-1]
    assert status == "stopped" and len(partial) < len(expected_text("fake-slow"))
    assert (shown + rest).decode() == partial + "\n"
