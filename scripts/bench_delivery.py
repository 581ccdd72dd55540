#!/usr/bin/env python3
"""Benchmark delivery: relayd draining a full spool into a local smtp-sink.

Queues ``--messages`` (20,000) messages of about 1 KiB, one recipient each,
across ``--domains`` (10) domains, into a fresh spool with the Python API
(``relay.open(spool_url=...).enqueue_many`` of ``parse_message`` values; not
timed): a SQLite file in a temporary directory, or with ``--pg`` a fresh
schema in postgresql+psycopg://postgres@127.0.0.1/test.  Starts Postfix's
``smtp-sink`` on a free loopback port, writes a relayd configuration
(delivery.tls = "none", ``--connections`` (16) connections, every domain
routed to the sink by ``routes."*"``, or ``--per-domain-routes``: one route
per domain; routes bypass DNS), and runs a real relayd
(``python -m relay.daemon --config FILE``) until the spool says every
recipient is delivered.  relayd's log (one line per recipient) goes to a
file, whose ``status=sent`` lines are counted.

Two rates are printed:

* from the first delivery: recipients recorded after the first recorded
  delivery, divided by the time from it to the last one (both from the
  spool's attempt history, relayd's clock).  This is the drain's rate and
  the one compared with the raw client.
* from relayd start: all recipients divided by the time from starting the
  relayd process until the benchmark saw the last one delivered (includes
  interpreter start-up, imports and polling).

Unless ``--no-raw``, it then runs ``scripts/bench_raw_client.py`` with the
same messages and connections (a plain Twisted ESMTPClient into its own
smtp-sink) and prints the ratio.  Every process it starts is stopped; the
run is bounded by ``--timeout``.

    python scripts/bench_delivery.py                  # SQLite
    python scripts/bench_delivery.py --pg             # PostgreSQL
    python scripts/bench_delivery.py --py-spy out.txt # profile relayd with py-spy (raw format)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_raw_client import (  # noqa: E402  (the same messages and sink as the raw client)
    busy_share,
    domains,
    machine_busy,
    make_messages,
    process_cpu,
    thread_cpu,
    smtp_sink,
    stop_process,
)

PG_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1/test"



def command_line(script: str, argv: list[str] | None) -> str:
    """How this run was started, for its report: ``python scripts/SCRIPT ARGS``."""
    return " ".join(["python", f"scripts/{script}",
                     *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop_cleanly_on_sigterm() -> None:
    """Make ``kill`` (SIGTERM) unwind like Ctrl-C, so that the run's ``finally``
    blocks stop what it started (relayd, smtp-sink, a private Postfix) and
    remove its temporary files; bench_series.py relies on it after a timeout."""
    signal.signal(signal.SIGTERM, _terminate)

def toml_str(value: str) -> str:
    return json.dumps(value)   # a JSON string is a valid TOML basic string


def run_on_fresh_spool(run, args, workdir: Path, command: str) -> dict:
    """``run(args, workdir, spool_url, command)`` on a new SQLite file in ``workdir``
    or, with ``--pg``, a new PostgreSQL schema that is dropped afterwards."""
    if not args.pg:
        return run(args, workdir, f"sqlite:///{workdir / 'spool.db'}", command)
    from relay.testing import create_pg_schema, drop_pg_schema
    schema, url = create_pg_schema(PG_SERVER_URL)
    try:
        return run(args, workdir, url, command)
    finally:
        drop_pg_schema(schema, PG_SERVER_URL)


def write_config(path: Path, *, spool_url: str, port: int, n_domains: int, connections: int,
                 per_domain: bool, batch_size: int | None, poll_interval: float) -> None:
    lines = [
        "[relay]",
        'hostname = "relay.bench.example"',
        'node = "bench"',
        "[spool]",
        f"url = {toml_str(spool_url)}",
        "[delivery]",
        'tls = "none"',
        f"concurrency = {connections}",
        f"per_domain_concurrency = {max(1, -(-connections // n_domains)) if per_domain else connections}",
        f"poll_interval = {poll_interval}",
        'connect_timeout = "10s"',
        'command_timeout = "60s"',
    ]
    if batch_size:
        lines.append(f"batch_size = {batch_size}")
    if per_domain:
        for d in domains(n_domains):
            lines += [f'[routes."{d}"]', 'host = "127.0.0.1"', f"port = {port}"]
    else:
        lines += ['[routes."*"]', 'host = "127.0.0.1"', f"port = {port}"]
    path.write_text("\n".join(lines) + "\n")


def enqueue(url: str, n: int, n_domains: int, size: int) -> int:
    import relay
    from relay.message import parse_message

    msgs = [parse_message(data) for _s, _r, data in make_messages(n, n_domains, size)]
    with relay.open(spool_url=url) as outbox:
        for start in range(0, len(msgs), 5000):
            outbox.enqueue_many(msgs[start:start + 5000])
    return sum(len(m.recipients) for m in msgs)


def run(args: argparse.Namespace, workdir: Path, url: str, command: str) -> dict:
    from sqlalchemy import create_engine, func, select

    from relay.spool.schema import attempts as A
    from relay.spool.schema import recipients as R

    recipients = enqueue(url, args.messages, args.domains, args.size)
    engine = create_engine(url)
    result: dict = {"command": command, "messages": args.messages, "recipients": recipients,
                    "spool": "postgresql" if args.pg else "sqlite"}
    relayd = spy = None
    try:
        with smtp_sink() as (sink, port, sink_cmd):
            config = workdir / "relayd.toml"
            write_config(config, spool_url=url, port=port, n_domains=args.domains,
                         connections=args.connections, per_domain=args.per_domain_routes,
                         batch_size=args.batch_size, poll_interval=args.poll_interval)
            env = dict(os.environ, PYTHONPATH=str(REPO))
            env.pop("RELAY_CONFIG", None)
            env.pop("RELAY_SPOOL_URL", None)
            cmd = [sys.executable, "-m", "relay.daemon", "--config", str(config)]
            log_path = workdir / "relayd.log"
            result["relayd_command"] = " ".join(shlex.quote(c) for c in cmd)
            result["sink_command"] = " ".join(sink_cmd)
            result["config"] = config.read_text()
            sink_cpu0 = process_cpu(sink.pid)
            busy0 = machine_busy()
            with open(log_path, "wb") as log:
                t_start = time.time()
                relayd = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=log)
                if args.py_spy:
                    # Attached to the running relayd; it writes FILE when relayd exits.
                    spy_cmd = [shutil.which("py-spy") or "py-spy", "record", "--gil", "-r", "250", "-f", "raw",
                               "-o", str(Path(args.py_spy).resolve()), "--pid", str(relayd.pid)]
                    spy = subprocess.Popen(spy_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                    result["py_spy_command"] = " ".join(spy_cmd)
                count = select(func.count()).select_from(R).where(R.c.state == "delivered")
                other = select(func.count()).select_from(R).where(R.c.state.in_(("deferred", "bounced")))
                deadline = time.monotonic() + args.timeout
                delivered = 0
                while True:
                    with engine.connect() as conn:
                        delivered = conn.execute(count).scalar_one()
                        failed = conn.execute(other).scalar_one() if delivered < recipients else 0
                    if delivered >= recipients:
                        t_done = time.time()
                        break
                    if failed:
                        raise SystemExit(f"{failed} recipient(s) were deferred or bounced; see {log_path}")
                    if relayd.poll() is not None:
                        raise SystemExit(f"relayd exited {relayd.returncode} early:\n"
                                         + log_path.read_text(errors="replace")[-3000:])
                    if time.monotonic() > deadline:
                        raise SystemExit(f"timed out after {args.timeout:g}s with {delivered} of "
                                         f"{recipients} delivered")
                    time.sleep(args.poll)
                busy = busy_share(busy0, machine_busy())
                relayd_cpu = process_cpu(relayd.pid)
                reactor_cpu = thread_cpu(relayd.pid, relayd.pid)
                sink_cpu = process_cpu(sink.pid) - sink_cpu0
                stop_process(relayd, grace=30)
                code = relayd.returncode
                relayd = None
                if spy is not None:
                    try:
                        spy.wait(30)
                    except subprocess.TimeoutExpired:
                        stop_process(spy)
                    spy = None
        with engine.connect() as conn:
            first, last = conn.execute(select(func.min(A.c.at), func.max(A.c.at))).one()
            in_first = conn.execute(select(func.count()).select_from(A).where(A.c.at == first)).scalar_one()
            n_attempts = conn.execute(select(func.count()).select_from(A)).scalar_one()
        sent_lines = sum(1 for line in open(log_path, "rb") if b"status=sent" in line)
        steady = (recipients - in_first) / (last - first) if last > first else float("nan")
        result.update(
            delivered=delivered, attempts=n_attempts, log_lines_sent=sent_lines, relayd_exit=code,
            seconds_from_start=t_done - t_start, rate_from_start=recipients / (t_done - t_start),
            first_delivery_after=first - t_start, seconds_first_to_last=last - first,
            rate=steady, relayd_cpu=relayd_cpu, reactor_cpu=reactor_cpu, sink_cpu=sink_cpu, machine_busy=busy)
        if args.keep_log:
            shutil.copy(log_path, args.keep_log)
        return result
    finally:
        if relayd is not None:
            stop_process(relayd, grace=10)
        if spy is not None:
            stop_process(spy)
        engine.dispose()


def raw_rate(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_raw_client.py"),
           "--messages", str(args.messages), "--domains", str(args.domains), "--size", str(args.size),
           "--connections", str(args.connections), "--timeout", str(args.timeout), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 60)
    if out.returncode != 0:
        raise SystemExit(f"bench_raw_client.py failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=20_000, help="messages to queue (20000)")
    parser.add_argument("--domains", "-d", type=int, default=10, help="recipient domains (10)")
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes (1024)")
    parser.add_argument("--connections", "-c", type=int, default=16,
                        help="delivery.concurrency, and the raw client's connections (16)")
    parser.add_argument("--per-domain-routes", action="store_true",
                        help="one route per domain (per_domain_concurrency = connections / domains) "
                             "instead of one routes.\"*\" destination")
    parser.add_argument("--batch-size", type=int, help="delivery.batch_size (default: relayd's)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="delivery.poll_interval (1.0)")
    parser.add_argument("--pg", action="store_true", help="a fresh schema in " + PG_SERVER_URL)
    parser.add_argument("--no-raw", action="store_true", help="skip the raw ESMTPClient comparison")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (300)")
    parser.add_argument("--poll", type=float, default=0.05, help="how often to count delivered recipients (0.05 s)")
    parser.add_argument("--py-spy", metavar="FILE", help="attach `py-spy record --gil -f raw -o FILE` to relayd (samples the thread "
                             "holding the GIL; slows relayd down)")
    parser.add_argument("--keep-log", metavar="FILE", help="copy relayd's log here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    command = command_line("bench_delivery.py", argv)
    stop_cleanly_on_sigterm()

    with tempfile.TemporaryDirectory(prefix="relay-bench-delivery-") as tmp:
        result = run_on_fresh_spool(run, args, Path(tmp), command)
    raw = None if args.no_raw else raw_rate(args)
    if raw is not None:
        result["raw"] = raw
        result["ratio"] = result["rate"] / raw["rate"]
        result["ratio_from_start"] = result["rate_from_start"] / raw["rate"]
    ok = (result["delivered"] == result["recipients"] and result["log_lines_sent"] == result["recipients"]
          and result["relayd_exit"] == 0)
    if args.json:
        print(json.dumps(result))
        return 0 if ok else 1
    r = result
    print(f"benchmark: {command}")
    print(f"sink:      {r['sink_command']}")
    print(f"relayd:    {r['relayd_command']}")
    print("config:    " + r["config"].replace("\n", "\n           ").rstrip())
    print(f"relayd ({r['spool']}): {r['recipients']} recipients ({r['messages']} messages x {args.size} B, "
          f"{args.domains} domains, {args.connections} connections)")
    print(f"  from the first delivery: {r['rate']:,.0f} messages/s "
          f"({r['seconds_first_to_last']:.2f} s; first delivery {r['first_delivery_after']:.2f} s after start)")
    print(f"  from relayd start:       {r['rate_from_start']:,.0f} messages/s ({r['seconds_from_start']:.2f} s)")
    print(f"  relayd CPU {r['relayd_cpu']:.1f} s ({r['reactor_cpu']:.1f} s in the reactor thread, the rest in the "
          f"spool and wake-up threads), sink CPU {r['sink_cpu']:.1f} s, machine {r['machine_busy']:.0%} busy; "
          f"{r['log_lines_sent']} status=sent log lines; relayd exited {r['relayd_exit']}")
    if raw is not None:
        print(f"raw client: {raw['command']}")
        print(f"  plain ESMTPClient, {raw['connections']} connections: {raw['rate']:,.0f} messages/s "
              f"({raw['seconds']:.2f} s, client CPU {raw['client_cpu']:.1f} s)")
        print(f"ratio relayd/raw: {r['ratio']:.0%} from the first delivery, {r['ratio_from_start']:.0%} from relayd start")
    if not ok:
        print("INCOMPLETE: not every recipient was delivered and logged, or relayd did not exit 0", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
