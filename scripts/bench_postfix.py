#!/usr/bin/env python3
"""End-to-end benchmark of Postfix: smtp-source -> a private Postfix instance -> smtp-sink.

The reference for ``scripts/bench_e2e.py``: the same load and the same two
measurements, with a stock Postfix (Debian's ``postfix`` package, 3.7) as the
relay under test instead of relayd, on the same machine in the same session.

It starts Postfix's ``smtp-sink`` on a free loopback port, bench_e2e's
arrival-timing receiver (a thread in this process) on another, and a private
Postfix instance in a temporary directory: its own config_directory (a
main.cf and a master.cf written here, printed in full), queue_directory,
data_directory and ``maillog_file`` (with the ``postlog`` service; this
machine has no syslog), started with ``postfix -c DIR start`` as root (no
``alternate_config_directories`` needed; /etc/postfix is not changed, and the
system's own instance is stopped first: ``postfix stop``, errors ignored).  Postfix's SMTP server
listens on 127.0.0.1:PORT only, accepts relaying from 127.0.0.0/8 (the
default ``smtpd_relay_restrictions``), has no local delivery
(``mydestination`` empty, ``local_transport = error``) and no TLS, and
sends everything to ``relayhost = [127.0.0.1]:SINKPORT`` except
``latency.bench.test``, which ``transport_maps`` sends to the receiver.
Everything else (process limits, connection cache, queue manager, flow
control, ``max_use``, ...) is at Postfix's defaults; master.cf is Debian's
stock one without chroot and without the pipe(8) examples.

1. Idle latency: bench_e2e's ``measure_latency`` -- ``--samples`` (20)
   messages after ``--warmup`` (2), each with smtplib to Postfix's port, then
   waiting until the receiver has it, then ``--gap`` (0.5 s).
2. Throughput: ``smtp-source -s 8 -m 20000 -l 1024 -f sender@example.test
   -t rcpt@example.test 127.0.0.1:PORT`` (``--reuse`` adds ``-d``), run and
   polled by bench_e2e's ``run_smtp_source``.  The clock runs from starting
   smtp-source until Postfix's maillog has a ``status=sent`` line for every
   message (counted every ``--poll`` seconds; the exact end is the maillog's
   modification time when the last one was read, since its timestamps only
   have seconds).  Any ``status=deferred``/``bounced``/``expired`` line for
   the recipient fails the run, and so does a queue (maildrop, incoming,
   active, deferred, hold, corrupt) that does not empty afterwards.  CPU of
   Postfix = every process of the instance (the master's process group,
   read from /proc: their own CPU plus what the master reaped from the
   processes that exited, e.g. smtpd after its ``max_use`` of 100), split by
   process name as far as the polls saw the processes alive.

Postfix is always stopped (``postfix -c DIR stop``, then SIGKILL to whatever
is left of its process group) and the directory removed, also on errors and
Ctrl-C; each phase is bounded by ``--timeout``.  The maillog's warnings and
errors are printed.

    python scripts/bench_postfix.py             # the same defaults as bench_e2e.py
    python scripts/bench_postfix.py --reuse     # smtp-source -d: one connection per session
    python scripts/bench_postfix.py -m 2000 --samples 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_delivery import command_line, stop_cleanly_on_sigterm  # noqa: E402
from bench_e2e import (  # noqa: E402
    LATENCY_DOMAIN,
    RECIPIENT,
    SMTP_SOURCE,
    ArrivalReceiver,
    add_load_arguments,
    add_run_arguments,
    latency_lines,
    measure_latency,
    run_smtp_source,
    smtp_source_command,
    summary_parts,
    throughput_lines,
)
from bench_raw_client import (  # noqa: E402
    busy_share,
    free_port,
    machine_busy,
    steal_seconds,
    process_cpu,
    smtp_sink,
    wait_listening,
)

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"     # postconf -dh daemon_directory
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")

# Debian's stock master.cf (postfix 3.7.11) without chroot, with the SMTP server on
# 127.0.0.1:PORT, and without the pipe(8) examples (maildrop, uucp, ifmail, bsmtp,
# scalemail-backend, mailman), which nothing here uses.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def main_cf(root: Path, sink_port: int, receiver_port: int) -> str:
    """Every main.cf setting that differs from Postfix's built-in defaults (``postconf -n``)."""
    return "\n".join([
        "compatibility_level = 3.6",            # what Debian's (and upstream's) stock main.cf says
        f"queue_directory = {root}/queue",
        f"data_directory = {root}/data",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        "myhostname = postfix.bench.example",
        "mydestination =",
        "local_transport = error:5.1.1 local delivery is disabled",
        "alias_maps =",                         # the default's nis:mail.aliases warns in every smtpd
        "inet_interfaces = 127.0.0.1",
        "mynetworks = 127.0.0.0/8",
        f"relayhost = [127.0.0.1]:{sink_port}",
        f"transport_maps = inline:{{ {LATENCY_DOMAIN}=smtp:[127.0.0.1]:{receiver_port} }}",
        "smtpd_tls_security_level = none",
        "smtp_tls_security_level = none",
        f"maillog_file = {root}/maillog",
        f"maillog_file_prefixes = {root}",
    ]) + "\n"


# -- the instance's processes -------------------------------------------------

class _Stat(NamedTuple):
    """What the instance needs of /proc/PID/stat."""

    comm: str
    state: str
    pgrp: int
    cpu: float              # own user + system CPU, seconds
    children_cpu: float     # of its reaped children


def _stat(pid: int | str) -> _Stat | None:
    """/proc/PID/stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    tick = os.sysconf("SC_CLK_TCK")
    return _Stat(head.partition("(")[2], fields[0], int(fields[2]),
                 (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick)


class PostfixInstance:
    """A private Postfix: ROOT/conf (main.cf, master.cf), ROOT/queue, ROOT/data, ROOT/maillog."""

    def __init__(self, root: Path, listen_port: int, sink_port: int, receiver_port: int):
        self.root = root
        self.conf = root / "conf"
        self.queue = root / "queue"
        self.maillog = root / "maillog"
        self.listen_port = listen_port
        self.main_cf = main_cf(root, sink_port, receiver_port)
        self.master_cf = MASTER_CF.format(port=listen_port)
        self.master_pid: int | None = None
        self.running = False                    # between `postfix start` and `postfix stop`
        self.last: dict[int, tuple[str, float]] = {}   # pid -> (name, own CPU) when last seen

    def command(self, action: str) -> list[str]:
        return [POSTFIX, "-c", str(self.conf), action]

    def start(self) -> None:
        self.root.chmod(0o755)                  # the daemons (user postfix) must reach the queue
        self.conf.mkdir(mode=0o755)
        self.queue.mkdir(mode=0o755)            # postfix creates the rest (post-install create-missing)
        (self.conf / "main.cf").write_text(self.main_cf)
        (self.conf / "master.cf").write_text(self.master_cf)
        # The postfix command reports to the maillog (or to stderr if that is a terminal only).
        self.running = True
        done = subprocess.run(self.command("start"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=60)
        self.master_pid = self._read_master_pid()
        # (run() prints the end of the maillog when this fails.)
        if done.returncode != 0 or self.master_pid is None:
            raise SystemExit(f"postfix start exited {done.returncode}: {done.stdout.decode(errors='replace')}")
        try:
            wait_listening("127.0.0.1", self.listen_port, timeout=30)
        except RuntimeError:
            raise SystemExit("Postfix's smtpd does not listen.") from None

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log_tail(self, size: int = 3000) -> str:
        try:
            return "\n" + self.maillog.read_text(errors="replace")[-size:]
        except OSError:
            return " (no maillog)"

    def alive(self) -> bool:
        stat = _stat(self.master_pid) if self.master_pid else None
        return stat is not None and stat.pgrp == self.master_pid

    def pids(self) -> list[int]:
        """The master and every process in its process group (the master is a session leader)."""
        if not self.master_pid:
            return []
        try:
            with open(f"/proc/{self.master_pid}/task/{self.master_pid}/children") as f:
                children = [int(p) for p in f.read().split()]
            return [self.master_pid, *children]
        except OSError:
            return self.pids_in_group(zombies=True)

    def snapshot(self) -> dict[int, tuple[str, float, float]]:
        """pid -> (name, own CPU s, CPU s of its reaped children); notes each process's own CPU."""
        snap = {}
        for pid in self.pids():
            stat = _stat(pid)
            if stat is not None and stat.pgrp == self.master_pid:
                snap[pid] = (stat.comm, stat.cpu, stat.children_cpu)
                self.last[pid] = (stat.comm, stat.cpu)
        return snap

    def queued(self) -> dict[str, int]:
        out = {}
        for name in QUEUES:
            n = 0
            for _, _, files in os.walk(self.queue / name):
                n += len(files)
            out[name] = n
        return out

    def stop(self) -> int | None:
        """``postfix -c DIR stop``, then wait for the process group to go; SIGKILL what is left."""
        if not self.running:
            return None
        self.running = False
        if self.master_pid is None:             # start() failed half way?
            self.master_pid = self._read_master_pid()
        try:
            returncode: int | None = subprocess.run(
                self.command("stop"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, timeout=60).returncode
        except subprocess.TimeoutExpired:
            returncode = None                   # what is left is killed below
        if self.master_pid is None:
            return returncode
        deadline = time.monotonic() + 10
        while self.pids_in_group() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.pids_in_group():        # only Postfix's own programs, one by one
            try:
                if os.readlink(f"/proc/{pid}/exe").startswith(DAEMON_DIRECTORY + "/"):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.master_pid = None
        return returncode

    def pids_in_group(self, zombies: bool = False) -> list[int]:
        """Processes whose process group is the master's (zombies only if asked)."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _stat(entry)
                if stat is not None and stat.pgrp == self.master_pid and (zombies or stat.state != "Z"):
                    out.append(int(entry))
        return out


class MaillogCounter:
    """Counts the maillog's delivery results for RECIPIENT from the current end of the file on."""

    RESULT = re.compile(rb"to=<" + re.escape(RECIPIENT.encode()) + rb">,.* status=(\w+)")

    def __init__(self, path: Path):
        self.file = open(path, "rb")
        self.file.seek(0, os.SEEK_END)
        self.partial = b""
        self.sent = 0
        self.failed: list[str] = []
        self.mtime: float | None = None       # the maillog's mtime when the last one was read

    def count(self, wanted: int) -> int:
        data = self.file.read()
        if data:
            data, _, self.partial = (self.partial + data).rpartition(b"\n")
            for match in self.RESULT.finditer(data):
                if match.group(1) == b"sent":
                    self.sent += 1
                else:
                    line_start = data.rfind(b"\n", 0, match.start()) + 1
                    line_end = data.find(b"\n", match.end())
                    self.failed.append(data[line_start:line_end if line_end >= 0 else None]
                                       .decode(errors="replace"))
            if self.sent >= wanted and self.mtime is None:
                self.mtime = os.fstat(self.file.fileno()).st_mtime
        return self.sent

    def close(self) -> None:
        self.file.close()


def log_problems(path: Path) -> list[str]:
    """The maillog's warning/error/fatal/panic lines, without their timestamps and process ids."""
    out = []
    pattern = re.compile(r"^\S+ +\d+ [\d:]+ \S+ ([\w/-]+)\[\d+\]: ((?:warning|error|fatal|panic): .*)$")
    with open(path, errors="replace") as f:
        for line in f:
            if ": warning: " in line or ": error: " in line or ": fatal: " in line or ": panic: " in line:
                m = pattern.match(line.rstrip("\n"))
                out.append(f"{m.group(1)}: {m.group(2)}" if m else line.rstrip("\n"))
    return out


# -- the measurements -------------------------------------------------------

def measure_throughput(args: argparse.Namespace, postfix: PostfixInstance, sink: subprocess.Popen,
                       workdir: Path) -> dict:
    cmd = smtp_source_command(args, postfix.listen_port)
    counter = MaillogCounter(postfix.maillog)
    try:
        sink_cpu0 = process_cpu(sink.pid)
        snap0 = postfix.snapshot()
        busy0 = machine_busy()
        self_cpu0 = time.process_time()

        def count() -> int:
            postfix.snapshot()                  # notes the CPU of processes that may exit before the end
            return counter.count(args.messages)

        def check_failed() -> None:
            if counter.failed:
                raise SystemExit(f"{len(counter.failed)} recipient(s) were not delivered, e.g.\n"
                                 + "\n".join(counter.failed[:5]))

        def check(delivered: int) -> None:
            check_failed()
            if not postfix.alive():
                raise SystemExit("the Postfix master exited during the run.")

        timed = run_smtp_source(args, cmd, workdir, count, check)
        busy1 = machine_busy()
        self_cpu = time.process_time() - self_cpu0
        snap1 = postfix.snapshot()
        sink_cpu = process_cpu(sink.pid) - sink_cpu0
    finally:
        counter.close()
    t_start, t_source, t_done = timed["t_start"], timed["t_source"], timed["t_done"]
    check_failed()                              # the lines read after the last poll too
    # Exact total: own + reaped CPU now, minus the same at the start (a process that exited in
    # between moved its CPU into the master's reaped share).
    postfix_cpu = (sum(own + reaped for _, own, reaped in snap1.values())
                   - sum(own + reaped for _, own, reaped in snap0.values()))
    by_name: dict[str, float] = {}
    for pid, (name, own) in postfix.last.items():     # own CPU when last seen alive (or now)
        base = snap0[pid][1] if pid in snap0 else 0.0
        by_name[name] = by_name.get(name, 0.0) + own - base
    by_name = {name: round(cpu, 3) for name, cpu in sorted(by_name.items(), key=lambda kv: -kv[1]) if cpu > 0}
    unattributed = postfix_cpu - sum(by_name.values())
    all_cpu = (busy1[0] - busy0[0]) / os.sysconf("SC_CLK_TCK")
    other_cpu = all_cpu - postfix_cpu - sink_cpu - timed["source_cpu"] - self_cpu
    end = min(t_done, counter.mtime) if counter.mtime else t_done
    # Deliveries are logged just before the queue file goes: wait (untimed) for the queues to empty.
    deadline = time.monotonic() + 30
    while any((queued := postfix.queued()).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if any(queued.values()):
        raise SystemExit(f"Postfix's queues are not empty after the run: {queued}")
    return {"command": " ".join(shlex.quote(c) for c in cmd), "messages": args.messages,
            "delivered": timed["delivered"], "seconds": end - t_start, "rate": args.messages / (end - t_start),
            "seconds_polled": t_done - t_start, "submission_seconds": t_source - t_start,
            "submission_rate": args.messages / (t_source - t_start), "postfix_cpu": postfix_cpu,
            "postfix_cpu_by_process": by_name, "postfix_cpu_unattributed": unattributed,
            "sink_cpu": sink_cpu, "source_cpu": timed["source_cpu"], "bench_cpu": self_cpu,
            "other_cpu": other_cpu, "machine_busy": busy_share(busy0, busy1),
            "steal": steal_seconds(busy0, busy1)}


def stop_system_postfix() -> None:
    """The system's own instance (/etc/postfix) stays stopped; errors (not running) are ignored."""
    subprocess.run([POSTFIX, "stop"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60, check=False)


def run(args: argparse.Namespace, root: Path, command: str) -> dict:
    version = subprocess.run([POSTCONF, "-dh", "mail_version"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    result: dict = {"command": command, "postfix_version": version}
    receiver = ArrivalReceiver()
    postfix = None
    try:
        with smtp_sink() as (sink, sink_port, sink_cmd):
            postfix = PostfixInstance(root, free_port(), sink_port, receiver.port)
            result.update(sink_command=" ".join(sink_cmd),
                          postfix_command=" ".join(shlex.quote(c) for c in postfix.command("start")),
                          main_cf=postfix.main_cf, master_cf=postfix.master_cf)
            postfix.start()
            if args.samples:
                result["latency"] = measure_latency(postfix.listen_port, receiver, args.samples, args.warmup,
                                                    args.gap, args.timeout)
            if args.messages:
                result["throughput"] = measure_throughput(args, postfix, sink, root)
            result["postfix_stop_exit"] = postfix.stop()
        return result
    except BaseException:
        if postfix is not None:
            print("the end of Postfix's maillog:" + postfix.log_tail(), file=sys.stderr)
        raise
    finally:
        receiver.close()
        if postfix is not None:
            postfix.stop()
            if postfix.maillog.exists():
                result["log_problems"] = log_problems(postfix.maillog)
                if args.keep_log:
                    with open(postfix.maillog, "rb") as src, open(args.keep_log, "wb") as dst:
                        dst.write(src.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument("--keep-log", metavar="FILE", help="copy Postfix's maillog here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    for path in (SMTP_SOURCE, POSTFIX, POSTCONF):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing (Debian package postfix)")
    if os.geteuid() != 0:
        sys.exit("run this as root: Postfix starts as root and drops to mail_owner = postfix")
    command = command_line("bench_postfix.py", argv)
    stop_cleanly_on_sigterm()                   # so that Postfix is stopped on `kill` too

    stop_system_postfix()
    with tempfile.TemporaryDirectory(prefix="relay-bench-postfix-") as tmp:
        result = run(args, Path(tmp), command)
    ok = result.get("postfix_stop_exit") == 0
    if args.json:
        print(json.dumps(result))
        return 0 if ok else 1
    r = result
    print(f"benchmark: {r['command']}")
    print(f"sink:      {r['sink_command']}")
    print(f"postfix:   {r['postfix_command']} (Postfix {r['postfix_version']})")
    print("main.cf:   " + r["main_cf"].replace("\n", "\n           ").rstrip())
    print("master.cf: " + r["master_cf"].replace("\n", "\n           ").rstrip())
    lat = r.get("latency")
    if lat:
        print("\n".join(latency_lines(lat, "postfix", "smtplib -> postfix -> receiver")))
    tp = r.get("throughput")
    if tp:
        print(f"source:    {tp['command']}")
        print("\n".join(throughput_lines(tp, args, "postfix", "the maillog")))
        split = ", ".join(f"{name} {cpu:.1f}" for name, cpu in tp["postfix_cpu_by_process"].items()
                          if cpu >= 0.05)
        print(f"  CPU: postfix {tp['postfix_cpu']:.1f} s ({1e6 * tp['postfix_cpu'] / tp['messages']:.0f} us a "
              f"message; by process: {split}, exited unseen {tp['postfix_cpu_unattributed']:.1f}), "
              f"smtp-source {tp['source_cpu']:.1f} s, smtp-sink {tp['sink_cpu']:.1f} s, "
              f"this script {tp['bench_cpu']:.1f} s, everything else {tp['other_cpu']:.1f} s; "
              f"machine {tp['machine_busy']:.0%} busy, {tp['steal']:.1f} s stolen by the hypervisor")
    problems = r.get("log_problems", [])
    distinct: dict[str, int] = {}
    for line in problems:
        distinct[line] = distinct.get(line, 0) + 1
    print(f"maillog:   {len(problems)} warning/error lines" + "".join(
        f"\n           {n} x {line}" for line, n in list(distinct.items())[:10]))
    summary = summary_parts(tp, lat)
    summary.append(f"postfix stopped (exit {r.get('postfix_stop_exit')})")
    print("summary (postfix): " + "; ".join(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
