"""Load: a burst of /imagine from many users against the fake Discord, with the tiny model.

The real bot runs in a child process (`python -m bot`, as in production: its own event loop and memory); the fake
Discord and the users run in this one. Every request must end visibly, with an image or a clear rejection (queue
full, per-user limit, cooldown), and with its row in the database. It reports:

- acknowledgement latency: from sending INTERACTION_CREATE to the bot's callback arriving at the fake; Discord's
  limit is 3 s, the target p99 is 250 ms;
- how many requests got an image and how many a rejection, which must add up to the requests sent;
- the database's row count, which must equal the requests sent;
- the bot process's peak memory (its ru_maxrss, read as VmHWM from /proc before it stops).

    python bench/load.py                                    # 200 requests from 50 users within 10 s, 3 steps
    python bench/load.py --requests 60 --users 15 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.botharness import result_id
from tests.botprocess import BotProcess, bot_config
from tests.fakediscord import FakeDiscord, FakeInteraction, FakeUser

# How a rejection begins (bot/generation.py and sdengine/executor.py say them).
REJECTIONS = {
    "queue full": "The queue is full",
    "per-user limit": "You already have",
    "cooldown": "You are on cooldown",
}


@dataclass
class LoadReport:
    requests: int
    users: int
    sent_within: float  # seconds from the first request sent to the last
    drained_after: float  # seconds from the first request sent until every one had ended
    latencies: list[float]  # acknowledgement latency of each request, seconds
    callbacks_refused: int  # callbacks the fake refused (late: over 3 s)
    images: int
    rejections: Counter[str]
    others: list[str]  # any other ending: must stay empty
    rows: int
    peak_rss_mib: float
    exit_code: int

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> str:
        rejected = sum(self.rejections.values())
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.rejections.items())) or "none"
        return "\n".join(
            [
                f"{self.requests} /imagine from {self.users} users, sent within {self.sent_within:.1f} s; "
                f"all ended after {self.drained_after:.1f} s",
                f"acknowledgement latency: p50 {self.percentile(0.5) * 1000:.0f} ms, "
                f"p99 {self.percentile(0.99) * 1000:.0f} ms, max {max(self.latencies) * 1000:.0f} ms "
                f"({self.callbacks_refused} over Discord's 3 s)",
                f"outcomes: {self.images} images + {rejected} rejections ({kinds}) = {self.images + rejected}"
                + (f"; {len(self.others)} other endings: {self.others[:3]}" if self.others else ""),
                f"database rows: {self.rows}",
                f"bot process peak memory (ru_maxrss): {self.peak_rss_mib:.0f} MiB; exit code {self.exit_code}",
            ]
        )


def ending(inter: FakeInteraction) -> str | None:
    """How a request ended, as far as its user can see: "image", a rejection kind, "other: ..." or None (not yet)."""
    for message in inter.messages:
        if message.deleted:
            continue
        if result_id(message) is not None and message.attachments:
            return "image"
        if message.ephemeral:
            kind = next((k for k, start in REJECTIONS.items() if message.content.startswith(start)), None)
            return kind or f"other: {message.content}"
        if "**#" in message.content and not message.components:  # a failure sentence in place of the result
            return f"other: {message.content}"
    return None


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory: VmHWM, what getrusage reports as ru_maxrss once it has exited."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def run_load(
    workdir: Path,
    *,
    requests: int = 200,
    users: int = 50,
    seconds: float = 10.0,
    steps: int = 3,
    seed: int = 1,
    max_pending: int = 3,
    max_queue: int = 50,
    cooldown: float = 1.0,
    timeout: float = 600.0,
) -> LoadReport:
    """Send `requests` /imagine from `users` users at seeded random times within `seconds`, wait until every one
    has ended, stop the bot with SIGTERM, and report."""
    rng = random.Random(seed)
    async with FakeDiscord() as fake:
        people = [FakeUser(f"user{i}") for i in range(users)]
        for person in people:
            fake.guild.add_member(person)
            fake.users[person.id] = person
        owners = [people[i % users] for i in range(requests)]
        rng.shuffle(owners)
        offsets = sorted(rng.uniform(0, seconds) for _ in range(requests))
        config = bot_config(
            workdir,
            fake,
            steps=steps,
            max_pending_per_user=max_pending,
            max_queue=max_queue,
            cooldown_seconds=cooldown,
        )
        sent: list[FakeInteraction] = []
        async with BotProcess.start(fake, config, workdir / "bot.log") as bot:
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i, (owner, offset) in enumerate(zip(owners, offsets, strict=True)):
                await asyncio.sleep(max(0.0, start + offset - loop.time()))  # the schedule, not a synchronization
                sent.append(await fake.slash_command("imagine", {"prompt": f"load {i}"}, user=owner))
            sent_within = loop.time() - start
            await fake.wait_for(lambda: all(ending(i) is not None for i in sent), timeout)
            drained_after = loop.time() - start
            peak = peak_rss_mib(bot.pid)
            bot.send_signal(signal.SIGTERM)
            exit_code = await bot.wait()

    endings = Counter(ending(i) for i in sent)
    with contextlib.closing(sqlite3.connect(workdir / "sdbot.sqlite3")) as db:
        ((rows,),) = db.execute("SELECT COUNT(*) FROM generations").fetchall()
    return LoadReport(
        requests=requests,
        users=users,
        sent_within=sent_within,
        drained_after=drained_after,
        latencies=[i.callbacks[0].latency for i in sent if i.callbacks],
        callbacks_refused=sum(1 for i in sent if not i.callbacks or i.callbacks[0].status >= 300),
        images=endings.pop("image", 0),
        rejections=Counter({k: n for k, n in endings.items() if k in REJECTIONS}),
        others=[str(k) for k in endings if k not in REJECTIONS],
        rows=rows,
        peak_rss_mib=peak,
        exit_code=exit_code,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="send them all within this time")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-pending", type=int, default=3, help="limits.max_pending_per_user")
    parser.add_argument("--max-queue", type=int, default=50, help="limits.max_queue")
    parser.add_argument("--cooldown", type=float, default=1.0, help="limits.cooldown_seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdbot-load-") as workdir:
        started = time.monotonic()
        report = asyncio.run(
            run_load(
                Path(workdir),
                requests=args.requests,
                users=args.users,
                seconds=args.seconds,
                steps=args.steps,
                seed=args.seed,
                max_pending=args.max_pending,
                max_queue=args.max_queue,
                cooldown=args.cooldown,
            )
        )
    print(report.summary())
    print(f"(bench wall time {time.monotonic() - started:.0f} s)")
    ok = (
        report.callbacks_refused == 0
        and max(report.latencies) < 3.0
        and report.images + sum(report.rejections.values()) == report.requests
        and report.rows == report.requests
        and report.exit_code == 0
    )
    if not ok:
        print("FAILED: an invariant does not hold", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
