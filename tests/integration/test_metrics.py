"""The metrics endpoint (``metrics.listen``) over real HTTP on loopback, with a
real spool on SQLite and on PostgreSQL.

``MetricsSQLiteTests`` / ``MetricsPostgreSQLTests`` run the same scenarios
once per spool; ``MetricsPolicyTests`` covers the parts that need no spool
(reason classes, argument checks, the shared and bounded health ping).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from relay.config import Config, Route
from relay.errors import RelayError, SpoolUnavailable
from relay.message import parse_message
from relay.metrics import REASONS, MetricsService, RelayMetrics, build_metrics_service, reason_class
from relay.model import Outcome, State
from relay.spool import open_spool
from relay.spool.deferred import DeferredSpool
from relay.spool.engine import create_spool_engine
from relay.spool.sql import SQLSpool
from relay.tap import build_service
from relay.testing import SMTPPeer, free_port, scratch_pg_url

FAMILIES = (
    "relay_enqueued", "relay_delivered", "relay_deferred", "relay_bounced", "relay_recipients",
    "relay_oldest_pending_age_seconds", "relay_spool_up", "relay_spool_last_refresh_timestamp_seconds",
    "relay_connections_open", "relay_time_in_queue_seconds", "relay_delivery_latency_seconds",
    "relay_submission_commits",
)


class _Body(protocol.Protocol):
    """Collects a response body (readBody warns about this transport on Twisted 26)."""

    def __init__(self, done: defer.Deferred):
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


@defer.inlineCallbacks
def fetch(url: str, accept: str | None = None):
    """GET ``url`` over a fresh connection; (status code, content type, body)."""
    headers = Headers({b"accept": [accept.encode()]} if accept else {})
    response = yield Agent(reactor).request(b"GET", url.encode(), headers)
    body_done: defer.Deferred = defer.Deferred()
    response.deliverBody(_Body(body_done))
    body = yield body_done
    content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
    return response.code, content_type, body


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a text exposition as {(name, sorted labels): value}; fails on bad syntax."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> defer.Deferred:
    """Poll ``predicate()`` on the reactor until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def loop():
        while True:
            value = yield defer.maybeDeferred(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            yield task.deferLater(reactor, interval, lambda: None)

    return loop()


def raw(to: str, sender: str = "app@sender.test") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: metrics\r\n"
            f"Message-ID: <{time.time_ns()}@sender.test>\r\n\r\nHello.\r\n").encode()


class MetricsScenarios:
    """The scenarios; subclasses provide ``make_spool_url`` and ``unreachable_spool``."""

    @defer.inlineCallbacks
    def assert_503_while_locked(self, lock, unlock, reason: bytes):
        """/healthz says 200; while ``lock()`` holds, 503 with one line naming
        ``reason``, given by the spool's own bound (under a second) well within
        the health timeout (30 s); 200 again after ``unlock()``."""
        code, _, body = yield fetch(self.base + "/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        lock()
        started = time.monotonic()
        code, _, body = yield fetch(self.base + "/healthz")
        waited = time.monotonic() - started
        self.assertEqual(code, 503, body)
        self.assertEqual(body.count(b"\n"), 1, body)
        self.assertIn(reason, body.lower())
        self.assertLess(waited, 10.0, "the ping gave up at the spool's bound, not at the health timeout")
        unlock()
        code, _, body = yield fetch(self.base + "/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))

    def make_spool_url(self) -> str:
        raise NotImplementedError

    def setUp(self):
        self.spool_url = self.make_spool_url()

    def open_spool(self) -> DeferredSpool:
        """A started DeferredSpool on this test's spool; stopped at cleanup."""
        spool = DeferredSpool(open_spool(self.spool_url, busy_timeout=2.0), reactor)
        spool.start()
        self.addCleanup(spool.stop)
        return spool

    def start_metrics(self, spool: DeferredSpool, metrics: RelayMetrics | None = None,
                      **kwargs) -> MetricsService:
        """A running MetricsService on a free loopback port (refreshing every 0.2 s); stopped at cleanup."""
        metrics = metrics or RelayMetrics(max_lifetime=3600.0, clock=reactor)
        config = Config(hostname="relay.test", node="n", spool_url=self.spool_url,
                        metrics_listen=f"127.0.0.1:{free_port()}")
        kwargs.setdefault("refresh_interval", 0.2)
        svc = build_metrics_service(config, metrics, spool, reactor, **kwargs)
        svc.startService()
        self.addCleanup(svc.stopService)
        self.base = f"http://127.0.0.1:{svc.listening.getHost().port}"
        return svc

    @defer.inlineCallbacks
    def scrape(self) -> dict:
        code, content_type, body = yield fetch(self.base + "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(content_type.startswith("text/plain"), content_type)
        text = body.decode()
        self.assertEqual(families(text) >= set(FAMILIES), True, sorted(set(FAMILIES) - families(text)))
        return samples(text)

    # -- /metrics -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_every_family_with_sensible_values(self):
        """After outcomes, connections and enqueues are reported, /metrics parses and every family carries them."""
        metrics = RelayMetrics(max_lifetime=3600.0, clock=reactor)
        svc = self.start_metrics(self.open_spool(), metrics)
        yield svc.refresh()
        now = time.time()
        metrics.submission_committed(2)        # the listener: one commit of 2 messages, one of 1
        metrics.submission_committed(1)
        metrics.enqueued(source="dsn")
        metrics.connection_opened()
        metrics.connection_opened()
        metrics.connection_closed()
        metrics.outcome(State.DELIVERED, 250, now - 3, now)
        metrics.outcome(State.DELIVERED, 250, now - 7200, now)
        metrics.outcome(State.DEFERRED, 421, now - 2, now)
        metrics.outcome(State.DEFERRED, 451, now - 2, now, text="4.4.3 DNS lookup failed")
        metrics.outcome(State.BOUNCED, 550, now - 2, now)
        metrics.outcome(State.BOUNCED, 450, now - 4000, now)        # deferral bounced at max_lifetime
        got = yield self.scrape()
        self.assertEqual(got[("relay_enqueued_total", (("source", "submission"),))], 3)
        self.assertEqual(got[("relay_enqueued_total", (("source", "dsn"),))], 1)
        self.assertEqual(got[("relay_submission_commits_total", ())], 2)
        self.assertEqual(got[("relay_delivered_total", ())], 2)
        self.assertEqual(got[("relay_deferred_total", (("reason", "network"),))], 1)
        self.assertEqual(got[("relay_deferred_total", (("reason", "dns"),))], 1)
        self.assertEqual(got[("relay_bounced_total", (("reason", "mailbox"),))], 1)
        self.assertEqual(got[("relay_bounced_total", (("reason", "expired"),))], 1)
        for reason in REASONS:      # every reason series exists from the start
            self.assertIn(("relay_deferred_total", (("reason", reason),)), got)
        self.assertEqual(sum(v for (n, _), v in got.items() if n == "relay_bounced_total"), 2)
        self.assertEqual(got[("relay_connections_open", ())], 1)
        delivered = (("outcome", "delivered"),)
        self.assertEqual(got[("relay_time_in_queue_seconds_count", delivered)], 2)
        self.assertLess(abs(got[("relay_time_in_queue_seconds_sum", delivered)] - 7203), 1)
        self.assertEqual(got[("relay_time_in_queue_seconds_bucket", (("le", "5.0"),) + delivered)], 1)
        self.assertEqual(got[("relay_time_in_queue_seconds_count", (("outcome", "bounced"),))], 2)
        self.assertEqual(got[("relay_delivery_latency_seconds_count", ())], 6)   # every attempt
        self.assertEqual(got[("relay_delivery_latency_seconds_bucket", (("le", "+Inf"),))], 6)
        self.assertEqual(got[("relay_spool_up", ())], 1)
        self.assertLess(abs(got[("relay_spool_last_refresh_timestamp_seconds", ())] - time.time()), 30)
        self.assertEqual(got[("relay_oldest_pending_age_seconds", ())], 0)       # empty spool

    @defer.inlineCallbacks
    def test_openmetrics_when_asked(self):
        """A scraper that accepts OpenMetrics gets it, with the # EOF terminator."""
        self.start_metrics(self.open_spool())
        code, content_type, body = yield fetch(self.base + "/metrics",
                                               accept="application/openmetrics-text; version=1.0.0")
        self.assertEqual(code, 200)
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        self.assertTrue(body.endswith(b"# EOF\n"))

    @defer.inlineCallbacks
    def test_recipients_by_state_match_the_spool(self):
        """After a refresh, relay_recipients{state} equals the spool's own counts and the oldest-pending age is right."""
        spool = self.open_spool()
        sql = spool.spool
        queued_at = time.time() - 120
        ids = sql.enqueue([parse_message(raw(f"r{n}@one.test")) for n in range(5)], queued_at)
        sql.enqueue([parse_message(raw("x@two.test"))], queued_at + 60)
        sql.hold(ids[4], time.time())
        claimed = sql.claim("node-a", time.time(), 600.0, 3)
        rids = [r.id for m in claimed for r in m.recipients]
        self.assertEqual(len(rids), 3)
        sql.record("node-a", time.time(), [
            Outcome(recipient_id=rids[0], state=State.DELIVERED, code=250, response="ok"),
            Outcome(recipient_id=rids[1], state=State.DEFERRED, code=451, response="4.3.0 later",
                    next_attempt_at=time.time() + 600)])
        svc = self.start_metrics(spool, refresh_interval=60)
        yield svc.refresh()
        expected = sql.status(time.time()).recipients
        got = yield self.scrape()
        by_state = {dict(labels)["state"]: v for (name, labels), v in got.items() if name == "relay_recipients"}
        self.assertEqual(by_state, {state: float(n) for state, n in expected.items()})
        self.assertEqual((by_state["delivered"], by_state["deferred"], by_state["inflight"],
                          by_state["held"], by_state["queued"]), (1, 1, 1, 1, 2))
        age = got[("relay_oldest_pending_age_seconds", ())]
        self.assertGreaterEqual(age, 120)
        self.assertLess(age, 150)

    @defer.inlineCallbacks
    def test_periodic_refresh_follows_the_spool(self):
        """The LoopingCall picks up new mail without anyone calling refresh (and a scrape never queries)."""
        spool = self.open_spool()
        self.start_metrics(spool, refresh_interval=0.1)
        got = yield self.scrape()
        self.assertEqual(got[("relay_recipients", (("state", "queued"),))], 0)
        spool.spool.enqueue([parse_message(raw("a@one.test, b@one.test"))], time.time())

        @defer.inlineCallbacks
        def queued_is_two():
            now = yield self.scrape()
            return now[("relay_recipients", (("state", "queued"),))] == 2

        yield wait_until(queued_is_two, timeout=5)

    # -- /healthz -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_healthz_ok_with_a_working_spool(self):
        """/healthz answers 200 ok while the spool answers."""
        self.start_metrics(self.open_spool())
        code, content_type, body = yield fetch(self.base + "/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        self.assertTrue(content_type.startswith("text/plain"))

    @defer.inlineCallbacks
    def test_healthz_503_while_the_spool_is_unreachable(self):
        """/healthz answers 503 with one line naming the spool while it cannot be reached, and relay_spool_up drops to 0."""
        spool, restore = self.unreachable_spool()
        svc = self.start_metrics(spool, refresh_interval=60, health_timeout=5.0)
        code, _, body = yield fetch(self.base + "/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(body.count(b"\n"), 1, body)
        self.assertIn(b"spool", body.lower())
        self.assertNotIn(b"Traceback", body)
        yield svc.refresh()
        got = yield self.scrape()
        self.assertEqual(got[("relay_spool_up", ())], 0)
        if restore is not None:
            restore()
            code, _, body = yield fetch(self.base + "/healthz")
            self.assertEqual((code, body), (200, b"ok\n"))
            yield svc.refresh()
            got = yield self.scrape()
            self.assertEqual(got[("relay_spool_up", ())], 1)

    def unreachable_spool(self):
        raise NotImplementedError

    # -- relayd end to end ------------------------------------------------------

    @defer.inlineCallbacks
    def test_real_delivery_counts(self):
        """relayd built by build_service delivers through a '*' route and /metrics counts it (and a bounce with its DSN)."""
        peer = SMTPPeer("127.0.0.1")
        peer.start()
        self.addCleanup(peer.stop)
        config = Config(hostname="relay.test", node="node-a", spool_url=self.spool_url, spool_busy_timeout=5.0,
                        nameservers=("127.0.0.1:1",),     # never asked ('*' routes to an address)
                        routes={"*": Route(host="127.0.0.1", port=peer.port, tls="none")},
                        connect_timeout=2.0, command_timeout=5.0, tls="none", poll_interval=0.1,
                        batch_size=50, retry_initial=600.0, retry_maximum=600.0,
                        metrics_listen=f"127.0.0.1:{free_port()}")
        top = build_service(config, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.base = "http://" + config.metrics_listen
        before = yield self.scrape()
        self.assertEqual(before[("relay_delivered_total", ())], 0)
        sql = top.drain.spool.spool
        if sql.dialect == "sqlite":     # the spool's file system, and the floor new mail must leave free
            st = os.statvfs(os.path.dirname(self.db_path))
            self.assertAlmostEqual(before[("relay_spool_free_bytes", ())], st.f_bavail * st.f_frsize,
                                   delta=100 * 10 ** 6)
            self.assertEqual(before[("relay_spool_min_free_bytes", ())], config.min_free_space)
        else:                           # PostgreSQL's disk is not visible from relayd
            self.assertNotIn(("relay_spool_free_bytes", ()), before)
        sql.enqueue([parse_message(raw("ok@one.test")), parse_message(raw("perm@one.test"))], time.time())

        @defer.inlineCallbacks
        def counted():
            got = yield self.scrape()
            # ok@one.test and the DSN to app@sender.test are delivered; perm@ bounced.
            return got if (got[("relay_delivered_total", ())] == 2
                           and got[("relay_bounced_total", (("reason", "mailbox"),))] == 1) else None

        got = yield wait_until(counted, timeout=10)
        self.assertEqual(sorted(peer.log.recipients()), ["app@sender.test", "ok@one.test"])
        self.assertEqual(got[("relay_time_in_queue_seconds_count", (("outcome", "delivered"),))], 2)
        self.assertGreaterEqual(got[("relay_delivery_latency_seconds_count", ())], 3)
        self.assertEqual(peer.log.connections >= 1, True)

        @defer.inlineCallbacks
        def all_closed():
            now = yield self.scrape()
            return now[("relay_connections_open", ())] == 0

        yield wait_until(all_closed, timeout=5)
        code, _, body = yield fetch(self.base + "/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))


    @defer.inlineCallbacks
    def test_submission_counts_enqueued(self):
        """Messages accepted by the submission listener show up in relay_enqueued_total{source="submission"}."""
        import smtplib
        listen = f"127.0.0.1:{free_port()}"
        config = Config(hostname="relay.test", node="node-a", spool_url=self.spool_url,
                        nameservers=("127.0.0.1:1",), routes={"*": Route(host="127.0.0.1", port=1)},
                        retry_initial=600.0, retry_maximum=600.0, poll_interval=0.1,
                        submission_listen=listen, metrics_listen=f"127.0.0.1:{free_port()}")
        top = build_service(config, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.base = "http://" + config.metrics_listen

        def submit():
            host, port = listen.split(":")
            with smtplib.SMTP(host, int(port), timeout=10) as client:
                client.sendmail("app@sender.test", ["a@one.test"], raw("a@one.test"))
                client.sendmail("app@sender.test", ["b@one.test", "c@one.test"], raw("b@one.test"))

        yield threads.deferToThread(submit)

        @defer.inlineCallbacks
        def counted():
            now = yield self.scrape()
            return now if now[("relay_enqueued_total", (("source", "submission"),))] >= 2 else None

        got = yield wait_until(counted, timeout=5)
        self.assertEqual(got[("relay_enqueued_total", (("source", "submission"),))], 2)
        self.assertEqual(got[("relay_enqueued_total", (("source", "dsn"),))], 0)


class MetricsSQLiteTests(MetricsScenarios, unittest.TestCase):
    """The metrics scenarios on the SQLite spool."""

    def make_spool_url(self) -> str:
        directory = tempfile.mkdtemp(prefix="relay-metrics-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.db_path = os.path.join(directory, "spool.db")
        return f"sqlite:///{self.db_path}"

    def unreachable_spool(self):
        """The spool file is moved away and a directory stands in its place (no connection can open it)."""
        spool = self.open_spool()
        spool.spool.ping()
        spool.spool.engine.dispose()          # close pooled connections: the next ping must open the file
        os.rename(self.db_path, self.db_path + ".away")
        os.mkdir(self.db_path)

        def restore():
            os.rmdir(self.db_path)
            os.rename(self.db_path + ".away", self.db_path)

        self.addCleanup(lambda: os.path.isdir(self.db_path) and restore())
        return spool, restore

    @defer.inlineCallbacks
    def test_healthz_503_while_the_spool_is_locked(self):
        """Another process holding SQLite's write lock longer than the spool's
        busy timeout makes /healthz say 503 with one line (WAL reads still
        work then, so the ping takes the write lock too), and 200 once the
        lock is gone."""
        spool = DeferredSpool(open_spool(self.spool_url, busy_timeout=0.3), reactor)
        spool.start()
        self.addCleanup(spool.stop)
        self.start_metrics(spool, refresh_interval=60, health_timeout=30.0)
        locker = sqlite3.connect(self.db_path, isolation_level=None, timeout=0.1)
        self.addCleanup(locker.close)
        yield self.assert_503_while_locked(lambda: locker.execute("BEGIN EXCLUSIVE"),
                                           lambda: locker.execute("ROLLBACK"), b"locked")


class MetricsPostgreSQLTests(MetricsScenarios, unittest.TestCase):
    """The metrics scenarios on the PostgreSQL spool."""

    def make_spool_url(self) -> str:
        return scratch_pg_url(self)

    @defer.inlineCallbacks
    def test_healthz_503_while_the_spool_is_locked(self):
        """A spool that accepts connections but cannot be read (its recipients
        table locked by another session) is not healthy: /healthz says 503 with
        one line, the ping gives its thread back after the spool's ping bound
        (statement_timeout) instead of hanging, and 200 once the lock is gone."""
        from sqlalchemy import create_engine
        spool = self.open_spool()
        spool.spool.PING_TIMEOUT = 0.5
        self.start_metrics(spool, refresh_interval=60, health_timeout=30.0)
        locker = create_engine(self.spool_url)
        self.addCleanup(locker.dispose)
        conn = locker.connect()
        self.addCleanup(conn.close)

        def lock():
            conn.begin()
            conn.exec_driver_sql("LOCK TABLE recipients IN ACCESS EXCLUSIVE MODE")

        yield self.assert_503_while_locked(lock, conn.rollback, b"statement timeout")

    def unreachable_spool(self):
        """A spool on 127.0.0.1 port 1, where nothing listens (the shared server is left alone)."""
        url = "postgresql+psycopg://postgres@127.0.0.1:1/test"
        spool = DeferredSpool(SQLSpool(create_spool_engine(url, busy_timeout=1.0), url), reactor)
        spool.start()
        self.addCleanup(spool.stop)
        return spool, None


class _StubSpool:
    """A spool whose ping and status answer only when the test says so."""

    url = "sqlite:////nowhere/spool.db"

    def __init__(self):
        self.pings: list[defer.Deferred] = []

    def ping(self) -> defer.Deferred:
        d = defer.Deferred()
        self.pings.append(d)
        return d

    def status(self, now: float) -> defer.Deferred:
        return defer.fail(SpoolUnavailable("The spool sqlite:////nowhere/spool.db cannot be opened."))


class MetricsPolicyTests(unittest.TestCase):
    """What needs no spool: reason classes, argument checks, the health ping's timeout and sharing."""

    def test_reason_classes(self):
        """Reply codes and enhanced status codes map onto the fixed reason set."""
        D, B = State.DEFERRED, State.BOUNCED
        cases = [
            (D, 421, None, "network"), (D, 451, "4.4.2 Connection lost", "network"),
            (D, 451, "4.4.3 DNS lookup failed", "dns"), (B, 550, "5.1.2 Domain does not exist", "dns"),
            (B, 556, "5.1.10 null MX", "dns"), (B, 556, None, "dns"),
            (D, 454, "4.7.5 no STARTTLS and TLS is required", "tls"), (D, 454, None, "tls"),
            (D, 454, "4.7.0 TLS with x failed", "tls"),
            (D, 450, "4.2.0 Mailbox busy", "mailbox"), (B, 550, None, "mailbox"),
            (B, 550, "5.1.1 No such user", "mailbox"), (B, 552, "5.3.4 too big", "content"),
            (B, 554, "5.6.3 8-bit", "content"), (B, 554, "5.7.1 spam", "policy"), (B, 554, None, "policy"),
            (B, 554, "4.4.7 Delivery time expired", "expired"), (B, 450, "4.2.0 busy", "expired"),
            (D, 451, "4.3.0 try later", "other"), (D, 451, None, "other"), (B, 500, "5.5.2 huh", "other"),
            (D, -1, None, "other"),
        ]
        for state, code, text, expected in cases:
            self.assertEqual(reason_class(state, code, text), expected, (state, code, text))
        self.assertEqual(reason_class(B, 554, None, age=100.0, max_lifetime=100.0), "expired")
        self.assertEqual(reason_class(B, 554, None, age=99.0, max_lifetime=100.0), "policy")
        self.assertTrue(all(r in REASONS for *_, r in cases))

    def test_bad_arguments_are_refused(self):
        """An unknown enqueue source or a non-attempt state raises instead of adding label values."""
        metrics = RelayMetrics(clock=task.Clock())
        self.assertRaises(ValueError, metrics.enqueued, 1, "smtp")
        self.assertRaises(ValueError, metrics.outcome, State.QUEUED, 250, 0.0, 1.0)
        metrics.enqueued(0)
        body, _ = metrics.exposition()
        self.assertIn(b'relay_enqueued_total{source="submission"} 0.0', body)
        self.assertNotIn(b'"smtp"', body)

    def test_off_when_listen_is_empty(self):
        """metrics.listen = "" builds no service."""
        config = Config(hostname="h", node="n", spool_url="sqlite:///x.db")
        self.assertIsNone(build_metrics_service(config, RelayMetrics(clock=task.Clock()), _StubSpool(),
                                                task.Clock()))

    def test_oldest_age_is_computed_at_scrape_time(self):
        """The oldest-pending age grows with the clock between refreshes, without a spool read."""
        clock = task.Clock()
        clock.advance(1000)
        metrics = RelayMetrics(clock=clock)
        from relay.model import SpoolStatus
        metrics.spool_status(SpoolStatus(messages=1, recipients={"queued": 1}, oldest_pending_at=990.0,
                                         next_attempt_at=None), clock.seconds())
        self.assertEqual(metrics.registry.get_sample_value("relay_oldest_pending_age_seconds"), 10)
        clock.advance(5)
        self.assertEqual(metrics.registry.get_sample_value("relay_oldest_pending_age_seconds"), 15)
        self.assertEqual(metrics.registry.get_sample_value("relay_recipients", {"state": "queued"}), 1)
        self.assertEqual(metrics.registry.get_sample_value("relay_recipients", {"state": "held"}), 0)

    def test_health_times_out_and_shares_one_ping(self):
        """A ping that hangs gives 503-worthy 'did not answer' after health_timeout; concurrent checks share one ping."""
        clock = task.Clock()
        spool = _StubSpool()
        svc = MetricsService(host="127.0.0.1", port=0, metrics=RelayMetrics(clock=clock), spool=spool,
                             reactor=clock, health_timeout=2.0)
        first, second = svc.check_health(), svc.check_health()
        self.assertEqual(len(spool.pings), 1)
        self.assertNoResult(first)
        clock.advance(2.0)
        self.assertIn("did not answer within 2s", self.successResultOf(first))
        self.assertIn("did not answer", self.successResultOf(second))
        third = svc.check_health()              # the hung ping is still the one in flight
        self.assertEqual(len(spool.pings), 1)
        spool.pings[0].callback(None)
        self.assertIsNone(self.successResultOf(third))
        self.assertEqual(clock.getDelayedCalls(), [])
        failing = svc.check_health()
        spool.pings[1].errback(SpoolUnavailable("The spool sqlite:////nowhere/spool.db cannot be opened."))
        self.assertEqual(self.successResultOf(failing), "The spool sqlite:////nowhere/spool.db cannot be opened.")

    def test_refresh_failure_sets_spool_down(self):
        """A status call that fails sets relay_spool_up to 0 and keeps the service refreshing."""
        clock = task.Clock()
        metrics = RelayMetrics(clock=clock)
        metrics.spool_up.set(1)
        svc = MetricsService(host="127.0.0.1", port=0, metrics=metrics, spool=_StubSpool(), reactor=clock)
        d = svc.refresh()
        self.successResultOf(d)
        self.assertEqual(metrics.registry.get_sample_value("relay_spool_up"), 0)
        self.assertIsNone(svc._refreshing)

    def test_refresh_that_hangs_sets_spool_down_until_it_answers(self):
        """A status read still unanswered one refresh interval later sets
        relay_spool_up to 0 (a locked or silently dead spool is down); no
        second read is started meanwhile, and the answer sets it back to 1."""
        clock = MemoryReactorClock()
        metrics = RelayMetrics(clock=clock)
        spool = _StubSpool()
        pending: list[defer.Deferred] = []
        spool.status = lambda now: pending.append(defer.Deferred()) or pending[-1]
        svc = MetricsService(host="127.0.0.1", port=0, metrics=metrics, spool=spool, reactor=clock,
                             refresh_interval=5.0)
        svc.startService()
        self.assertEqual(len(pending), 1)
        metrics.spool_up.set(1)
        clock.advance(4.9)
        self.assertEqual(metrics.registry.get_sample_value("relay_spool_up"), 1)
        clock.advance(0.1)
        self.assertEqual(metrics.registry.get_sample_value("relay_spool_up"), 0)
        clock.advance(10)
        self.assertEqual(len(pending), 1, "a hung read is not doubled")
        from relay.model import SpoolStatus
        pending[0].callback(SpoolStatus(messages=0, recipients={}, oldest_pending_at=None, next_attempt_at=None))
        self.assertEqual(metrics.registry.get_sample_value("relay_spool_up"), 1)
        self.successResultOf(svc.stopService())

    def test_busy_port_is_one_sentence(self):
        """A metrics.listen port that is taken fails start-up with one sentence naming the key."""
        taken = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        svc = MetricsService(host="127.0.0.1", port=port, metrics=RelayMetrics(clock=reactor), spool=_StubSpool(),
                             reactor=reactor)
        error = self.assertRaises(RelayError, svc.startService)
        self.assertIn(f"metrics.listen 127.0.0.1:{port}: cannot listen", str(error))
        self.assertFalse(svc.running)
