#!/usr/bin/env python3
"""Benchmark the raw rate of a plain Twisted ESMTPClient into a local smtp-sink.

The reference for ``scripts/bench_delivery.py``: no spool, no drain, just a
plain ``twisted.mail.smtp.ESMTPClient`` subclass (the stock state machine,
RSET after every message, LineLog on) with TCP_NODELAY set, the body handed
over in wire form (CRLF, dot-stuffed) and a no-op ``transformChunk``, over
``--connections`` (16) reused connections pulling from one shared queue.
The messages are the ones bench_delivery.py queues: ``--messages`` (20,000)
of about 1 KiB, one recipient each, across ``--domains`` (10) domains.

Postfix's ``smtp-sink`` (``/usr/sbin/smtp-sink``) is started on a free
loopback port and stopped afterwards (``--sink HOST:PORT`` uses a running
one instead).  The clock runs from the first connection attempt until the
last message has its final reply; the run is bounded by ``--timeout``.

    python scripts/bench_raw_client.py
    python scripts/bench_raw_client.py --messages 20000 --connections 16 --json
    python scripts/bench_raw_client.py --lean     # debug=False and no RSET

``--lean`` is the notes' "fast" client (§8 of shared/notes/twisted.md): it
drops the LineLog and the RSET after a completed transaction, like relayd.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Iterator

SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "bench@sender.example.com"


# -- the messages (shared with bench_delivery.py) ---------------------------

def domains(count: int) -> list[str]:
    return [f"d{k}.bench.example" for k in range(count)]


def make_messages(count: int, n_domains: int, size: int = 1024) -> list[tuple[str, str, bytes]]:
    """``count`` messages of ``size`` bytes (CRLF lines), one recipient each,
    round-robin over ``n_domains`` domains: (sender, recipient, data)."""
    doms = domains(n_domains)
    filler = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    out = []
    for n in range(count):
        rcpt = f"user{n}@{doms[n % n_domains]}"
        head = (f"From: Bench <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: benchmark message {n}\r\n"
                f"Message-ID: <{n}.bench@sender.example.com>\r\nDate: Sat, 21 Nov 2026 12:00:00 +0000\r\n"
                f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
        body = bytearray(head)
        while len(body) + len(filler) <= size - 2:
            body += filler
        pad = size - len(body) - 2
        body += b"x" * max(0, pad) + b"\r\n"
        out.append((SENDER, rcpt, bytes(body)))
    return out


def to_wire(data: bytes) -> bytes:
    """CRLF data, dot-stuffed (the first line too), without the final dot."""
    wire = data.replace(b"\r\n.", b"\r\n..")
    return b"." + wire if wire[:1] == b"." else wire


# -- the sink ----------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:g}s")
            time.sleep(0.02)


def sink_command(host: str, port: int) -> list[str]:
    cmd = [SMTP_SINK]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]       # smtp-sink refuses to run as root without it
    return cmd + [f"{host}:{port}", "1000"]


@contextmanager
def smtp_sink(host: str = "127.0.0.1") -> Iterator[tuple[subprocess.Popen, int, list[str]]]:
    """Start smtp-sink on a free loopback port; stop it on the way out."""
    if not host.startswith("127."):
        raise ValueError("the sink listens on loopback only")
    if not os.path.exists(SMTP_SINK):
        sys.exit(f"{SMTP_SINK} is missing (Debian package postfix)")
    port = free_port(host)
    cmd = sink_command(host, port)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(host, port)
        yield proc, port, cmd
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stat_cpu(path: str) -> float:
    """CPU seconds (user + system) in a Linux ``/proc/.../stat`` file; NaN if unreadable."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``."""
    return _stat_cpu(f"/proc/{pid}/stat")


def thread_cpu(pid: int, tid: int) -> float:
    """CPU seconds of one thread of ``pid`` (relayd's main thread, ``tid == pid``, runs the reactor)."""
    return _stat_cpu(f"/proc/{pid}/task/{tid}/stat")


def machine_busy() -> tuple[float, float, float]:
    """(busy, total, steal) jiffies of all CPUs, from /proc/stat: busy is user,
    nice, system, irq and softirq; total adds idle and iowait.  Steal (time
    the hypervisor gave to other guests) is neither, and guest time is
    already in user."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait, steal


def busy_share(before: tuple[float, ...], after: tuple[float, ...]) -> float:
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total else float("nan")


def steal_seconds(before: tuple[float, ...], after: tuple[float, ...]) -> float:
    """CPU seconds the hypervisor took from this machine's CPUs in between: a
    run with much of it ran on a slower machine (every process, not one)."""
    return (after[2] - before[2]) / os.sysconf("SC_CLK_TCK")


# -- the client --------------------------------------------------------------

def run_client(host: str, port: int, jobs: list[tuple[str, str, bytes]], connections: int,
               lean: bool, timeout: float) -> dict:
    from twisted.internet import protocol, reactor
    from twisted.mail import smtp

    queue = deque((sender, [rcpt], to_wire(data)) for sender, rcpt, data in jobs)
    total = len(queue)
    state = {"ok": 0, "failed": 0, "first": None, "last": None, "closed": 0, "timed_out": False}

    class WireClient(smtp.ESMTPClient):
        current = None

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)      # Nagle costs ~40 ms a message
            smtp.ESMTPClient.connectionMade(self)

        def getMailFrom(self):
            if not queue:
                self.current = None
                return None                          # QUIT
            self.current = queue.popleft()
            return self.current[0]

        def getMailTo(self):
            return self.current[1]

        def getMailData(self):
            return BytesIO(self.current[2])

        def transformChunk(self, chunk):
            self.resetTimeout()                      # already wire form
            return chunk

        def sentMail(self, code, resp, numOk, addresses, log):
            if 200 <= code < 300 and numOk == len(self.current[1]):
                state["ok"] += 1
            else:
                state["failed"] += 1
            self.current = None
            if state["ok"] + state["failed"] == total:
                state["last"] = time.perf_counter()

        def sendError(self, exc):
            state["failed"] += 1 if self.current is not None else 0
            self.current = None
            smtp.ESMTPClient.sendError(self, exc)

        if lean:
            debug = False

            def smtpState_msgSent(self, code, resp):
                # No RSET after a transaction that reached its final reply
                # (notes §3); every message here reaches one or fails the run.
                if self._from is not None:
                    self.sentMail(code, resp, len(self.successAddresses), self.toAddressesResult, self.log)
                self.toAddressesResult = []
                self._from = None
                self.smtpState_from(code, resp)

    class Factory(protocol.ClientFactory):
        noisy = False

        def buildProtocol(self, addr):
            p = WireClient(None, None, b"bench.client.example")
            p.timeout = 30
            p.requireTransportSecurity = False
            p.heloFallback = True
            p.factory = self
            return p

        def clientConnectionFailed(self, connector, reason):
            print(f"connect failed: {reason.getErrorMessage()}", file=sys.stderr)
            done()

        def clientConnectionLost(self, connector, reason):
            done()

    def done():
        state["closed"] += 1
        if state["closed"] == connections and reactor.running:
            reactor.stop()

    def give_up():
        state["timed_out"] = True
        if reactor.running:
            reactor.stop()

    def start():
        state["first"] = time.perf_counter()
        for _ in range(connections):
            reactor.connectTCP(host, port, Factory(), timeout=10)

    reactor.callWhenRunning(start)
    timer = reactor.callLater(timeout, give_up)
    cpu0 = time.process_time()
    reactor.run()
    cpu = time.process_time() - cpu0
    if timer.active():
        timer.cancel()
    end = state["last"] or time.perf_counter()
    elapsed = end - state["first"]
    return {"messages": total, "delivered": state["ok"], "failed": state["failed"], "seconds": elapsed,
            "rate": state["ok"] / elapsed if elapsed > 0 else 0.0, "client_cpu": cpu,
            "timed_out": state["timed_out"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=20_000, help="messages to send (20000)")
    parser.add_argument("--domains", "-d", type=int, default=10, help="recipient domains (10)")
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes (1024)")
    parser.add_argument("--connections", "-c", type=int, default=16, help="reused connections (16)")
    parser.add_argument("--lean", action="store_true", help="debug=False and no RSET after a transaction")
    parser.add_argument("--sink", metavar="HOST:PORT", help="a running sink instead of starting smtp-sink")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (300)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    jobs = make_messages(args.messages, args.domains, args.size)
    command = " ".join([Path(sys.executable).name, "scripts/bench_raw_client.py", *(argv if argv is not None else sys.argv[1:])])

    def measure(host: str, port: int, sink_pid: int | None, sink_cmd: list[str] | None) -> dict:
        sink_cpu0 = process_cpu(sink_pid) if sink_pid else float("nan")
        busy0 = machine_busy()
        result = run_client(host, port, jobs, args.connections, args.lean, args.timeout)
        result["machine_busy"] = busy_share(busy0, machine_busy())
        result["sink_cpu"] = (process_cpu(sink_pid) - sink_cpu0) if sink_pid else None
        result["sink_command"] = " ".join(sink_cmd) if sink_cmd else None
        return result

    if args.sink:
        host, _, port = args.sink.rpartition(":")
        result = measure(host, int(port), None, None)
    else:
        with smtp_sink() as (proc, port, cmd):
            result = measure("127.0.0.1", port, proc.pid, cmd)
    result.update(command=command, connections=args.connections, client="lean" if args.lean else "plain",
                  size=args.size, domains=args.domains)
    if args.json:
        print(json.dumps(result))
    else:
        sink = f", sink CPU {result['sink_cpu']:.1f} s" if result["sink_cpu"] is not None else ""
        print(f"sink:   {result['sink_command'] or args.sink}")
        print(f"client: {command}")
        print(f"raw ESMTPClient ({result['client']}, {args.connections} connections): {result['delivered']} of "
              f"{result['messages']} messages in {result['seconds']:.2f} s = {result['rate']:,.0f} messages/s "
              f"(client CPU {result['client_cpu']:.1f} s{sink}, machine {result['machine_busy']:.0%} busy)")
    if result["timed_out"] or result["delivered"] != result["messages"]:
        print(f"incomplete: {result['delivered']} delivered, {result['failed']} failed"
              f"{', timed out' if result['timed_out'] else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
