"""relayd (and the twist/twistd plugin) as real subprocesses, on both spools.

Peers are scripted aiosmtpd servers in this process (relay.testing.SMTPPeer)
on 127.0.0.x loopback addresses; relayd reaches them through a ``"*"`` route,
or through the DNS fixture process (``python -m relay.testing_dns``) with
``dns.nameservers`` and ``delivery.port``.  The in-process drain scenarios
live in tests/integration/test_drain.py; these tests cover what only a real
process shows: SIGKILL and restart, SIGTERM, exit codes, stderr and the
Twisted plugin runners.
"""

from __future__ import annotations

import re
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import relay
from relay.message import parse_message
from relay.testing import SMTPPeer, free_port

from relayd_harness import (
    REPO,
    SIGKILL,
    SIGTERM,
    Processes,
    SpoolReader,
    message_bytes,
    message_id_of,
    relayctl,
    status_json,
    wait_until,
    write_config,
    write_mbox,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def procs(tmp_path):
    """Starts subprocesses for a test and kills whatever is left at the end."""
    p = Processes(tmp_path)
    yield p
    p.cleanup()


@pytest.fixture
def peers():
    """``peers(ip, **kw)`` starts an SMTPPeer on ``ip`` and a free port; all are stopped at the end."""
    started: list[SMTPPeer] = []

    def start(ip: str, **kwargs) -> SMTPPeer:
        peer = SMTPPeer(ip, free_port(ip), **kwargs).start()
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


@pytest.fixture
def reader(spool_url):
    """A second connection on the test's spool, for snapshots while relayd runs."""
    opened: list[SpoolReader] = []

    def open_reader() -> SpoolReader:
        r = SpoolReader(spool_url)
        opened.append(r)
        return r

    yield open_reader
    for r in opened:
        r.close()


def _arrivals(peer: SMTPPeer) -> Counter:
    """How many times the peer accepted each Message-ID."""
    with peer.log.lock:
        datas = [m.data for m in peer.log.messages]
    return Counter(message_id_of(d) for d in datas)


def test_sigkill_and_restart_loses_nothing_and_duplicates_only_what_was_in_flight(
        spool_url, tmp_path, procs, peers, reader):
    """After SIGKILL mid-drain and a restart with the same node, all 1,000 messages arrive, and only recipients in flight at the kill may arrive twice."""
    total = 1000
    peer = peers("127.0.0.21")
    config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node="node-crash",
                          route_host=peer.host, route_port=peer.port,
                          extra={"delivery": {"lease": "5m", "batch_size": 200, "poll_interval": "0.2s"}})
    mbox = write_mbox(tmp_path / "bulk.mbox",
                      (message_bytes(n, f"user{n}@crash.test", "crash") for n in range(total)))
    queued = relayctl("--config", str(config), "enqueue", "--mbox", str(mbox))
    assert queued.returncode == 0, queued.stderr.decode()
    assert len(queued.stdout.split()) == total
    expected = {f"<crash-{n}@relay-tests>" for n in range(total)}

    first = procs.relayd(config, "relayd-first")
    wait_until(lambda: len(peer.log.messages) >= 300 or not first.alive(), 30,
               "a few hundred messages to arrive", interval=0.005)
    first.signal(SIGKILL)
    assert first.wait(10) == -SIGKILL
    arrived_at_kill = set(_arrivals(peer))
    assert 0 < len(arrived_at_kill) < total, "the kill must land in the middle of the drain"

    snapshot = reader().rows()
    assert len(snapshot) == total
    delivered_at_kill = {r.message_id for r in snapshot if r.state == "delivered"}
    inflight_at_kill = {r.message_id for r in snapshot if r.state == "inflight"}
    assert {r.lease_owner for r in snapshot if r.state == "inflight"} <= {"node-crash"}
    assert inflight_at_kill, "some recipients must have been in flight at the kill"
    assert arrived_at_kill <= delivered_at_kill | inflight_at_kill, "only claimed mail can have been sent"

    started = time.monotonic()
    second = procs.relayd(config, "relayd-second")
    took_back = second.wait_for_output(r"took back (\d+) recipient\(s\)", 15)
    assert int(took_back.group(1)) == len(inflight_at_kill)
    spool = reader()
    # delivery.lease is 5 minutes: only taking the claims back at start can finish within the deadline.
    wait_until(lambda: spool.counts()["delivered"] == total, 30, "the spool to record all 1,000 delivered")
    drain_seconds = time.monotonic() - started
    second.signal(SIGTERM)
    assert second.wait(15) == 0, second.stderr()[-2000:]

    counts = spool.counts()
    assert counts["delivered"] == total and counts["inflight"] == 0
    arrivals = _arrivals(peer)
    assert set(arrivals) == expected, "every queued message arrived at the peer"
    duplicates = {mid: n - 1 for mid, n in arrivals.items() if n > 1}
    # With SIGKILL only SPEC window (b) exists: the peer said 2xx but the spool had not recorded it yet,
    # so a duplicate can only be a recipient relayd held in flight when it died, and at most once more.
    assert set(duplicates) <= inflight_at_kill, sorted(set(duplicates) - inflight_at_kill)[:5]
    # ...and every such recipient that had reached the peer is sent again (relayd cannot know it arrived).
    assert arrived_at_kill - delivered_at_kill <= set(duplicates)
    assert all(extra == 1 for extra in duplicates.values()), duplicates
    assert sum(duplicates.values()) <= len(inflight_at_kill)
    assert all(arrivals[mid] == 1 for mid in delivered_at_kill)
    print(f"\n[{spool_url.split(':')[0]}] arrived before kill {len(arrived_at_kill)}, "
          f"delivered at kill {len(delivered_at_kill)}, in flight at kill {len(inflight_at_kill)}, "
          f"duplicates {sum(duplicates.values())}, restart drained the rest in {drain_seconds:.1f}s")


def test_sigterm_finishes_transactions_in_progress_and_releases_the_rest(
        spool_url, tmp_path, procs, peers, reader):
    """SIGTERM during slow transactions: relayd exits 0 promptly, the started ones are delivered, the rest are queued again, nothing is left in flight."""
    peer = peers("127.0.0.22", slow_seconds=2.0)
    config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node="node-stop",
                          route_host=peer.host, route_port=peer.port,
                          extra={"delivery": {"per_domain_concurrency": 3, "command_timeout": "20s"}})
    with relay.open(str(config)) as outbox:
        outbox.enqueue_many(parse_message(message_bytes(n, f"fast{n}@stop.test", "fast")) for n in range(50))
        outbox.enqueue_many(parse_message(message_bytes(n, f"slow{n}@stop.test", "slow")) for n in range(10))

    def slow_seen() -> set[str]:
        with peer.log.lock:
            return {a for a, n in peer.log.rcpt_seen.items() if a.startswith("slow") and n}

    daemon = procs.relayd(config)
    started_before_term = wait_until(lambda: len(slow_seen()) >= 2 and slow_seen(), 20,
                                     "slow transactions to be in progress", interval=0.01)
    daemon.signal(SIGTERM)
    t0 = time.monotonic()
    assert daemon.wait(12) == 0, daemon.stderr()[-2000:]     # the drain's own deadline is 30 s
    stop_seconds = time.monotonic() - t0

    report = status_json(config)
    assert report["recipients"]["inflight"] == 0
    assert report["recipients"]["deferred"] == 0, "no transaction in progress was cut off"
    assert report["recipients"]["bounced"] == 0
    assert report["recipients"]["delivered"] + report["recipients"]["queued"] == 60

    rows = {r.address: r for r in reader().rows()}
    assert len(rows) == 60
    started = slow_seen()            # the transactions relayd had begun when it took the signal
    assert started_before_term <= started
    for address in started:
        assert rows[address].state == "delivered", (address, rows[address])
    assert all(r.attempts == 0 for r in rows.values() if r.state == "queued"), "released, not attempted"
    assert any(a.startswith("slow") and r.state == "queued" for a, r in rows.items()), \
        "slow mail not started before SIGTERM goes back to the queue"
    received = Counter(a for a in peer.log.recipients())
    assert all(n == 1 for n in received.values()), received
    assert set(received) == {a for a, r in rows.items() if r.state == "delivered"}
    print(f"\n[{spool_url.split(':')[0]}] stopped {stop_seconds:.1f}s after SIGTERM, "
          f"{len(started)} slow transaction(s) finished, {report['recipients']['queued']} released")


def test_start_line_and_per_recipient_log_lines(spool_url, tmp_path, procs, peers):
    """relayd prints its spool at start, one SPEC-format log line per recipient (sent, deferred, bounced; MX found through DNS), and exits 0 on SIGINT."""
    ip = "127.0.0.23"
    peer = peers(ip)
    dns_port = procs.dns({"logs.test": {"MX": [[10, "mx1.logs.test"]]},
                          "mx1.logs.test": {"A": [ip]},
                          "sender.test": {"MX": [[10, "mx1.logs.test"]]}})
    config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node="node-logs",
                          extra={"dns": {"nameservers": [f"127.0.0.1:{dns_port}"]},
                                 "delivery": {"port": peer.port}})
    with relay.open(str(config)) as outbox:
        qid = outbox.enqueue(message_bytes(1, "ok@logs.test, temp@logs.test, perm@logs.test", "logs"))

    daemon = procs.relayd(config)
    relay_part = rf"relay=mx1\.logs\.test\[{re.escape(ip)}\]:{peer.port}, delay=\d+(?:\.\d+)?, attempts=1"
    sent = daemon.wait_for_output(
        rf"(?:^|\s){qid}: to=<ok@logs\.test>, {relay_part}, status=sent \(250 2\.0\.0 Queued\)$", 20)
    daemon.wait_for_output(
        rf"(?:^|\s){qid}: to=<temp@logs\.test>, {relay_part}, "
        rf"status=deferred \(450 4\.2\.0 Mailbox temporarily unavailable\)$", 10)
    daemon.wait_for_output(
        rf"(?:^|\s){qid}: to=<perm@logs\.test>, {relay_part}, status=bounced \(550 5\.1\.1 No such user\)$", 10)
    daemon.signal(signal.SIGINT)          # SPEC: SIGINT stops it gracefully too
    assert daemon.wait(15) == 0
    stderr = daemon.stderr()
    assert stderr.splitlines()[0] == f"relayd starting: node node-logs, hostname relay.test, spool {spool_url}"
    assert daemon.stdout() == "", "relayd logs to stderr only"
    assert "Traceback" not in stderr
    assert sent.group(0).strip().startswith(qid)
    assert peer.log.recipients().count("ok@logs.test") == 1


def assert_refused_before_the_spool(daemon, spool_url: str, sentence: str) -> None:
    """relayd exited 64 with ``sentence`` as its only output line, nothing on stdout, spool untouched."""
    assert daemon.wait(20) == 64
    lines = daemon.stderr().splitlines()
    assert lines == [f"relayd: {sentence}"], lines
    assert daemon.stdout() == ""
    if spool_url.startswith("sqlite:///"):
        assert not Path(spool_url[len("sqlite:///"):]).exists(), "a refused config must not touch the spool"


def test_unknown_configuration_key_exits_64_with_one_sentence(spool_url, tmp_path, procs):
    """A config with an unknown key makes relayd exit 64 with one sentence naming the key, no traceback, nothing on stdout."""
    config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node="node-bad",
                          extra={"delivery": {"retries_please": 3}})
    assert_refused_before_the_spool(procs.relayd(config), spool_url,
                                    "delivery.retries_please is not a known configuration key.")


def test_unreadable_submission_tls_file_exits_64_with_one_sentence(spool_url, tmp_path, procs):
    """submission.tls_cert naming a file that does not exist: relayd exits 64 with one sentence naming it, before the spool."""
    missing = tmp_path / "tls" / "cert.pem"
    config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node="node-tls",
                          extra={"submission": {"listen": f"127.0.0.1:{free_port()}",
                                                "tls_cert": str(missing), "tls_key": str(tmp_path / "key.pem")}})
    assert_refused_before_the_spool(procs.relayd(config), spool_url,
                                    f"submission.tls_cert {missing} cannot be read (no such file or directory).")


def test_metrics_listen_host_name_exits_64_with_one_sentence(spool_url, tmp_path, procs):
    """metrics.listen naming a host, not an address: relayd exits 64 with one sentence before the spool
    (not 69 after failing to listen, which the systemd unit would restart for ever)."""
    config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node="node-metrics",
                          extra={"metrics": {"listen": "metrics.invalid:27599"}})
    assert_refused_before_the_spool(procs.relayd(config), spool_url,
                                    "metrics.listen must name an IP address or localhost, not 'metrics.invalid'.")


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_unavailable_spool_exits_75_with_one_sentence(dialect, tmp_path, procs):
    """An unreachable PostgreSQL spool, or an SQLite spool whose directory cannot exist, makes relayd exit 75 with one sentence."""
    if dialect == "postgresql":
        url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    else:
        (tmp_path / "not-a-directory").write_text("")
        url = f"sqlite:///{tmp_path / 'not-a-directory' / 'spool.db'}"
    config = write_config(tmp_path / "relay.toml", spool_url=url, node="node-down")
    daemon = procs.relayd(config)
    assert daemon.wait(20) == 75
    lines = daemon.stderr().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("relayd: The spool ") and lines[0].endswith("."), lines
    assert "Traceback" not in daemon.stderr() and daemon.stdout() == ""


@pytest.mark.parametrize("section", ["submission", "metrics"])
def test_busy_listening_port_exits_69_with_one_sentence(section, spool_url, tmp_path, procs):
    """A submission or metrics port already in use stops relayd: it logs one
    sentence naming the address and exits 69 (EX_UNAVAILABLE), instead of
    running on without that listener."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node=f"node-busy-{section}",
                              extra={section: {"listen": f"127.0.0.1:{port}"}})
        daemon = procs.relayd(config)
        assert daemon.wait(20) == 69
    stderr = daemon.stderr()
    assert f"{section}.listen 127.0.0.1:{port}: cannot listen" in stderr, stderr
    assert sum("cannot listen" in line for line in stderr.splitlines()) == 1, stderr
    assert "Traceback" not in stderr and daemon.stdout() == ""


@pytest.mark.parametrize("runner", ["twist", "twistd"])
def test_busy_listening_port_stops_the_twisted_plugin(runner, spool_url, tmp_path, procs):
    """Under `twist relay` and `twistd -n relay` (which start services before
    running the reactor) a busy submission port stops the process too, with
    the sentence logged and exit status 69 (a supervisor restarts it)."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node=f"node-busy-{runner}",
                              extra={"submission": {"listen": f"127.0.0.1:{port}"}})
        daemon = _start_plugin(procs, runner, config, tmp_path)
        assert daemon.wait(20) == 69
    output = daemon.output()
    assert f"submission.listen 127.0.0.1:{port}: cannot listen" in output, output
    assert "Traceback" not in output


def _twistd_argv() -> list[str]:
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def _start_plugin(procs, runner: str, config: Path, tmp_path: Path):
    """relayd as the Twisted plugin under ``twist`` or ``twistd -n``, from a
    working directory outside the repository (found through PYTHONPATH)."""
    if runner == "twist":
        argv = [sys.executable, "-m", "twisted", "--log-format=text", "relay", "--config", str(config)]
    else:
        argv = [*_twistd_argv(), "-n", "--pidfile=", "relay", "--config", str(config)]
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    return procs.start(argv, runner, cwd=workdir)


@pytest.mark.parametrize("runner", ["twist", "twistd"])
def test_twisted_plugin_delivers_and_stops_cleanly(runner, spool_url, tmp_path, procs, peers, reader):
    """`twist relay` and `twistd -n relay` (plugin found through PYTHONPATH) deliver, and on SIGTERM finish the transaction in progress and exit cleanly."""
    peer = peers("127.0.0.24", slow_seconds=1.5)
    config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node=f"node-{runner}",
                          route_host=peer.host, route_port=peer.port)
    with relay.open(str(config)) as outbox:
        qid = outbox.enqueue(message_bytes(1, "someone@plugin.test", runner))
        outbox.enqueue(message_bytes(2, "slow@plugin.test", runner))
    daemon = _start_plugin(procs, runner, config, tmp_path)
    daemon.wait_for_output(rf"{qid}: to=<someone@plugin\.test>, relay=.*status=sent \(250 ", 20)
    wait_until(lambda: peer.log.rcpt_seen.get("slow@plugin.test"), 10, "the slow transaction to start",
               interval=0.01)
    daemon.signal(SIGTERM)
    status = daemon.wait(15)
    output = daemon.output()
    # Twisted's runners end a clean shutdown by re-raising the signal that stopped the reactor
    # (twisted.application.twist._twist.Twist.run, twisted.scripts.twistd.runApp), so a supervisor
    # sees "terminated by SIGTERM" as from any well-behaved daemon; relayd itself exits 0.
    assert status in (0, -SIGTERM), (status, output[-2000:])
    assert "Main loop terminated." in output and "Traceback" not in output
    assert f"relayd starting: node node-{runner}, hostname relay.test, spool {spool_url}" in output
    spool = reader()
    counts = spool.counts()
    assert counts["delivered"] == 2 and counts["inflight"] == 0, "the runner waited for relay's stopService"
    assert sorted(message_id_of(m.data) for m in peer.log.messages) == [f"<{runner}-1@relay-tests>",
                                                                         f"<{runner}-2@relay-tests>"]
    assert not (tmp_path / "cwd" / "twistd.pid").exists() and not (REPO / "twistd.pid").exists()


def test_two_nodes_share_one_spool_without_duplicates(spool_url, tmp_path, procs, peers, reader):
    """Two relayd with distinct relay.node on one spool deliver 600 messages between them, each exactly once."""
    total = 600
    peer = peers("127.0.0.24")
    configs = [write_config(tmp_path / f"relay-{name}.toml", spool_url=spool_url, node=name,
                            route_host=peer.host, route_port=peer.port,
                            extra={"delivery": {"batch_size": 50, "poll_interval": "0.1s",
                                                "concurrency": 4, "per_domain_concurrency": 4}})
               for name in ("node-a", "node-b")]
    mbox = write_mbox(tmp_path / "shared.mbox",
                      (message_bytes(n, f"user{n}@shared{n % 5}.test", "shared") for n in range(total)))
    daemons = [procs.relayd(config, name) for config, name in zip(configs, ("relayd-a", "relayd-b"))]
    # Both nodes are up (and, on PostgreSQL, listening) before the mail is queued: queued first,
    # the node that started first could claim and deliver all 600 before the other one started.
    ready = "listening for new mail on PostgreSQL" if spool_url.startswith("postgresql") else "relayd starting"
    for daemon in daemons:
        daemon.wait_for_output(re.escape(ready), 30)
    queued = relayctl("--config", str(configs[0]), "enqueue", "--mbox", str(mbox))
    assert queued.returncode == 0, queued.stderr.decode()
    spool = reader()
    wait_until(lambda: spool.counts()["delivered"] == total, 60, "both nodes to deliver everything")
    for daemon in daemons:
        daemon.signal(SIGTERM)
    assert [d.wait(20) for d in daemons] == [0, 0]

    arrivals = _arrivals(peer)
    assert set(arrivals) == {f"<shared-{n}@relay-tests>" for n in range(total)}
    assert max(arrivals.values()) == 1, "no recipient may be carried by both nodes"
    lines = [len(re.findall(r"status=sent", d.stderr())) for d in daemons]
    assert sum(lines) == total
    if spool_url.startswith("postgresql"):
        # SKIP LOCKED lets both nodes claim at once: each must have done a share.
        assert min(lines) > 0, lines


def test_sigkill_with_the_listener_loses_no_accepted_message(spool_url, tmp_path, procs, peers, reader):
    """Mail accepted over SMTP (250) is handed to the drain already claimed; SIGKILL mid-stream
    and a restart deliver every accepted message, duplicating only what was in flight."""
    import smtplib
    import threading

    peer = peers("127.0.0.27")
    listen_port = free_port("127.0.0.1")
    config = write_config(tmp_path / "relay.toml", spool_url=spool_url, node="node-listen-crash",
                          route_host=peer.host, route_port=peer.port,
                          extra={"submission": {"listen": f"127.0.0.1:{listen_port}"}})
    first = procs.relayd(config, "relayd-first")
    first.wait_for_output(r"submission listener on", 15)

    accepted: set[str] = set()
    lock = threading.Lock()

    def client(worker: int) -> None:
        for n in range(worker * 1000, worker * 1000 + 400):
            data = message_bytes(n, f"user{n}@listen.test", "listen")
            try:
                with smtplib.SMTP("127.0.0.1", listen_port, timeout=10) as s:
                    s.sendmail("app@sender.test", [f"user{n}@listen.test"], data)
            except (OSError, smtplib.SMTPException):
                return                      # relayd is gone: this one may or may not be queued
            with lock:
                accepted.add(f"<listen-{n}@relay-tests>")

    clients = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(4)]
    for t in clients:
        t.start()
    wait_until(lambda: len(peer.log.messages) >= 150 or not first.alive(), 30,
               "a hundred and fifty messages to arrive", interval=0.005)
    first.signal(SIGKILL)
    assert first.wait(10) == -SIGKILL
    for t in clients:
        t.join(15)
    with lock:
        accepted_at_kill = set(accepted)
    arrived_at_kill = set(_arrivals(peer))
    snapshot = reader().rows()
    queued = {r.message_id for r in snapshot}
    inflight_at_kill = {r.message_id for r in snapshot if r.state == "inflight"}
    delivered_at_kill = {r.message_id for r in snapshot if r.state == "delivered"}
    assert accepted_at_kill <= queued, "a 250 was given for a message not in the spool"
    assert arrived_at_kill <= delivered_at_kill | inflight_at_kill
    assert len(accepted_at_kill) < 1600, "the kill must land in the middle of the stream"
    # One line per queued message, written at its commit (before it could arrive anywhere).
    logged = re.findall(r"(\S+): from=<app@sender\.test>, size=\d+, nrcpt=1, client=127\.0\.0\.1\n", first.stderr())
    assert len(logged) == len(set(logged)), "one line per message"
    arrived_ids = {r.queue_id for r in snapshot if r.message_id in arrived_at_kill}
    assert len(arrived_ids) == len(arrived_at_kill) > 0
    assert arrived_ids <= set(logged) <= {r.queue_id for r in snapshot}, sorted(arrived_ids - set(logged))[:5]

    second = procs.relayd(config, "relayd-second")
    spool = reader()
    wait_until(lambda: spool.counts()["delivered"] == len(queued), 30, "every queued message to be delivered")
    second.signal(SIGTERM)
    assert second.wait(15) == 0, second.stderr()[-2000:]

    arrivals = _arrivals(peer)
    assert accepted_at_kill <= set(arrivals), sorted(accepted_at_kill - set(arrivals))[:5]
    assert set(arrivals) == queued
    duplicates = {mid for mid, n in arrivals.items() if n > 1}
    assert duplicates <= inflight_at_kill and all(arrivals[m] == 2 for m in duplicates)
    print(f"\n[{spool_url.split(':')[0]}] accepted {len(accepted_at_kill)}, arrived before kill "
          f"{len(arrived_at_kill)}, in flight at kill {len(inflight_at_kill)}, duplicates {len(duplicates)}")


def test_a_bad_command_line_exits_64_with_one_sentence(procs):
    """relayd's usage errors are EX_USAGE (64), like its configuration errors, not argparse's 2."""
    relayd = procs.start([sys.executable, "-m", "relay.daemon", "--bogus"], "relayd-usage")
    assert relayd.wait(20) == 64
    assert relayd.stdout() == ""
    assert relayd.stderr() == "relayd: unrecognized arguments: --bogus; see `relayd --help`.\n"
