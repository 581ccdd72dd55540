"""The drain end to end, in-process: real spool (SQLite and PostgreSQL), a real
twisted.names DNS server on loopback, aiosmtpd peers answering per recipient,
and relayd's own services built by ``relay.tap.build_service``.

Each scenario runs twice, once per spool (``DrainSQLiteTests`` /
``DrainPostgreSQLTests``).
"""

from __future__ import annotations

import email
import email.policy
import time

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from relay.config import Config
from relay.message import parse_message
from relay.model import State
from relay.tap import build_service
from relay.testing import SMTPPeer, free_port, scratch_pg_url, scratch_sqlite_url, wait_until
from relay.testing_dns import DNSFixture

# Loopback addresses of the test MX hosts.
MX1, MX2, DOWN, TARPIT, GREET421, IMPLICIT = ("127.0.0.11", "127.0.0.12", "127.0.0.13",
                                              "127.0.0.14", "127.0.0.15", "127.0.0.16")

ZONES = {
    "one.test": {"MX": [(10, "mx1.one.test")]},
    "mx1.one.test": {"A": [MX1]},
    "sender.test": {"MX": [(10, "mx1.one.test")]},
    "nullmx.test": {"MX": [(0, "")]},
    "servfail.test": "SERVFAIL",
    "implicit.test": {"A": [IMPLICIT]},
    "down.test": {"MX": [(10, "down.down.test"), (20, "mx2.down.test")]},
    "down.down.test": {"A": [DOWN]},
    "mx2.down.test": {"A": [MX2]},
    "tarpit.test": {"MX": [(10, "slow.tarpit.test"), (20, "mx2.down.test")]},
    "slow.tarpit.test": {"A": [TARPIT]},
    "greet.test": {"MX": [(10, "busy.greet.test"), (20, "mx2.down.test")]},
    "busy.greet.test": {"A": [GREET421]},
}


class _Tarpit(protocol.Protocol):
    """Accepts the connection and never says a word."""


class _Greet421(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"421 4.3.2 Too busy, come back later\r\n")
        self.transport.loseConnection()


def message(to: str | list[str], *, sender: str = "app@sender.test", body: bytes = b"Hello.\r\n",
            subject: str = "test") -> bytes:
    to_header = ", ".join([to] if isinstance(to, str) else to)
    return (f"From: {sender}\r\nTo: {to_header}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@sender.test>\r\n\r\n").encode() + body


class DrainScenarios:
    """The scenarios; subclasses provide ``make_spool_url``."""

    per_domain_concurrency = 4

    def make_spool_url(self) -> str:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.port = free_port("127.0.0.1")
        self.peers = {}
        for ip in (MX1, MX2, IMPLICIT):
            # MX1 (most scenarios) offers PIPELINING as Postfix does, so relayd
            # pipelines MAIL/RCPT/DATA there; MX2 and the implicit MX do not.
            peer = SMTPPeer(ip, self.port, slow_seconds=3.0, pipelining=ip == MX1)
            peer.start()
            self.addCleanup(peer.stop)
            self.peers[ip] = peer
        for ip, factory in ((TARPIT, protocol.Factory.forProtocol(_Tarpit)),
                            (GREET421, protocol.Factory.forProtocol(_Greet421))):
            listening = reactor.listenTCP(self.port, factory, interface=ip)
            self.addCleanup(listening.stopListening)
        self.dns = DNSFixture(ZONES, reactor)
        yield self.dns.start()
        self.addCleanup(self.dns.stop)
        self.spool_url = self.make_spool_url()

    def config(self, **overrides) -> Config:
        values = dict(
            hostname="relay.test", node="node-a", spool_url=self.spool_url, spool_busy_timeout=5.0,
            nameservers=(f"127.0.0.1:{self.dns.port}",), delivery_port=self.port,
            concurrency=20, per_domain_concurrency=self.per_domain_concurrency,
            connect_timeout=1.0, command_timeout=5.0, lease=60.0, tls="none",
            poll_interval=0.1, batch_size=100,
            retry_initial=1.0, retry_maximum=4.0, max_lifetime=3600.0,
        )
        values.update(overrides)
        return Config(**values)

    def start_relay(self, **overrides):
        """Build and start relayd's services; stopped at cleanup."""
        config = self.config(**overrides)
        top = build_service(config, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.drain = top.drain
        self.spool = top.drain.spool.spool   # the synchronous SQLSpool, for assertions
        return top

    def enqueue(self, *raws: bytes, **kwargs) -> list[str]:
        return self.spool.enqueue([parse_message(r, **kwargs) for r in raws], time.time())

    def states(self, qid: str) -> dict[str, State]:
        return {r.address: r.state for r in self.spool.show(qid).recipients}

    def all_final(self, qid: str) -> bool:
        return all(s in (State.DELIVERED, State.BOUNCED) for s in self.states(qid).values())

    # -- grouping and connection reuse ---------------------------------

    @defer.inlineCallbacks
    def test_three_recipients_one_transaction(self):
        """Three recipients of one message at one domain arrive in one SMTP transaction."""
        self.start_relay()
        [qid] = self.enqueue(message(["a@one.test", "b@one.test", "c@one.test"]))
        yield wait_until(lambda: self.all_final(qid))
        peer = self.peers[MX1]
        self.assertEqual(len(peer.log.messages), 1)
        self.assertEqual(sorted(peer.log.messages[0].recipients), ["a@one.test", "b@one.test", "c@one.test"])
        self.assertEqual(set(self.states(qid).values()), {State.DELIVERED})

    @defer.inlineCallbacks
    def test_many_messages_share_few_connections(self):
        """200 messages to one domain use at most per_domain_concurrency connections at once and far fewer connections than messages."""
        self.start_relay()
        ids = self.enqueue(*[message(f"user{n}@one.test") for n in range(200)])
        yield wait_until(lambda: self.spool.status(time.time()).recipients["delivered"] == 200, timeout=60)
        peer = self.peers[MX1]
        self.assertEqual(len(peer.log.messages), 200)
        self.assertLessEqual(peer.log.peak_connections, self.per_domain_concurrency)
        self.assertLessEqual(peer.log.connections, 20)
        self.assertEqual(len(set(ids)), 200)

    # -- outcomes ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_451_retried_on_schedule_then_delivered(self):
        """A 451 is retried after retry.initial (±10 % jitter) and then delivered, with the 451 in the history."""
        self.start_relay()
        [qid] = self.enqueue(message("once451@one.test"))
        yield wait_until(lambda: self.all_final(qid), timeout=15)
        [rcpt] = self.spool.show(qid).recipients
        self.assertEqual(rcpt.state, State.DELIVERED)
        self.assertEqual(rcpt.attempts, 2)
        self.assertEqual([a.code for a in rcpt.history], [451, 250])
        self.assertIn("4.3.0", rcpt.history[0].response)
        gap = rcpt.history[1].at - rcpt.history[0].at
        self.assertGreaterEqual(gap, 0.9)          # never before initial (1 s) minus 10 % jitter
        self.assertLess(gap, 2 * 0.9)             # before even the shortest doubled delay (2 s - 10 %);
                                                  # the exact schedule is unit-tested on a Clock (test_drain.py)

    @defer.inlineCallbacks
    def test_550_bounces_with_a_dsn_to_the_sender(self):
        """A 550 bounces the recipient and an RFC 3464 DSN from <> reaches the sender's domain."""
        self.start_relay()
        [qid] = self.enqueue(message("perm@one.test", sender="app@sender.test", subject="invoice 7"))
        peer = self.peers[MX1]
        yield wait_until(lambda: any(m.sender in ("", "<>") for m in peer.log.messages), timeout=15)
        self.assertEqual(self.states(qid), {"perm@one.test": State.BOUNCED})
        [bounce] = [m for m in peer.log.messages if m.sender in ("", "<>")]
        self.assertEqual(bounce.recipients, ["app@sender.test"])
        dsn = email.message_from_bytes(bounce.data, policy=email.policy.default)
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        self.assertEqual(dsn.get_param("report-type"), "delivery-status")
        self.assertEqual(dsn["Auto-Submitted"], "auto-replied")
        self.assertIn("MAILER-DAEMON@relay.test", dsn["From"])
        parts = list(dsn.iter_parts())
        status = parts[1]
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        blocks = status.get_payload()
        per_message, per_rcpt = blocks[0], blocks[1]
        self.assertEqual(per_message["Reporting-MTA"], "dns; relay.test")
        self.assertEqual(per_rcpt["Final-Recipient"], "rfc822; perm@one.test")
        self.assertEqual(per_rcpt["Action"], "failed")
        self.assertEqual(per_rcpt["Status"], "5.1.1")
        self.assertEqual(per_rcpt["Remote-MTA"], "dns; mx1.one.test")
        self.assertIn("smtp; 550 5.1.1", per_rcpt["Diagnostic-Code"])
        headers = parts[2]
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: invoice 7", headers.get_payload(decode=True).decode())

    @defer.inlineCallbacks
    def test_null_sender_never_gets_a_dsn(self):
        """A bounced message whose sender is <> causes no DSN."""
        self.start_relay()
        [qid] = self.enqueue(message("perm@one.test"), sender="<>")
        yield wait_until(lambda: self.all_final(qid))
        yield self.drain.idle()
        self.assertEqual(self.spool.status(time.time()).messages, 1)

    @defer.inlineCallbacks
    def test_mixed_replies_in_one_transaction(self):
        """250, 450 and 550 to RCPTs of one transaction give delivered, deferred and bounced."""
        self.start_relay(retry_initial=600.0, retry_maximum=600.0)
        [qid] = self.enqueue(message(["ok@one.test", "temp@one.test", "perm@one.test"]))
        yield wait_until(lambda: State.INFLIGHT not in self.states(qid).values()
                         and State.QUEUED not in self.states(qid).values())
        self.assertEqual(self.states(qid), {"ok@one.test": State.DELIVERED,
                                            "temp@one.test": State.DEFERRED,
                                            "perm@one.test": State.BOUNCED})
        delivered = [m for m in self.peers[MX1].log.messages if m.sender == "app@sender.test"]
        self.assertEqual([m.recipients for m in delivered], [["ok@one.test"]])

    @defer.inlineCallbacks
    def test_data_451_and_dropped_connection_defer(self):
        """451 after the dot defers; a connection dropped after the dot defers (possible duplicate)."""
        self.start_relay(retry_initial=600.0, retry_maximum=600.0)
        [q1] = self.enqueue(message("data451@one.test"))
        [q2] = self.enqueue(message("drop@one.test"))
        yield wait_until(lambda: self.states(q1)["data451@one.test"] is State.DEFERRED
                         and self.states(q2)["drop@one.test"] is State.DEFERRED)
        [r2] = self.spool.show(q2).recipients
        self.assertTrue(r2.last_response.startswith("4.4.2"))

    # -- routing ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_dns_outcomes(self):
        """Null MX bounces 5.1.10, NXDOMAIN bounces 5.1.2, SERVFAIL defers 4.4.3, implicit MX delivers."""
        self.start_relay(retry_initial=600.0, retry_maximum=600.0)
        ids = self.enqueue(message("x@nullmx.test"), message("x@nxdomain.test"),
                           message("x@servfail.test"), message("x@implicit.test"))
        yield wait_until(lambda: all(self.spool.show(q).recipients[0].attempts == 1 for q in ids))
        null, nx, servfail, implicit = (self.spool.show(q).recipients[0] for q in ids)
        self.assertEqual((null.state, null.last_response[:6]), (State.BOUNCED, "5.1.10"))
        self.assertEqual((nx.state, nx.last_response[:5]), (State.BOUNCED, "5.1.2"))
        self.assertEqual((servfail.state, servfail.last_response[:5]), (State.DEFERRED, "4.4.3"))
        self.assertEqual(implicit.state, State.DELIVERED)
        self.assertEqual(self.peers[IMPLICIT].log.recipients(), ["x@implicit.test"])

    @defer.inlineCallbacks
    def test_failover_to_the_next_mx(self):
        """A refused, a tarpitting and a 421-greeting first MX each fail over to the second MX."""
        self.start_relay()
        ids = self.enqueue(message("a@down.test"), message("b@tarpit.test"), message("c@greet.test"))
        yield wait_until(lambda: all(self.all_final(q) for q in ids), timeout=20)
        self.assertEqual(sorted(self.peers[MX2].log.recipients()),
                         ["a@down.test", "b@tarpit.test", "c@greet.test"])
        for q in ids:
            [r] = self.spool.show(q).recipients
            self.assertEqual((r.state, r.attempts), (State.DELIVERED, 1))

    @defer.inlineCallbacks
    def test_expiry_bounces_with_4_4_7(self):
        """A recipient still deferred max_lifetime after it was queued is bounced with 4.4.7 and a DSN."""
        self.start_relay(retry_initial=0.5, retry_maximum=0.5, max_lifetime=1.5)
        [qid] = self.enqueue(message("temp@one.test"))
        yield wait_until(lambda: self.all_final(qid), timeout=15)
        [r] = self.spool.show(qid).recipients
        self.assertEqual(r.state, State.BOUNCED)
        self.assertIn("4.4.7", r.last_response)
        yield wait_until(lambda: any(m.sender in ("", "<>") for m in self.peers[MX1].log.messages))
        [bounce] = [m for m in self.peers[MX1].log.messages if m.sender in ("", "<>")]
        self.assertIn(b"Status: 4.4.7", bounce.data)

    # -- content -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_dot_lines_at_chunk_boundaries_arrive_intact(self):
        """'.'-leading lines at offsets 0, 16384 and 32768, queued with bare LF, arrive byte-identical."""
        self.start_relay()

        def pad_to(buf: bytearray, offset: int) -> None:
            while offset - len(buf) > 80:
                buf += b"x" * 76 + b"\r\n"
            buf += b"y" * (offset - len(buf) - 2) + b"\r\n"

        expected = bytearray(b"From: app@sender.test\r\nTo: dots@one.test\r\nSubject: dots\r\n\r\n")
        pad_to(expected, 16384)
        expected += b".\r\nNOOP smuggled\r\n"          # a lone '.' line at the 16 KiB boundary
        pad_to(expected, 32768)
        expected += b"..double\r\n.\r\n.end\r\n"
        expected = bytes(expected)
        self.assertEqual(expected[16384:16387], b".\r\n")
        self.assertEqual(expected[32768:32770], b"..")
        [qid] = self.enqueue(expected.replace(b"\r\n", b"\n"))      # bare-LF input
        first = b".first line\r\nsecond\r\n"                          # '.' at offset 0 of DATA
        [qid2] = self.enqueue(first.replace(b"\r\n", b"\n"), sender="app@sender.test",
                              recipients=["first@one.test"])
        yield wait_until(lambda: self.all_final(qid) and self.all_final(qid2))
        received = {m.recipients[0]: m.data for m in self.peers[MX1].log.messages}
        self.assertEqual(received["dots@one.test"], expected)
        self.assertEqual(received["first@one.test"], first)


class DrainSQLiteTests(DrainScenarios, unittest.TestCase):
    """The drain scenarios on the SQLite spool."""

    def make_spool_url(self) -> str:
        return scratch_sqlite_url(self)


class DrainPostgreSQLTests(DrainScenarios, unittest.TestCase):
    """The drain scenarios on the PostgreSQL spool."""

    def make_spool_url(self) -> str:
        return scratch_pg_url(self)
