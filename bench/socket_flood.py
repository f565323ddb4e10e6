"""Memory under a `subscribe` flood (issue 9, item 1): a real daphne, one
long conversation, and one socket that never reads sending thousands of
`subscribe` frames for it. Prints daphne's RSS before, at its peak during
the flood, and after the socket is gone, and how the socket ended.
Loopback only; every loop is bounded.

    .venv/bin/python bench/socket_flood.py --frames 3000
    DATABASE_URL=postgres://postgres@127.0.0.1/test REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/socket_flood.py
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_llm import FakeLLM
from tests.live import Browser, RawSocket, flood, long_conversation, rss_mb, running_site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=2048, help="characters per message")
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of not reading")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to watch after")
    args, env = parser.parse_known_args()
    settings = dict(item.split("=", 1) for item in env)  # NAME=value for the site
    llm = FakeLLM().start()
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_site(Path(tmp), llm.base_url, **settings) as site,
    ):
        pid = site.processes[0].pid
        browser = Browser(site.url())
        browser.sign_up("flood")
        conversation = long_conversation(site, "flood", args.messages, args.size)
        before = rss_mb(pid)
        peak, done = before, threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.wait(0.2):
                peak = max(peak, rss_mb(pid))

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        ws = RawSocket(site.ws_url(), browser.ws_headers())
        sent = flood(ws, conversation, args.frames, [{"type": "subscribe"}])
        flood_s = time.monotonic() - started
        time.sleep(args.idle)
        during = peak
        try:
            code: object = ws.drain(seconds=10)
        except TimeoutError:
            code = "none: still open after 10 s of reading"
        ws.close()
        time.sleep(args.settle)
        done.set()
        watcher.join()
        after = rss_mb(pid)
        print(f"conversation: {args.messages} messages of {args.size} characters")
        print(f"frames sent before the server closed: {sent} of {args.frames} in {flood_s:.1f} s")
        print(f"close code read by the client: {code}")
        print(
            f"daphne RSS MiB: before {before:.0f}, peak while not reading {during:.0f},"
            f" peak {peak:.0f}, {args.settle:.0f} s after the close {after:.0f}"
        )
    llm.stop()


if __name__ == "__main__":
    main()
