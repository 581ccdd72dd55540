"""Router against a real DNS server (relay.testing_dns.DNSFixture) on loopback over UDP."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.names import client, dns
from twisted.trial import unittest

from relay.routing import MailHost, Route, Router, RoutingFailure, make_resolver
from relay.testing_dns import DNSFixture

ZONES: dict[str, Any] = {
    "multi.test": {"MX": [(20, "mx2.multi.test"), (10, "mx1.multi.test"), (30, "mx3.multi.test")]},
    "mx1.multi.test": {"A": ["127.0.0.11"]},
    "mx2.multi.test": {"A": ["127.0.0.12"]},
    "mx3.multi.test": {"A": ["127.0.0.13"]},
    "samepref.test": {"MX": [(10, "a.samepref.test"), (10, "b.samepref.test")]},
    "a.samepref.test": {"A": ["127.0.0.21"]},
    "b.samepref.test": {"A": ["127.0.0.22"]},
    "alias.test": {"CNAME": "multi.test"},
    "aonly.test": {"A": ["127.0.0.31"]},
    "v6only.test": {"AAAA": ["::1"]},
    "txtonly.test": {"TXT": ["v=spf1 -all"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "servfail.test": "SERVFAIL",
    "silent.test": "TIMEOUT",
    "dangling.test": {"MX": [(10, "nohost.dangling.test"), (20, "mx.dangling.test")]},
    "mx.dangling.test": {"A": ["127.0.0.41"]},
    "dual.test": {"MX": [(10, "mx.dual.test")]},
    "mx.dual.test": {"A": ["127.0.0.51", "127.0.0.52"], "AAAA": ["::1"]},
    "smart.test": {"A": ["127.0.0.61"]},
}

#: Short UDP timeouts so the non-answering server test stays well under a second.
TIMEOUT = (0.3, 0.4)


class RouterDNSTests(unittest.TestCase):
    """Router + make_resolver against DNSFixture on 127.0.0.1 (UDP)."""

    chase_cnames = True

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.dns = DNSFixture(ZONES, reactor, chase_cnames=self.chase_cnames)
        yield self.dns.start()
        self.addCleanup(self.dns.stop)
        self.resolver = make_resolver([f"127.0.0.1:{self.dns.port}"], reactor, timeout=TIMEOUT)

    def router(self, seed: int = 0, routes: dict[str, Route] | None = None) -> Router:
        return Router(self.resolver, reactor, routes or {}, 2525, rng=random.Random(seed))

    @defer.inlineCallbacks
    def failure(self, domain: str) -> Any:
        """Resolve *domain* expecting a RoutingFailure, and return it."""
        try:
            dest = yield self.router().resolve(domain)
        except RoutingFailure as exc:
            return exc
        self.fail(f"{domain} resolved to {dest}")

    @defer.inlineCallbacks
    def test_multi_mx_in_preference_order(self) -> Any:
        """Three MX hosts come back lowest preference first, each with its address."""
        dest = yield self.router().resolve("MULTI.test.")
        self.assertEqual(dest.hosts, (
            MailHost("mx1.multi.test", ("127.0.0.11",), 2525, 10),
            MailHost("mx2.multi.test", ("127.0.0.12",), 2525, 20),
            MailHost("mx3.multi.test", ("127.0.0.13",), 2525, 30),
        ))
        self.assertTrue({t for _, t in self.dns.queries} <= {"MX", "A", "AAAA"})

    @defer.inlineCallbacks
    def test_equal_preference_both_orders(self) -> Any:
        """Two MX of equal preference resolve without TypeError, in both orders over seeds."""
        orders = set()
        for seed in range(16):
            dest = yield self.router(seed).resolve("samepref.test")
            orders.add(tuple(h.name for h in dest.hosts))
        self.assertEqual(orders, {("a.samepref.test", "b.samepref.test"),
                                  ("b.samepref.test", "a.samepref.test")})

    @defer.inlineCallbacks
    def test_cname(self) -> Any:
        """A CNAME'd domain gets the target's MX set."""
        dest = yield self.router().resolve("alias.test")
        self.assertEqual([h.name for h in dest.hosts],
                         ["mx1.multi.test", "mx2.multi.test", "mx3.multi.test"])

    @defer.inlineCallbacks
    def test_implicit_mx_a_only(self) -> Any:
        """A domain with only an A record is its own mail host."""
        dest = yield self.router().resolve("aonly.test")
        self.assertEqual(dest.hosts, (MailHost("aonly.test", ("127.0.0.31",), 2525, 0),))

    @defer.inlineCallbacks
    def test_implicit_mx_aaaa_only(self) -> Any:
        """A domain with only an AAAA record is its own mail host."""
        dest = yield self.router().resolve("v6only.test")
        self.assertEqual(dest.hosts, (MailHost("v6only.test", ("::1",), 2525, 0),))

    @defer.inlineCallbacks
    def test_null_mx(self) -> Any:
        """A null MX is a permanent 556 5.1.10."""
        f = yield self.failure("nullmx.test")
        self.assertEqual((f.code, f.permanent), (556, True))
        self.assertTrue(f.text.startswith("5.1.10 "))

    @defer.inlineCallbacks
    def test_nxdomain(self) -> Any:
        """A domain that does not exist is a permanent 550 5.1.2."""
        f = yield self.failure("nosuch.test")
        self.assertEqual((f.code, f.permanent), (550, True))
        self.assertTrue(f.text.startswith("5.1.2 "))

    @defer.inlineCallbacks
    def test_nodata(self) -> Any:
        """A domain with neither MX nor address (TXT only) is a permanent 5.1.2."""
        f = yield self.failure("txtonly.test")
        self.assertEqual((f.code, f.permanent), (550, True))
        self.assertTrue(f.text.startswith("5.1.2 "))

    @defer.inlineCallbacks
    def test_servfail(self) -> Any:
        """SERVFAIL is a temporary 451 4.4.3."""
        f = yield self.failure("servfail.test")
        self.assertEqual((f.code, f.permanent), (451, False))
        self.assertTrue(f.text.startswith("4.4.3 ") and "SERVFAIL" in f.text)

    @defer.inlineCallbacks
    def test_silent_server_times_out(self) -> Any:
        """A server that never answers gives a temporary 4.4.3 after the resolver timeouts."""
        start = time.monotonic()
        f = yield self.failure("silent.test")
        elapsed = time.monotonic() - start
        self.assertEqual((f.code, f.permanent), (451, False))
        self.assertTrue(f.text.startswith("4.4.3 ") and "timeout" in f.text)
        self.assertTrue(sum(TIMEOUT) - 0.1 <= elapsed < sum(TIMEOUT) + 1.5, elapsed)

    @defer.inlineCallbacks
    def test_dangling_mx_host_skipped(self) -> Any:
        """An MX host whose name does not exist is skipped; the next one remains."""
        dest = yield self.router().resolve("dangling.test")
        self.assertEqual([h.name for h in dest.hosts], ["mx.dangling.test"])

    @defer.inlineCallbacks
    def test_host_with_a_and_aaaa(self) -> Any:
        """A host with A and AAAA records gets every address, A first."""
        dest = yield self.router().resolve("dual.test")
        self.assertEqual(dest.hosts[0].addresses, ("127.0.0.51", "127.0.0.52", "::1"))

    @defer.inlineCallbacks
    def test_route_host_resolved_through_fixture(self) -> Any:
        """A route host name is resolved by A/AAAA queries to the configured server."""
        route = Route("smart.test", 587, "required", None, None)
        dest = yield self.router(routes={"*": route}).resolve("multi.test")
        self.assertEqual((dest.key, dest.route), ("*", route))
        self.assertEqual(dest.hosts, (MailHost("smart.test", ("127.0.0.61",), 587, 0),))
        self.assertNotIn(("multi.test", "MX"), self.dns.queries)


class RouterNonChasingDNSTests(RouterDNSTests):
    """The same tests against a server that answers a CNAME without following it."""

    chase_cnames = False


class FixtureTests(unittest.TestCase):
    """DNSFixture details: TCP twin port and the standalone process."""

    @defer.inlineCallbacks
    def test_tcp_on_same_port(self) -> Any:
        """The fixture answers over TCP on the UDP port number too."""
        fixture = DNSFixture(ZONES, reactor)
        yield fixture.start()
        self.addCleanup(fixture.stop)
        resolver = client.Resolver(servers=[fixture.address], reactor=reactor)
        message = yield resolver.queryTCP([dns.Query(b"mx1.multi.test", dns.A)])
        self.assertEqual([a.payload.dottedQuad() for a in message.answers], ["127.0.0.11"])

    def test_refuses_non_loopback(self) -> None:
        """The fixture never listens on a non-loopback address."""
        self.assertRaises(ValueError, DNSFixture, ZONES, reactor, interface="0.0.0.0")

    @defer.inlineCallbacks
    def test_standalone_process(self) -> Any:
        """`python -m relay.testing_dns` prints its port, serves the zones and exits 0 on SIGTERM."""
        tmp = tempfile.mkdtemp()
        zones_file = Path(tmp, "zones.json")
        zones_file.write_text(json.dumps(ZONES))
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.testing_dns", "--port", "0", "--zones", str(zones_file)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        self.assertTrue(ready, "no port printed within 10 s")
        port = int(proc.stdout.readline())
        resolver = make_resolver([f"127.0.0.1:{port}"], reactor, timeout=TIMEOUT)
        dest = yield Router(resolver, reactor, {}, 25).resolve("multi.test")
        self.assertEqual(dest.hosts[0].addresses, ("127.0.0.11",))
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        proc.stdout.close()
        proc.stderr.close()
