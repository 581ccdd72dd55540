#!/usr/bin/env python3
"""Benchmark bulk intake: ``relayctl enqueue --mbox FILE`` into a fresh spool.

Builds an mbox of ``--messages`` (10,000) messages of about 1 KiB each, to
various recipients and domains, creates a fresh spool (a SQLite file in a
temporary directory by default; ``--spool-url URL``, or ``--pg`` for a fresh
schema in postgresql+psycopg://postgres@127.0.0.1/test), and times the
enqueue command alone (a subprocess, ``python -m relay.cli`` with this
checkout on PYTHONPATH; the schema is created beforehand).  It then checks
the count with ``relayctl status --json`` and prints messages per second.

``--inprocess`` also times the same work inside this process
(``relay.message.read_mbox`` + ``parse_message`` + ``Relay.enqueue_many``),
phase by phase, into a second fresh spool, to separate the CLI's start-up
cost; ``--profile`` prints where that in-process run spends its time.

    python scripts/bench_enqueue.py                 # SQLite
    python scripts/bench_enqueue.py --pg            # PostgreSQL
    python scripts/bench_enqueue.py --inprocess --profile
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1/test"

_DOMAINS = ["example.com", "example.net", "example.org", "mail.example.de", "post.example.fr",
            "customers.example.co.uk", "b2b.example.io", "lists.example.edu"]
_WORDS = ("order invoice shipment receipt account password reset welcome newsletter update "
          "reminder confirmation delivery payment renewal notice report summary weekly").split()


def build_mbox(path: Path, count: int, seed: int = 1) -> tuple[int, int]:
    """Write ``count`` ~1 KiB messages to an mbox; return (bytes, recipients)."""
    rng = random.Random(seed)
    total_rcpts = 0
    with open(path, "wb") as f:
        for n in range(count):
            rcpts = [f"user{rng.randrange(100_000)}.{n}@{rng.choice(_DOMAINS)}"
                     for _ in range(rng.choice((1, 1, 1, 2, 3)))]
            total_rcpts += len(rcpts)
            to, cc = rcpts[:1], rcpts[1:]
            subject = " ".join(rng.choice(_WORDS) for _ in range(5)).capitalize()
            headers = [
                "From: Shop Notifications <noreply@shop.example.com>",
                f"To: Customer {n} <{to[0]}>",
                *([f"Cc: {', '.join(cc)}"] if cc else []),
                f"Subject: {subject} #{n}",
                f"Date: Sat, 21 Nov 2026 12:{n // 60 % 60:02d}:{n % 60:02d} +0000",
                f"Message-ID: <{n}.{rng.randrange(10**9)}@shop.example.com>",
                "MIME-Version: 1.0",
                "Content-Type: text/plain; charset=utf-8",
                "Content-Transfer-Encoding: 7bit",
            ]
            head = "\n".join(headers) + "\n\n"
            body_lines = []
            size = len(head)
            while size < 1000:
                line = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(6, 12)))
                body_lines.append(line)
                size += len(line) + 1
            f.write(f"From noreply@shop.example.com Sat Nov 21 12:00:00 2026\n{head}"
                    f"{chr(10).join(body_lines)}\n\n".encode())
    return path.stat().st_size, total_rcpts


@contextmanager
def fresh_spool(args: argparse.Namespace, workdir: Path, name: str) -> Iterator[str]:
    """The URL of a fresh, initialised spool (dropped afterwards if we created it)."""
    from relay.spool import open_spool

    if args.pg:
        from sqlalchemy import create_engine, text

        admin = create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = f"{PG_SERVER_URL}?options={quote(f'-csearch_path={schema}')}"
        try:
            open_spool(url).close()
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
    elif args.spool_url:
        open_spool(args.spool_url).close()
        yield args.spool_url
    else:
        url = f"sqlite:///{workdir / (name + '.db')}"
        open_spool(url).close()
        yield url


def dialect_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def relayctl(url: str, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m relay.cli ARGV`` on the spool at ``url``; return (result, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RELAY_SPOOL_URL=url)
    env.pop("RELAY_CONFIG", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "relay.cli", *argv], env=env, cwd=REPO,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"relayctl {' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result, elapsed


def check_status(url: str, messages: int, recipients: int) -> None:
    result, _ = relayctl(url, "status", "--json")
    status = json.loads(result.stdout)
    got = (status["messages"], status["recipients"]["queued"])
    if got != (messages, recipients):
        sys.exit(f"relayctl status --json counts {got} (messages, queued), expected {(messages, recipients)}")


def bench_cli(url: str, mbox: Path, messages: int, recipients: int) -> float:
    result, elapsed = relayctl(url, "enqueue", "--mbox", str(mbox))
    ids = result.stdout.split()
    if len(ids) != messages or len(set(ids)) != messages:
        sys.exit(f"relayctl enqueue --mbox printed {len(ids)} ids ({len(set(ids))} distinct), "
                 f"expected {messages}")
    check_status(url, messages, recipients)
    return elapsed


def bench_inprocess(url: str, mbox: Path, messages: int, recipients: int, profile: bool) -> dict[str, float]:
    from relay import api
    from relay.message import parse_message, read_mbox

    phases: dict[str, float] = {}
    profiler = cProfile.Profile() if profile else None
    with api.open(spool_url=url) as outbox:
        if profiler:
            profiler.enable()
        t0 = time.perf_counter()
        raws = list(read_mbox(str(mbox)))
        t1 = time.perf_counter()
        parsed = [parse_message(raw) for raw in raws]
        t2 = time.perf_counter()
        ids = outbox.enqueue_many(parsed)
        t3 = time.perf_counter()
        if profiler:
            profiler.disable()
    if len(set(ids)) != messages:
        sys.exit(f"enqueue_many returned {len(set(ids))} distinct ids, expected {messages}")
    check_status(url, messages, recipients)
    phases.update(read_mbox=t1 - t0, parse_message=t2 - t1, enqueue_many=t3 - t2, total=t3 - t0)
    if profiler:
        print("\nProfile of the in-process run (by own time):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="messages in the mbox (10000)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--spool-url", metavar="URL", help="an existing, empty spool to fill instead of "
                                                          "a temporary SQLite file")
    where.add_argument("--pg", action="store_true", help="a fresh schema in " + PG_SERVER_URL)
    parser.add_argument("--inprocess", action="store_true",
                        help="also time read_mbox + parse_message + enqueue_many in this process")
    parser.add_argument("--profile", action="store_true", help="profile the in-process run (implies --inprocess)")
    args = parser.parse_args(argv)
    if args.profile:
        args.inprocess = True
    if args.spool_url and args.inprocess:
        parser.error("--inprocess needs a second fresh spool; use the default SQLite spool or --pg")

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        workdir = Path(tmp)
        mbox = workdir / "bench.mbox"
        size, recipients = build_mbox(mbox, args.messages)
        n = args.messages
        print(f"mbox: {n} messages, {recipients} recipients, {size / n:.0f} bytes per message")
        with fresh_spool(args, workdir, "cli") as url:
            kind = dialect_of(url)
            elapsed = bench_cli(url, mbox, n, recipients)
            print(f"relayctl enqueue --mbox ({kind}): {n} messages in {elapsed:.2f} s "
                  f"= {n / elapsed:,.0f} messages/s (includes interpreter and import start-up)")
        if args.inprocess:
            with fresh_spool(args, workdir, "inprocess") as url:
                phases = bench_inprocess(url, mbox, n, recipients, args.profile)
                detail = ", ".join(f"{k} {v:.2f} s" for k, v in phases.items() if k != "total")
                print(f"in-process ({dialect_of(url)}): {n} messages in {phases['total']:.2f} s "
                      f"= {n / phases['total']:,.0f} messages/s ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
