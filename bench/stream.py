"""Streaming benchmark: real daphne process(es), the fake model server, and
many concurrent chats over real WebSockets. Prints time to first token as
the client sees it, the delivered token rate, frames per reply, how long a
stop takes to end a reply (across processes when there are two), and the
servers' memory. Loopback only; every loop is bounded.

    .venv/bin/python bench/stream.py --chats 20 --tokens 300 --rate 300
    DATABASE_URL=postgres://postgres@127.0.0.1/test REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/stream.py --processes 2
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_llm import FakeLLM, expected_text
from tests.live import Browser, Site, rss_mb, running_site


async def one_chat(site: Site, index: int, headers: dict, model: str) -> dict:
    url = site.ws_url(index % len(site.ports))
    async with websockets.connect(url, additional_headers=headers, max_queue=None) as ws:
        await ws.recv()  # ready
        sent = time.perf_counter()
        frame = {"type": "send", "conversation": None, "content": "bench", "model": model}
        await ws.send(json.dumps(frame))
        first = None
        frames = 0
        text = ""
        async with asyncio.timeout(120):
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "delta":
                    first = first or time.perf_counter()
                    frames += 1
                    text += message.get("content", "")
                elif message["type"] == "end":
                    done = time.perf_counter()
                    break
        assert text == expected_text(model), "lost or repeated text"
        tokens = len(text.split())
        return {
            "ttft_ms": (first - sent) * 1000,
            "rate": tokens / (done - first) if done > first else float("nan"),
            "frames": frames,
            "server_ttft": message["timing"]["ttft_ms"],
        }


async def stop_latency(site: Site, headers: dict, rounds: int) -> list[float]:
    """Start a long reply through the first process, stop it through the
    last, and time from sending stop to receiving the end frame."""
    latencies = []
    model = "fake:n=2000,delay=0.01"
    for _ in range(rounds):
        async with (
            websockets.connect(site.ws_url(0), additional_headers=headers) as a,
            websockets.connect(site.ws_url(len(site.ports) - 1), additional_headers=headers) as b,
        ):
            await a.recv()
            await b.recv()
            frame = {"type": "send", "conversation": None, "content": "stop me", "model": model}
            await a.send(json.dumps(frame))
            conversation = None
            async with asyncio.timeout(30):
                while conversation is None:
                    message = json.loads(await a.recv())
                    if message["type"] == "conversation":
                        conversation = message["conversation"]["id"]
                await b.send(json.dumps({"type": "subscribe", "conversation": conversation}))
                while json.loads(await b.recv())["type"] != "delta":
                    pass
                started = time.perf_counter()
                await b.send(json.dumps({"type": "stop", "conversation": conversation}))
                while True:
                    message = json.loads(await b.recv())
                    if message["type"] == "end":
                        break
            assert message["status"] == "stopped"
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def summary(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return f"median {statistics.median(values):8.1f}   p95 {p95:8.1f}   max {values[-1]:8.1f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=20, help="concurrent chats")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per reply")
    parser.add_argument("--rate", type=float, default=300, help="model tokens/s per reply")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--stops", type=int, default=5, help="stop-latency rounds")
    args = parser.parse_args()
    model = f"fake:n={args.tokens},delay={1 / args.rate:.5f}"

    fake = FakeLLM().start()
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_site(
            Path(tmp),
            fake.base_url,
            processes=args.processes,
            CHAT_RATE_LIMIT="100000",
            # One user runs every chat: the caps on replies at once would refuse most.
            CHAT_MAX_REPLIES_PER_USER=str(args.chats + 1),
            CHAT_MAX_REPLIES="0",
            LOG_LEVEL="WARNING",
        ) as site,
    ):
        try:
            browser = Browser(site.url(0))
            await asyncio.to_thread(browser.sign_up, "bench")
            headers = browser.ws_headers()
            print(f"{args.chats} concurrent chats, {args.tokens} tokens each at {args.rate:.0f}/s,")
            database = site.env["DATABASE_URL"].split(":")[0]
            print(f"{args.processes} daphne process(es), database {database}")
            began = time.perf_counter()
            results = await asyncio.gather(
                *(one_chat(site, i, headers, model) for i in range(args.chats))
            )
            wall = time.perf_counter() - began
            print(f"  client ttft ms    {summary([r['ttft_ms'] for r in results])}")
            print(f"  server ttft ms    {summary([r['server_ttft'] for r in results])}")
            print(f"  tokens/s a chat   {summary([r['rate'] for r in results])}")
            print(f"  frames a reply    {summary([r['frames'] for r in results])}")
            total = args.chats * args.tokens
            print(f"  all replies whole: {total} tokens in {wall:.2f} s ({total / wall:.0f}/s)")
            stops = await stop_latency(site, headers, args.stops)
            print(f"  stop -> end ms    {summary(stops)}")
            for pid in (p.pid for p in site.processes):
                print(f"  daphne pid {pid} RSS {rss_mb(pid):.0f} MB")
        finally:
            fake.stop()


if __name__ == "__main__":
    asyncio.run(main())
