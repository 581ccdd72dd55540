#!/usr/bin/env python3
"""End-to-end benchmark: smtp-source -> relayd's submission listener -> spool -> drain -> smtp-sink.

Starts Postfix's ``smtp-sink`` on a free loopback port, a small SMTP
receiver of its own (a thread in this process that notes ``time.monotonic()``
when a message's final dot arrives) on another, and a real relayd
(``python -m relay.daemon --config FILE``, PYTHONPATH = the repository) with
``submission.listen = "127.0.0.1:PORT"``, delivery.tls = "none",
``routes."*"`` to smtp-sink and ``routes."latency.bench.test"`` to the
receiver, on a fresh SQLite spool in a temporary directory (default) or, with
``--pg``, a fresh schema in postgresql+psycopg://postgres@127.0.0.1/test.

1. Idle latency (``--samples`` (20) messages, after ``--warmup`` (2) not
   counted): for each, note the time, connect to the listener with smtplib,
   send one ~1 KiB message to ``seqN@latency.bench.test``, QUIT, and wait
   until the receiver has it; then wait ``--gap`` (0.5 s) so that relayd is
   idle again.  Latency = arrival at the receiver - the time before
   connecting.  Median, p90 and max are printed, with the split into
   "submitted" (until the 250 to the final dot) and "delivered" (from that
   250 to the arrival).
2. Throughput: ``smtp-source -s 8 -m 20000 -l 1024 -f sender@example.test
   -t rcpt@example.test 127.0.0.1:PORT`` (one connection per message, as
   smtp-source does without ``-d``; ``--reuse`` adds ``-d``).  The clock
   runs from starting smtp-source until the spool says all of its recipients
   are delivered (counted every ``--poll`` seconds; the exact end is the
   last delivery recorded in the spool's attempt history, relayd's clock).
   Printed: end-to-end messages/s and the submission-only rate (smtp-source's
   own wall time).

Every process it starts is stopped; each phase is bounded by ``--timeout``.

    python scripts/bench_e2e.py                 # SQLite
    python scripts/bench_e2e.py --pg            # PostgreSQL
    python scripts/bench_e2e.py --cpu-affinity 1  # relay.cpu_affinity = [1]
    python scripts/bench_e2e.py --reuse         # smtp-source -d: one connection per session
    python scripts/bench_e2e.py --py-spy out.txt  # py-spy record (raw) of relayd during the throughput phase

``scripts/bench_postfix.py`` runs the same load and measurements with a stock
Postfix as the relay, for a reference measured on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_delivery import (  # noqa: E402
    PG_SERVER_URL,
    command_line,
    run_on_fresh_spool,
    stop_cleanly_on_sigterm,
    toml_str,
)
from bench_raw_client import (  # noqa: E402
    busy_share,
    free_port,
    machine_busy,
    steal_seconds,
    process_cpu,
    thread_cpu,
    smtp_sink,
    stop_process,
    wait_listening,
)

SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "sender@example.test"
RECIPIENT = "rcpt@example.test"
LATENCY_DOMAIN = "latency.bench.test"


# -- the arrival-timing receiver ---------------------------------------------

class ArrivalReceiver:
    """A minimal SMTP receiver (a thread per connection) that notes when each
    message's final dot arrives: ``arrivals[token] = time.monotonic()``,
    where the token is the local part of the message's first recipient."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.arrivals: dict[str, float] = {}
        self.cond = threading.Condition()
        self._stopped = False
        threading.Thread(target=self._accept, name="arrival-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = conn.makefile("rb")
        send = conn.sendall
        token = None
        try:
            send(b"220 arrival.bench.test ESMTP\r\n")
            while True:
                line = reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    send(b"250-arrival.bench.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"RCPT":
                    if token is None:
                        start = line.find(b"<") + 1
                        token = line[start:line.find(b"@", start)].decode("ascii", "replace")
                    send(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    while True:
                        data = reader.readline()
                        if not data:
                            return
                        if data == b".\r\n":
                            now = time.monotonic()
                            with self.cond:
                                self.arrivals[token or "?"] = now
                                self.cond.notify_all()
                            break
                    token = None
                    send(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    send(b"221 2.0.0 Bye\r\n")
                    return
                else:      # HELO, MAIL, RSET, NOOP
                    send(b"250 Ok\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def wait_for(self, token: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while token not in self.arrivals:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.arrivals[token]

    def close(self) -> None:
        self._stopped = True
        self.sock.close()


# -- relayd --------------------------------------------------------------

def write_config(path: Path, *, spool_url: str, listen_port: int, sink_port: int, receiver_port: int,
                 connections: int | None, batch_size: int | None, cpu_affinity: str | None = None,
                 commit_delay: str | None = None, metrics_port: int | None = None) -> None:
    lines = [
        "[relay]",
        'hostname = "relay.bench.example"',
        'node = "bench"',
    ]
    if cpu_affinity:
        lines.append(f"cpu_affinity = [{cpu_affinity}]")
    lines += [
        "[spool]",
        f"url = {toml_str(spool_url)}",
        "[submission]",
        f'listen = "127.0.0.1:{listen_port}"',
    ]
    if commit_delay is not None:
        lines.append(f"commit_delay = {toml_str(commit_delay)}")
    if metrics_port:
        lines += ["[metrics]", f'listen = "127.0.0.1:{metrics_port}"']
    lines += [
        "[delivery]",
        'tls = "none"',
    ]
    if connections:
        lines += [f"concurrency = {connections}", f"per_domain_concurrency = {connections}"]
    if batch_size:
        lines.append(f"batch_size = {batch_size}")
    lines += ['[routes."*"]', 'host = "127.0.0.1"', f"port = {sink_port}",
              f'[routes."{LATENCY_DOMAIN}"]', 'host = "127.0.0.1"', f"port = {receiver_port}"]
    path.write_text("\n".join(lines) + "\n")


def latency_message(n: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <seq{n}@{LATENCY_DOMAIN}>\r\nSubject: latency {n}\r\n"
            f"Message-ID: <{n}.latency@example.test>\r\nDate: Sat, 21 Nov 2026 12:00:00 +0000\r\n\r\n").encode()
    line = b"X" * 78 + b"\r\n"
    return head + line * max(1, (1024 - len(head)) // len(line))


def measure_latency(port: int, receiver: ArrivalReceiver, samples: int, warmup: int, gap: float,
                    timeout: float) -> dict:
    total, submitted, greeted, before_data = [], [], [], []
    deadline = time.monotonic() + timeout
    for n in range(warmup + samples):
        if time.monotonic() > deadline:
            raise SystemExit(f"latency: timed out after {timeout:g}s ({n} messages sent)")
        token = f"seq{n}"
        data = latency_message(n)
        t0 = time.monotonic()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.bench.example", timeout=10) as client:
            t_greeted = time.monotonic()
            client.ehlo()
            for step, (code, text) in (("MAIL", client.mail(SENDER)),
                                       ("RCPT", client.rcpt(f"{token}@{LATENCY_DOMAIN}"))):
                if code != 250:
                    raise SystemExit(f"latency: message {n} got {code} {text!r} to {step}")
            t_data = time.monotonic()
            code, _ = client.data(data)
            t_ok = time.monotonic()
            if code != 250:
                raise SystemExit(f"latency: message {n} got {code} {_!r} after DATA")
        arrived = receiver.wait_for(token, 10.0)
        if arrived is None:
            raise SystemExit(f"latency: message {n} did not arrive within 10 s")
        if n >= warmup:
            total.append(arrived - t0)
            submitted.append(t_ok - t0)
            greeted.append(t_greeted - t0)
            before_data.append(t_data - t_greeted)
        time.sleep(gap)

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"samples": samples, "median_ms": 1000 * statistics.median(total), "p90_ms": ms(total, 0.9),
            "max_ms": 1000 * max(total), "min_ms": 1000 * min(total),
            "submitted_median_ms": 1000 * statistics.median(submitted),
            "greeting_median_ms": 1000 * statistics.median(greeted),
            "ehlo_to_rcpt_median_ms": 1000 * statistics.median(before_data),
            "data_median_ms": 1000 * statistics.median([s - g - b for s, g, b in zip(submitted, greeted, before_data)]),
            "delivered_median_ms": 1000 * statistics.median([a - s for a, s in zip(total, submitted)]),
            "all_ms": [round(1000 * t, 3) for t in total]}


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every running ``postgres`` process (the server's share of a --pg run)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() != "postgres":
                        continue
            except OSError:
                continue
            out[int(entry)] = process_cpu(int(entry))
    return out


def smtp_source_command(args: argparse.Namespace, port: int) -> list[str]:
    """The throughput load: smtp-source -s SESSIONS -m MESSAGES -l SIZE [-d] into 127.0.0.1:PORT."""
    cmd = [SMTP_SOURCE, "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size),
           "-f", SENDER, "-t", RECIPIENT]
    if args.reuse:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    return cmd


def run_smtp_source(args: argparse.Namespace, cmd: list[str], workdir: Path, count, check) -> dict:
    """Run ``cmd`` (smtp-source, output to WORKDIR/smtp-source.log) and poll until the relay has
    delivered all ``args.messages``: every ``args.poll`` seconds ``count()`` returns how many
    are delivered so far; while that is short, ``check(delivered)`` may raise to give up (a
    failed recipient, a dead relay).  Bounded by ``args.timeout``.  Returns the wall-clock
    times (``time.time()``) of the start, smtp-source's exit and the poll that saw all
    delivered, the last count and smtp-source's CPU seconds."""
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    source_log = open(workdir / "smtp-source.log", "wb")
    t_start = time.time()
    source = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=source_log, stderr=subprocess.STDOUT)
    t_source = None
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            if t_source is None and source.poll() is not None:
                t_source = time.time()
                children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if source.returncode != 0:
                    raise SystemExit(f"smtp-source exited {source.returncode}: "
                                     + (workdir / "smtp-source.log").read_text(errors="replace")[-2000:])
            delivered = count()
            if delivered >= args.messages and t_source is not None:
                t_done = time.time()
                break
            check(delivered)
            if time.monotonic() > deadline:
                raise SystemExit(f"throughput: timed out after {args.timeout:g}s with {delivered} of "
                                 f"{args.messages} delivered")
            time.sleep(args.poll)
    finally:
        if source.poll() is None:
            stop_process(source)
        source_log.close()
    source_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    return {"t_start": t_start, "t_source": t_source, "t_done": t_done, "delivered": delivered,
            "source_cpu": source_cpu}


def measure_throughput(args: argparse.Namespace, port: int, engine, relayd: subprocess.Popen,
                       sink: subprocess.Popen, workdir: Path) -> dict:
    from sqlalchemy import and_, func, select

    from relay.spool.schema import attempts as A
    from relay.spool.schema import recipients as R

    cmd = smtp_source_command(args, port)
    domain = RECIPIENT.rpartition("@")[2]
    delivered_q = select(func.count()).select_from(R).where(and_(R.c.state == "delivered", R.c.domain == domain))
    failed_q = select(func.count()).select_from(R).where(and_(R.c.state.in_(("deferred", "bounced")),
                                                             R.c.domain == domain))
    spy = None
    if args.py_spy:
        spy_cmd = [shutil.which("py-spy") or "py-spy", "record", "-r", "250", "-f", "raw",
                   "-o", str(Path(args.py_spy).resolve()), "--pid", str(relayd.pid)]
        if args.gil:
            spy_cmd.insert(2, "--gil")
        spy = subprocess.Popen(spy_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(1.0)                    # let it attach
    relayd_cpu0, sink_cpu0 = process_cpu(relayd.pid), process_cpu(sink.pid)
    reactor_cpu0 = thread_cpu(relayd.pid, relayd.pid)
    pg0 = postgres_cpu()
    busy0 = machine_busy()
    self_cpu0 = time.process_time()
    failed = 0

    def count() -> int:
        nonlocal failed
        with engine.connect() as conn:
            delivered = conn.execute(delivered_q).scalar_one()
            failed = conn.execute(failed_q).scalar_one() if delivered < args.messages else 0
        return delivered

    def check(delivered: int) -> None:
        if failed:
            raise SystemExit(f"{failed} recipient(s) were deferred or bounced; see relayd.log")
        if relayd.poll() is not None:
            raise SystemExit(f"relayd exited {relayd.returncode} during the run")

    run = run_smtp_source(args, cmd, workdir, count, check)
    t_start, t_source, t_done, delivered = run["t_start"], run["t_source"], run["t_done"], run["delivered"]
    busy1 = machine_busy()
    busy = busy_share(busy0, busy1)
    self_cpu = time.process_time() - self_cpu0
    pg1 = postgres_cpu()
    pg_cpu = sum(cpu - pg0.get(pid, 0.0) for pid, cpu in pg1.items() if cpu == cpu)
    relayd_cpu = process_cpu(relayd.pid) - relayd_cpu0
    reactor_cpu = thread_cpu(relayd.pid, relayd.pid) - reactor_cpu0
    sink_cpu = process_cpu(sink.pid) - sink_cpu0
    source_cpu = run["source_cpu"]
    # CPU the machine spent on anything but these processes and the PostgreSQL server (other
    # jobs, the kernel's own threads): a noisy machine shows here.
    all_cpu = (busy1[0] - busy0[0]) / os.sysconf("SC_CLK_TCK")
    other_cpu = all_cpu - relayd_cpu - sink_cpu - source_cpu - self_cpu - pg_cpu
    if spy is not None:
        spy.send_signal(signal.SIGINT)     # py-spy writes its file on SIGINT
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            stop_process(spy)
    with engine.connect() as conn:
        last = conn.execute(select(func.max(A.c.at)).select_from(A.join(R, A.c.recipient_id == R.c.id))
                            .where(R.c.domain == domain)).scalar_one()
    end = min(t_done, last) if last else t_done
    return {"command": " ".join(shlex.quote(c) for c in cmd), "messages": args.messages,
            "delivered": delivered, "seconds": end - t_start, "rate": args.messages / (end - t_start),
            "seconds_polled": t_done - t_start, "submission_seconds": t_source - t_start,
            "submission_rate": args.messages / (t_source - t_start), "relayd_cpu": relayd_cpu,
            "reactor_cpu": reactor_cpu, "sink_cpu": sink_cpu, "source_cpu": source_cpu, "bench_cpu": self_cpu, "other_cpu": other_cpu,
            "postgres_cpu": pg_cpu,
            "machine_busy": busy, "steal": steal_seconds(busy0, busy1),
            "py_spy_command": " ".join(spy_cmd) if args.py_spy else None}


def run(args: argparse.Namespace, workdir: Path, url: str, command: str) -> dict:
    from sqlalchemy import create_engine

    result: dict = {"command": command, "spool": "postgresql" if args.pg else "sqlite"}
    engine = create_engine(url)
    relayd = None
    receiver = ArrivalReceiver()
    try:
        with smtp_sink() as (sink, sink_port, sink_cmd):
            listen_port, metrics_port = free_port(), free_port()
            config = workdir / "relayd.toml"
            write_config(config, spool_url=url, listen_port=listen_port, sink_port=sink_port,
                         receiver_port=receiver.port, connections=args.connections, batch_size=args.batch_size,
                         cpu_affinity=args.cpu_affinity, commit_delay=args.commit_delay,
                         metrics_port=metrics_port)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *args.pythonpath]))
            env.pop("RELAY_CONFIG", None)
            env.pop("RELAY_SPOOL_URL", None)
            cmd = [args.python, "-m", args.relayd_module, "--config", str(config)]
            log_path = workdir / "relayd.log"
            result.update(relayd_python=interpreter_version(args.python), relayd_command=" ".join(shlex.quote(c) for c in cmd), sink_command=" ".join(sink_cmd),
                          config=config.read_text())
            with open(log_path, "wb") as log:
                relayd = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=log)
                try:
                    wait_listening("127.0.0.1", listen_port, timeout=30)
                except RuntimeError:
                    raise SystemExit("relayd did not start listening:\n"
                                     + log_path.read_text(errors="replace")[-3000:]) from None
                if args.samples:
                    result["latency"] = measure_latency(listen_port, receiver, args.samples, args.warmup,
                                                        args.gap, args.timeout)
                if args.messages:
                    commits0 = submission_commits(metrics_port)
                    result["throughput"] = measure_throughput(args, listen_port, engine, relayd, sink, workdir)
                    commits1 = submission_commits(metrics_port)
                    result["throughput"]["commits"] = commits1[0] - commits0[0]
                    result["throughput"]["committed"] = commits1[1] - commits0[1]
                stop_process(relayd, grace=30)
                result["relayd_exit"] = relayd.returncode
                relayd = None
            if args.keep_log:
                shutil.copy(log_path, args.keep_log)
        return result
    finally:
        receiver.close()
        if relayd is not None:
            stop_process(relayd, grace=10)
        engine.dispose()


def submission_commits(metrics_port: int) -> tuple[float, float]:
    """relayd's listener commits and the messages they committed so far,
    from its /metrics (``relay_submission_commits_total`` and
    ``relay_enqueued_total{source="submission"}``)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
              for family in text_string_to_metric_families(text) for sample in family.samples}
    return (values[("relay_submission_commits_total", ())],
            values[("relay_enqueued_total", (("source", "submission"),))])


def interpreter_version(python: str) -> str:
    """``python``'s path, version, and whether the interpreter runs from a
    shared libpython (position-independent code, slower) or is linked
    statically; see README "Performance" on interpreter builds."""
    probe = ("import os, platform, sys; "
             "maps = open('/proc/self/maps').read(); "
             "print(sys.executable, '(' + os.path.realpath(sys._base_executable) + ')', platform.python_version(), "
             "'libpython shared' if 'libpython' in maps else 'libpython static')")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load's options (smtp-source's and the latency phase's), shared with bench_postfix.py."""
    parser.add_argument("--messages", "-m", type=int, default=20_000, help="smtp-source -m: messages (20000; 0 skips)")
    parser.add_argument("--sessions", "-s", type=int, default=8, help="smtp-source -s: parallel sessions (8)")
    parser.add_argument("--size", "-l", type=int, default=1024, help="smtp-source -l: payload bytes (1024)")
    parser.add_argument("--reuse", action="store_true", help="smtp-source -d: several messages per connection")
    parser.add_argument("--samples", type=int, default=20, help="idle-latency messages (20; 0 skips)")
    parser.add_argument("--warmup", type=int, default=2, help="latency messages sent first and not counted (2)")
    parser.add_argument("--gap", type=float, default=0.5, help="pause after each latency message (0.5 s)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--timeout and --poll, shared with bench_postfix.py."""
    parser.add_argument("--timeout", type=float, default=300.0, help="bound of each phase, seconds (300)")
    parser.add_argument("--poll", type=float, default=0.1, help="how often to count delivered recipients (0.1 s)")


def latency_lines(lat: dict, label: str, path: str) -> list[str]:
    """The two text lines of an idle-latency result (``path``: e.g. "smtplib -> relayd -> receiver")."""
    return [f"idle latency ({label}, {lat['samples']} messages, {path}): "
            f"median {lat['median_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms, max {lat['max_ms']:.2f} ms "
            f"(min {lat['min_ms']:.2f})",
            f"  medians: submitted {lat['submitted_median_ms']:.2f} ms (connect+greeting "
            f"{lat['greeting_median_ms']:.2f}, EHLO/MAIL/RCPT {lat['ehlo_to_rcpt_median_ms']:.2f}, DATA to 250 "
            f"{lat['data_median_ms']:.2f}), then delivered {lat['delivered_median_ms']:.2f} ms"]


def throughput_lines(tp: dict, args: argparse.Namespace, label: str, seen: str) -> list[str]:
    """The load and rate lines of a throughput result (``seen``: what was polled, e.g. "the spool")."""
    return [f"throughput ({label}): {tp['messages']} messages x {args.size} B, {args.sessions} sessions"
            f"{' (-d)' if args.reuse else ''}",
            f"  end to end:      {tp['rate']:,.0f} messages/s ({tp['seconds']:.2f} s from smtp-source start "
            f"to the last delivery; {tp['seconds_polled']:.2f} s until {seen} was seen complete)",
            f"  submission only: {tp['submission_rate']:,.0f} messages/s ({tp['submission_seconds']:.2f} s, "
            f"smtp-source wall time)"]


def summary_parts(tp: dict | None, lat: dict | None) -> list[str]:
    summary = []
    if tp:
        summary.append(f"end-to-end {tp['rate']:,.0f} msgs/s, submission-only {tp['submission_rate']:,.0f} msgs/s")
    if lat:
        summary.append(f"idle latency median {lat['median_ms']:.2f} ms (p90 {lat['p90_ms']:.2f}, "
                       f"max {lat['max_ms']:.2f})")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser)
    parser.add_argument("--connections", "-c", type=int,
                        help="delivery.concurrency and per_domain_concurrency (default: relayd's)")
    parser.add_argument("--batch-size", type=int, help="delivery.batch_size (default: relayd's)")
    parser.add_argument("--cpu-affinity", metavar="CPUS",
                        help="relay.cpu_affinity, e.g. 1 or 0,1 (default: not pinned)")
    parser.add_argument("--commit-delay", metavar="DURATION",
                        help='submission.commit_delay, e.g. "1ms" or 0 for off (default: relayd\'s)')
    parser.add_argument("--pg", action="store_true", help="a fresh schema in " + PG_SERVER_URL)
    parser.add_argument("--python", metavar="PATH", default=sys.executable,
                        help="the interpreter that runs relayd (default: this one); it needs relay's "
                             "dependencies, e.g. a venv of Debian's /usr/bin/python3.11 with "
                             "'pip install .' (relayd's code is taken from this checkout)")
    add_run_arguments(parser)
    parser.add_argument("--py-spy", metavar="FILE", help="py-spy record -f raw of relayd during the throughput phase")
    parser.add_argument("--gil", action="store_true", help="with --py-spy: only samples holding the GIL")
    parser.add_argument("--relayd-module", metavar="MODULE", default="relay.daemon",
                        help="run relayd as 'python -m MODULE' (default relay.daemon): a wrapper for "
                             "experiments, e.g. one that starts relayd under strace or as two processes")
    parser.add_argument("--pythonpath", metavar="DIR", action="append", default=[],
                        help="with --relayd-module: a directory to add to relayd's PYTHONPATH (repeatable)")
    parser.add_argument("--keep-log", metavar="FILE", help="copy relayd's log here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if not os.path.exists(SMTP_SOURCE):
        sys.exit(f"{SMTP_SOURCE} is missing (Debian package postfix)")
    command = command_line("bench_e2e.py", argv)
    stop_cleanly_on_sigterm()

    with tempfile.TemporaryDirectory(prefix="relay-bench-e2e-") as tmp:
        result = run_on_fresh_spool(run, args, Path(tmp), command)
    ok = result.get("relayd_exit") == 0
    if args.json:
        print(json.dumps(result))
        return 0 if ok else 1
    r = result
    print(f"benchmark: {r['command']}")
    print(f"sink:      {r['sink_command']}")
    print(f"relayd:    {r['relayd_command']}")
    print(f"python:    {r['relayd_python']}")
    print("config:    " + r["config"].replace("\n", "\n           ").rstrip())
    lat = r.get("latency")
    if lat:
        print("\n".join(latency_lines(lat, r["spool"], "smtplib -> relayd -> receiver")))
    tp = r.get("throughput")
    if tp:
        print(f"source:    {tp['command']}")
        if tp["py_spy_command"]:
            print(f"py-spy:    {tp['py_spy_command']}")
        print("\n".join(throughput_lines(tp, args, r["spool"], "the spool")))
        print(f"  CPU: relayd {tp['relayd_cpu']:.1f} s ({tp['reactor_cpu']:.1f} s in the reactor thread; "
              f"{1e6 * tp['relayd_cpu'] / tp['messages']:.0f} us a message), smtp-source {tp['source_cpu']:.1f} s, "
              f"smtp-sink {tp['sink_cpu']:.1f} s, this script {tp['bench_cpu']:.1f} s, "
              f"postgres {tp['postgres_cpu']:.1f} s, "
              f"everything else {tp['other_cpu']:.1f} s; machine {tp['machine_busy']:.0%} busy, "
              f"{tp['steal']:.1f} s stolen by the hypervisor")
        if tp.get("commits"):
            print(f"  group commit: {tp['commits']:,.0f} listener commits, "
                  f"{tp['committed'] / tp['commits']:.1f} messages a commit")
    summary = summary_parts(tp, lat)
    summary.append(f"relayd exited {r.get('relayd_exit')}")
    print(f"summary ({r['spool']}): " + "; ".join(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
