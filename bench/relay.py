"""Relay benchmark (issue 11, docs/performance.md): what the site adds to a
model server's stream, against a bare `openai` SDK reader of the same server
in the same run. Starts the fake model server in a process of its own and
the site under daphne, then prints a table (and writes JSON) of:

- added time to first token at 1 stream (alternating with the bare reader)
  and at N streams at once (against N bare readers at once);
- delivery lag, from the fake server writing a token (it stamps each) to a
  client receiving it, and the backlog after a reply's last token;
- server CPU per relayed token, from /proc of the daphne processes, and the
  bare reader's own CPU per token, as a ratio;
- frames and bytes per reply on the socket, against the reply's text;
- database writes (Postgres) and Redis commands per reply;
- RSS added by idle authenticated sockets;
- the highest aggregate token rate with delivery lag p99 under 100 ms.

The set-up comes from the environment as for the site itself: SQLite and the
in-memory layer by default; DATABASE_URL (Postgres) and REDIS_URL for the
shared set-up, where --processes 2 spreads the streams over two processes.
Loopback only; every loop is bounded.

    .venv/bin/python bench/relay.py
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/relay.py --processes 2
    .venv/bin/python bench/relay.py --quick     # seconds: every figure, small numbers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.live import (  # noqa: E402
    Site,
    cpu_seconds,
    fake_llm_process,
    rss_mb,
    running_site,
    users_with_tokens,
)

LAG_LIMIT_MS = 100.0


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def model(tokens: int, rate: float, ttft: float = 0.0) -> str:
    name = f"fake:n={tokens},delay={1 / rate:.6f},stamp=1"
    return name + (f",ttft={ttft:g}" if ttft else "")


def stamps(text: str) -> list[float]:
    return [float(word[1:]) for word in text.split() if word.startswith("@")]


@dataclass
class Reply:
    ttft_ms: float = float("nan")
    frames: int = 0  # delta frames
    frame_bytes: int = 0  # every frame of the reply, start to end, as sent
    delta_bytes: int = 0  # the delta frames alone
    text: str = ""
    lags_ms: list[float] = field(default_factory=list)
    backlog_ms: float = float("nan")  # end received minus last token written
    streamed_ms: float = float("nan")  # first delta to end, as the client saw them
    status: str = ""
    error: dict | None = None


def whole(reply: Reply, tokens: int) -> bool:
    """Every token arrived, once, in order (the stamps only grow)."""
    written = stamps(reply.text)
    ended = reply.status in ("complete", "")  # the bare reader has no status
    return ended and len(written) == tokens and written == sorted(written)


async def direct(client: openai.AsyncOpenAI, name: str) -> Reply:
    """The bare reader: the SDK's own stream, as a script would read it."""
    reply = Reply()
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "bench"}], stream=True
    )
    async with stream:
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    if not reply.text:
                        reply.ttft_ms = (time.perf_counter() - sent) * 1000
                    reply.text += choice.delta.content
    return reply


async def relayed(url: str, token: str, name: str) -> Reply:
    """One prompt through the site's socket, timed from the send frame."""
    reply = Reply()
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(url, additional_headers=headers, max_queue=None) as ws:
        await ws.recv()  # ready
        frame = {"type": "send", "conversation": None, "content": "bench", "model": name}
        sent = time.perf_counter()
        await ws.send(json.dumps(frame))
        async with asyncio.timeout(300):
            counting = False
            while True:
                raw = await ws.recv()
                now = time.time()
                message = json.loads(raw)
                kind = message["type"]
                if kind == "start":
                    counting = True
                size = len(raw.encode() if isinstance(raw, str) else raw)
                if counting:
                    reply.frame_bytes += size
                if kind == "delta":
                    reply.delta_bytes += size
                    if not reply.frames:
                        first = time.perf_counter()
                        reply.ttft_ms = (first - sent) * 1000
                    reply.frames += 1
                    content = message.get("content", "")
                    reply.text += content
                    if written := stamps(content):
                        reply.lags_ms.append((now - written[-1]) * 1000)
                elif kind == "end":
                    if reply.frames:
                        reply.streamed_ms = (time.perf_counter() - first) * 1000
                    reply.status = message["status"]
                    reply.error = message.get("error")
                    if written := stamps(reply.text):
                        reply.backlog_ms = (now - written[-1]) * 1000
                    return reply
                elif kind == "error":
                    raise RuntimeError(f"the site refused the prompt: {message}")


class Bench:
    def __init__(self, site: Site, llm_url: str, tokens: list[str]) -> None:
        self.site, self.tokens = site, tokens
        self.sdk = openai.AsyncOpenAI(base_url=llm_url, api_key="x", max_retries=0)

    def url(self, index: int) -> str:
        return self.site.ws_url(index % len(self.site.ports))

    def server_cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.site.processes)

    async def site_streams(self, count: int, name: str) -> list[Reply]:
        return await asyncio.gather(
            *(relayed(self.url(i), self.tokens[i % len(self.tokens)], name) for i in range(count))
        )

    async def one_stream(self, rounds: int, tokens: int, rate: float) -> dict:
        name = model(tokens, rate)
        bare, ours = [], []
        for _ in range(rounds):  # alternating, so drift hits both alike
            bare.append(await direct(self.sdk, name))
            ours.append((await self.site_streams(1, name))[0])
        added = [o.ttft_ms - b.ttft_ms for o, b in zip(ours, bare, strict=True)]
        text = sum(len(r.text.encode()) for r in ours)
        frames = sum(r.frames for r in ours)
        return {
            "added_ttft_p50_ms": percentile(added, 50),
            "added_ttft_p99_ms": percentile(added, 99),
            "bare_ttft_p50_ms": percentile([b.ttft_ms for b in bare], 50),
            "frames_per_reply": frames / len(ours),
            "bytes_per_reply": sum(r.frame_bytes for r in ours) / len(ours),
            "text_bytes_per_reply": text / len(ours),
            "wrapper_bytes_per_frame": (sum(r.delta_bytes for r in ours) - text) / max(frames, 1),
            # The window bounds frames against how long the reply really
            # streamed, which a loaded machine stretches past tokens / rate.
            "reply_seconds": sum(r.streamed_ms for r in ours) / len(ours) / 1000,
            "whole": all(
                whole(r, tokens) and whole(b, tokens) for r, b in zip(ours, bare, strict=True)
            ),
        }

    async def load(self, streams: int, tokens: int, rate: float) -> dict:
        name = model(tokens, rate)
        cpu = own_cpu()
        bare = await asyncio.gather(*(direct(self.sdk, name) for _ in range(streams)))
        bare_cpu = own_cpu() - cpu
        server = self.server_cpu()
        ours = await self.site_streams(streams, name)
        server = self.server_cpu() - server
        relayed_tokens = sum(len(stamps(r.text)) for r in ours)
        lags = [lag for r in ours for lag in r.lags_ms]
        return {
            "streams": streams,
            "added_ttft_p99_ms": percentile([r.ttft_ms for r in ours], 99)
            - percentile([b.ttft_ms for b in bare], 99),
            "lag_p50_ms": percentile(lags, 50),
            "lag_p99_ms": percentile(lags, 99),
            "lag_max_ms": max(lags, default=float("nan")),
            "backlog_max_ms": max(r.backlog_ms for r in ours),
            "server_cpu_us_per_token": server / max(relayed_tokens, 1) * 1e6,
            "bare_cpu_us_per_token": bare_cpu
            / max(sum(len(stamps(b.text)) for b in bare), 1)
            * 1e6,
            "whole": all(whole(r, tokens) for r in ours),
        }

    async def writes_per_reply(self, replies: int, tokens: int, rate: float) -> dict:
        """Rows written (Postgres) and Redis commands run per reply, over
        replies one after another."""
        await self.counts_settle()
        before = (self.database_writes(), redis_commands())
        for _ in range(replies):
            await self.site_streams(1, model(tokens, rate))
        await self.counts_settle()
        after = (self.database_writes(), redis_commands())
        per = [
            (a - b) / replies if a is not None and b is not None else None
            for a, b in zip(after, before, strict=True)
        ]
        return {"db_writes_per_reply": per[0], "redis_commands_per_reply": per[1]}

    async def counts_settle(self) -> None:
        # A Postgres backend reports its row counts at most once a second
        # while busy, and the rest only once it has been idle for 10 s: the
        # site's pooled connections stay open, so wait that long.
        postgres = self.site.env["DATABASE_URL"].startswith("postgres")
        await asyncio.sleep(11 if postgres else 1)

    def database_writes(self) -> int | None:
        url = self.site.env["DATABASE_URL"]
        if not url.startswith("postgres"):
            return None
        import psycopg

        with psycopg.connect(url) as db:
            row = db.execute(
                "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_user_tables"
            ).fetchone()
        return int(row[0] or 0) if row else 0

    async def idle_sockets(self, count: int) -> dict:
        pid = self.site.processes[0].pid
        before = rss_mb(pid)
        sockets = []
        try:
            for start in range(0, count, 50):  # in batches: a bench, not a storm
                batch = [
                    websockets.connect(
                        self.site.ws_url(0),
                        additional_headers={
                            "Authorization": f"Bearer {self.tokens[i % len(self.tokens)]}"
                        },
                    )
                    for i in range(start, min(count, start + 50))
                ]
                opened = await asyncio.gather(*batch)
                sockets += opened
                await asyncio.gather(*(ws.recv() for ws in opened))  # ready
            await asyncio.sleep(1)
            after = rss_mb(pid)
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        return {"idle_sockets": count, "idle_added_rss_mb": after - before}

    async def highest_rate(self, rate: float, tokens: int, steps: list[int]) -> dict:
        """Streams at rate tokens/s each, stepped up until delivery lag p99
        passes LAG_LIMIT_MS; the highest aggregate rate that stayed under."""
        best, seen = 0.0, []
        for streams in steps:
            figures = await self.load(streams, tokens, rate)
            aggregate = streams * rate
            seen.append({"streams": streams, "tokens_per_s": aggregate, **figures})
            if not figures["whole"] or figures["lag_p99_ms"] >= LAG_LIMIT_MS:
                break
            best = aggregate
        return {"highest_tokens_per_s": best, "steps": seen}


def redis_commands() -> int | None:
    url = os.environ.get("REDIS_URL")
    if not url:
        return None
    import redis

    info = redis.Redis.from_url(url).info("commandstats")
    return sum(int(v["calls"]) for v in info.values())


def progress(phase: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {phase}", file=sys.stderr, flush=True)


def row(name: str, value: object, target: str = "") -> str:
    if isinstance(value, float):
        value = f"{value:,.1f}"
    elif value is None:
        value = "n/a"
    return f"| {name} | {value} | {target} |"


def table(results: dict) -> str:
    one, load, rate = results["one"], results["load"], results["rate"]
    window = results["coalesce_ms"]
    frame_cap = one["reply_seconds"] * 1000 / window + 3
    lines = [
        f"| figure ({results['setup']}) | measured | target |",
        "|---|---|---|",
        row("added time to first token, 1 stream, p50 (ms)", one["added_ttft_p50_ms"], "≤ 10"),
        row("added time to first token, 1 stream, p99 (ms)", one["added_ttft_p99_ms"], "≤ 30"),
        row(
            f"added first-token p99, {load['streams']} streams (ms)",
            load["added_ttft_p99_ms"],
            "≤ 100",
        ),
        row("delivery lag p50 (ms)", load["lag_p50_ms"]),
        row("delivery lag p99 (ms)", load["lag_p99_ms"], f"≤ {window + 10}"),
        row("delivery lag max (ms)", load["lag_max_ms"]),
        row("backlog after the last token, max (ms)", load["backlog_max_ms"], "none"),
        row("server CPU per relayed token (µs)", load["server_cpu_us_per_token"], "≤ 100"),
        row("bare SDK reader CPU per token (µs)", load["bare_cpu_us_per_token"]),
        row(
            "server / bare reader CPU",
            load["server_cpu_us_per_token"] / max(load["bare_cpu_us_per_token"], 1e-9),
            "≤ 0.5",
        ),
        row("frames per reply", one["frames_per_reply"], f"≤ {frame_cap:.0f}"),
        row("text bytes per reply", one["text_bytes_per_reply"]),
        row("socket bytes per reply", one["bytes_per_reply"]),
        row("wrapper bytes per delta frame", one["wrapper_bytes_per_frame"], "≤ 100"),
        row("database rows written per reply", results["writes"]["db_writes_per_reply"]),
        row("Redis commands per reply", results["writes"]["redis_commands_per_reply"]),
        row(
            f"RSS added by {results['idle']['idle_sockets']} idle sockets (MB)",
            results["idle"]["idle_added_rss_mb"],
            "≤ 50 (1,000)",
        ),
        row(
            "highest aggregate rate, lag p99 < 100 ms (tokens/s)",
            rate["highest_tokens_per_s"],
            "≥ 10,000",
        ),
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict:
    with (
        tempfile.TemporaryDirectory() as tmp,
        fake_llm_process(Path(tmp) / "fake_llm.log") as llm_url,
        running_site(
            Path(tmp),
            llm_url,
            processes=args.processes,
            CHAT_RATE_LIMIT="1000000",
            CHAT_MAX_REPLIES_PER_USER="100000",
            CHAT_MAX_REPLIES="0",
            CHAT_FRAME_RATE="1000",
            CHAT_FRAME_BURST="10000",
            LOG_LEVEL="WARNING",
        ) as site,
    ):
        tokens = users_with_tokens(site, "bench", args.users)
        bench = Bench(site, llm_url, tokens)
        database = site.env["DATABASE_URL"].split(":")[0]
        layer = "redis" if os.environ.get("REDIS_URL") else "in-memory"
        results: dict = {
            "setup": f"{database} + {layer}, {args.processes} process(es)",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "coalesce_ms": int(site.env.get("CHAT_COALESCE_MS", "30")),
            "args": vars(args),
        }
        await bench.site_streams(2, model(5, 1000))  # warm up both paths
        await direct(bench.sdk, model(5, 1000))
        progress("1 stream")
        results["one"] = await bench.one_stream(args.rounds, args.tokens, args.rate)
        progress("load")
        results["load"] = await bench.load(args.streams, args.load_tokens, args.load_rate)
        progress("writes per reply")
        results["writes"] = await bench.writes_per_reply(
            min(args.rounds, 5), args.tokens, args.rate
        )
        progress("idle sockets")
        results["idle"] = await bench.idle_sockets(args.idle)
        progress("highest rate")
        results["rate"] = await bench.highest_rate(args.load_rate, args.load_tokens, args.steps)
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20, help="1-stream rounds")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--rate", type=float, default=300, help="tokens/s of the 1-stream reply")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--load-tokens", type=int, default=300)
    parser.add_argument("--load-rate", type=float, default=100, help="tokens/s per stream")
    parser.add_argument("--idle", type=int, default=1000, help="idle sockets for the RSS figure")
    parser.add_argument(
        "--steps", type=lambda s: [int(n) for n in s.split(",")], default=[50, 100, 150, 200, 300]
    )
    parser.add_argument("--json", type=Path, default=Path("bench-relay.json"))
    parser.add_argument("--quick", action="store_true", help="every figure, small numbers")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens, args.streams, args.load_tokens = 3, 50, 5, 30
        args.idle, args.steps = 20, [5, 10]
    if args.processes > 1 and not os.environ.get("REDIS_URL"):
        parser.error("--processes > 1 needs REDIS_URL: processes share replies through Redis")
    results = asyncio.run(run(args))
    print(table(results))
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"(figures in {args.json})")
    whole = results["one"]["whole"] and results["load"]["whole"]
    if not whole:
        print("FAILED: a relayed reply differs from what the model server sent", file=sys.stderr)
    return 0 if whole else 1


if __name__ == "__main__":
    sys.exit(main())
