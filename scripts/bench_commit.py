#!/usr/bin/env python3
"""Probe the cost of one listener commit, back to back and after idle spells.

The submission listener commits each accepted message (or a group of them)
with ``ISpool.enqueue_claimed``.  This script times that call for one ~1 KiB
message on a fresh spool (a SQLite file in a temporary directory, or with
``--pg`` a fresh schema in postgresql+psycopg://postgres@127.0.0.1/test),
``--samples`` times per pause: back to back, then after sleeping between
calls (the idle latency case), then after *spinning* the same time instead
of sleeping (the CPU stays busy).  It prints the median wall time and the
median CPU time of the calling thread for each.

On the VMs relay is developed on, a call after a pause of 50 ms or more
costs three to four times the CPU of a back-to-back one, on both spools,
whether the thread slept or spun meanwhile: the idle latency pays for that,
a steady stream does not (README "Performance").

    python scripts/bench_commit.py          # SQLite
    python scripts/bench_commit.py --pg     # PostgreSQL
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_delivery import PG_SERVER_URL, run_on_fresh_spool  # noqa: E402

from relay.model import NewMessage  # noqa: E402
from relay.spool import open_spool  # noqa: E402

LEASE = 300.0
MESSAGE = NewMessage(sender="sender@example.test", recipients=("rcpt@example.test",),
                     data=b"Subject: probe\r\n\r\n" + (b"x" * 78 + b"\r\n") * 12)


def spin(seconds: float) -> None:
    """Keep this CPU busy for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def probe(spool, samples: int, pause: float, busy: bool) -> tuple[float, float]:
    """Median (wall, thread CPU) seconds of one ``enqueue_claimed``, with ``pause`` before each."""
    wall, cpu = [], []
    for _ in range(samples):
        if pause:
            (spin if busy else time.sleep)(pause)
        t0, c0 = time.perf_counter(), time.thread_time()
        spool.enqueue_claimed([MESSAGE], time.time(), "probe", LEASE)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def run(url: str, samples: int, pauses: list[float]) -> list[str]:
    spool = open_spool(url)
    try:
        probe(spool, 5, 0.0, False)      # connect, prepare, fill caches
        lines = []
        for pause in pauses:
            for busy in ((False,) if pause == 0 else (False, True)):
                wall, cpu = probe(spool, samples, pause, busy)
                how = "back to back" if pause == 0 else f"after {pause * 1000:.0f} ms {'spinning' if busy else 'asleep'}"
                lines.append(f"  {how:<28} wall {wall * 1e3:5.2f} ms   thread CPU {cpu * 1e3:5.2f} ms")
        return lines
    finally:
        spool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", action="store_true", help="a fresh schema in " + PG_SERVER_URL)
    parser.add_argument("--samples", type=int, default=30, help="calls per pause (30)")
    parser.add_argument("--pause", type=float, action="append",
                        help="seconds between calls (repeatable; default 0, 0.05, 0.5)")
    args = parser.parse_args(argv)
    pauses = args.pause or [0.0, 0.05, 0.5]
    if 0.0 not in pauses:
        pauses.insert(0, 0.0)
    with tempfile.TemporaryDirectory(prefix="relay-bench-commit-") as tmp:
        lines = run_on_fresh_spool(lambda _args, _dir, url, _cmd: run(url, args.samples, pauses),
                                   args, Path(tmp), "")
    print(f"enqueue_claimed of one message ({len(MESSAGE.data)} B), median of {args.samples}, "
          f"{'postgresql' if args.pg else 'sqlite'}:")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
