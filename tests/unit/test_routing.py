"""Unit tests for relay.routing: pure helpers and Router on a canned resolver (no sockets)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.names import client, dns, error, resolve
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relay.errors import ConfigError
from relay.routing import (
    DNS_TIMEOUT,
    Destination,
    IRouter,
    MailHost,
    Route,
    Router,
    RoutingFailure,
    destination_key,
    make_resolver,
    normalize_domain,
    parse_nameserver,
)

# -- a canned resolver ----------------------------------------------------------


class FakeResolver:
    """Answers from ``{name: {"MX": [...], "A": [...], "AAAA": [...], "CNAME": target}}``.

    A value that is an exception instance fails every query for that name;
    ``(name, TYPE)`` keys in ``errors`` fail only that type.  A name not in
    ``zones`` is NXDOMAIN.  CNAMEs are answered alone (not chased), the way
    a minimal server would, so the router has to query the target itself.
    Every query is recorded in ``calls`` as ``(name, TYPE)``.
    """

    def __init__(self, zones: dict[str, Any], errors: dict[tuple[str, str], Exception] | None = None):
        self.zones = zones
        self.errors = errors or {}
        self.calls: list[tuple[str, str]] = []

    def _answer(self, name: str, rtype: str) -> defer.Deferred:
        self.calls.append((name, rtype))
        if (name, rtype) in self.errors:
            return defer.fail(self.errors[(name, rtype)])
        data = self.zones.get(name)
        if data is None:
            return defer.fail(error.DNSNameError(name))
        if isinstance(data, Exception):
            return defer.fail(data)
        bname = name.encode()
        answers = []
        if rtype in data:
            for value in data[rtype]:
                if rtype == "MX":
                    payload = dns.Record_MX(value[0], value[1].encode())
                elif rtype == "A":
                    payload = dns.Record_A(value)
                else:
                    payload = dns.Record_AAAA(value)
                answers.append(dns.RRHeader(bname, payload.TYPE, dns.IN, 60, payload))
        elif "CNAME" in data:
            payload = dns.Record_CNAME(data["CNAME"].encode())
            answers.append(dns.RRHeader(bname, dns.CNAME, dns.IN, 60, payload))
        return defer.succeed((answers, [], []))

    def lookupMailExchange(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self._answer(name, "MX")

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self._answer(name, "A")

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self._answer(name, "AAAA")


def result(d: defer.Deferred) -> Any:
    """The result of an already-fired Deferred (raises its failure's exception)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure(d: defer.Deferred) -> RoutingFailure:
    """The RoutingFailure an already-fired Deferred failed with."""
    with pytest.raises(RoutingFailure) as info:
        result(d)
    return info.value


ZONES: dict[str, Any] = {
    "multi.test": {"MX": [(20, "mx2.multi.test"), (10, "mx1.multi.test"), (30, "mx3.multi.test")]},
    "mx1.multi.test": {"A": ["127.0.0.11"], "AAAA": ["::1"]},
    "mx2.multi.test": {"A": ["127.0.0.12", "127.0.0.13"]},
    "mx3.multi.test": {"AAAA": ["::1"]},
    "same.test": {"MX": [(10, "a.same.test"), (10, "b.same.test")]},
    "a.same.test": {"A": ["127.0.0.21"]},
    "b.same.test": {"A": ["127.0.0.22"]},
    "alias.test": {"CNAME": "alias2.test"},
    "alias2.test": {"CNAME": "multi.test"},
    "loop1.test": {"CNAME": "loop2.test"},
    "loop2.test": {"CNAME": "loop1.test"},
    "aonly.test": {"A": ["127.0.0.31"]},
    "v6only.test": {"AAAA": ["::1"]},
    "nodata.test": {},
    "nullmx.test": {"MX": [(0, "")]},
    "mixednull.test": {"MX": [(0, ""), (10, "mx1.multi.test")]},
    "servfail.test": error.DNSServerError("servfail.test"),
    "timeout.test": error.DNSQueryTimeoutError(1),
    "dangling.test": {"MX": [(10, "nohost.dangling.test"), (20, "mx2.multi.test")]},
    "alldangling.test": {"MX": [(10, "nohost.dangling.test")]},
    "danglingsf.test": {"MX": [(10, "nohost.dangling.test"), (20, "servfail.test")]},
    "smart.test": {"A": ["127.0.0.61"], "AAAA": ["::1"]},
}


def make_router(zones: dict[str, Any] = ZONES, routes: dict[str, Route] | None = None,
                seed: int = 0, errors: dict[tuple[str, str], Exception] | None = None,
                ) -> tuple[Router, FakeResolver, task.Clock]:
    resolver = FakeResolver(zones, errors)
    clock = task.Clock()
    return Router(resolver, clock, routes or {}, 2525, rng=random.Random(seed)), resolver, clock


def names(dest: Destination) -> list[str]:
    return [h.name for h in dest.hosts]


# -- pure helpers -----------------------------------------------------------------

ROUTE = Route("127.0.0.1", 2526, None, None, None)
STAR = Route("127.0.0.2", 2527, "none", "u", "p")


@pytest.mark.parametrize("domain, routes, expected", [
    ("Example.COM.", {}, "example.com"),                      # normalised, no route
    ("example.com", {"example.com": ROUTE}, "example.com"),   # its own route
    ("example.com", {"*": STAR}, "*"),                        # the catch-all route
    ("example.com", {"*": STAR, "example.com": ROUTE}, "example.com"),  # exact beats "*"
    ("other.com", {"example.com": ROUTE}, "other.com"),       # someone else's route
    ("EXAMPLE.com", {"Example.Com.": ROUTE, "*": STAR}, "example.com"),  # un-normalised key
])
def test_destination_key(domain: str, routes: dict[str, Route], expected: str) -> None:
    """destination_key applies exact route, then "*", then the bare domain."""
    assert destination_key(domain, routes) == expected


def test_normalize_domain_bytes_and_dots() -> None:
    """normalize_domain turns bytes and trailing-dot names into plain lower-case str."""
    assert normalize_domain(b"MX.Example.Test.") == "mx.example.test"


@pytest.mark.parametrize("spec, expected", [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("[::1]:5353", ("::1", 5353)),
    ("[::1]", ("::1", 53)),
    ("::1", ("::1", 53)),                  # bare IPv6, default port
])
def test_parse_nameserver(spec: str, expected: tuple[str, int]) -> None:
    """dns.nameservers entries parse to (ip, port) with port 53 by default."""
    assert parse_nameserver(spec) == expected


@pytest.mark.parametrize("spec", ["dns.example", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x"])
def test_parse_nameserver_rejects(spec: str) -> None:
    """A name instead of an IP, a bad port or broken brackets is a ConfigError."""
    with pytest.raises(ConfigError):
        parse_nameserver(spec)


def test_make_resolver_servers_and_timeout() -> None:
    """Configured nameservers give a client.Resolver with a short total timeout."""
    r = make_resolver(["127.0.0.1:5353", "[::1]"], task.Clock())
    assert isinstance(r, client.Resolver)
    assert r.servers == [("127.0.0.1", 5353), ("::1", 53)]
    assert tuple(r.timeout) == DNS_TIMEOUT and sum(DNS_TIMEOUT) <= 5


def test_make_resolver_system() -> None:
    """An empty list gives hosts file then resolv.conf, with the short timeout."""
    r = make_resolver([], task.Clock())
    assert isinstance(r, resolve.ResolverChain)
    assert isinstance(r.resolvers[-1], client.Resolver)
    assert tuple(r.resolvers[-1].timeout) == DNS_TIMEOUT


def test_route_validation() -> None:
    """Route refuses an unknown tls mode and never shows its password in repr."""
    with pytest.raises(ValueError):
        Route("127.0.0.1", 25, "sometimes", None, None)
    assert "secret" not in repr(Route("127.0.0.1", 25, None, "u", "secret"))


def test_router_provides_irouter() -> None:
    """Router fully provides IRouter."""
    router, _, _ = make_router()
    assert verifyObject(IRouter, router)


def test_routing_failure_str() -> None:
    """RoutingFailure renders as the SMTP reply line it stands for."""
    assert str(RoutingFailure(451, "4.4.3 x", False)) == "451 4.4.3 x"


# -- ordering and bad hosts -----------------------------------------------------------


def test_order_by_preference_with_equal_shuffled() -> None:
    """Lower preference comes first; equal preferences are shuffled by the injected Random."""
    orders = set()
    for seed in range(30):
        router, _, _ = make_router(seed=seed)
        order = router.order_exchanges([(20, "c"), (10, "a"), (10, "b"), (5, "d")])
        assert order[0] == (5, "d") and order[-1] == (20, "c")
        orders.add(tuple(name for _, name in order[1:3]))
    assert orders == {("a", "b"), ("b", "a")}


def test_order_is_reproducible_with_a_seed() -> None:
    """The same seed gives the same order of equal preferences."""
    exchanges = [(10, f"mx{i}") for i in range(6)]
    first = make_router(seed=7)[0].order_exchanges(exchanges)
    again = make_router(seed=7)[0].order_exchanges(exchanges)
    assert first == again


def test_order_drops_duplicates_keeping_lowest_preference() -> None:
    """A host listed twice appears once, at its lowest preference."""
    router, _, _ = make_router()
    assert router.order_exchanges([(30, "a"), (20, "b"), (10, "a")]) == [(10, "a"), (20, "b")]


def test_bad_host_goes_last_until_it_expires() -> None:
    """A host marked bad moves after the good ones and comes back after an hour."""
    router, _, clock = make_router()
    router.mark_bad("MX1.multi.test.")
    dest = result(router.resolve("multi.test"))
    assert names(dest) == ["mx2.multi.test", "mx3.multi.test", "mx1.multi.test"]
    clock.advance(3599)
    assert names(result(router.resolve("multi.test")))[-1] == "mx1.multi.test"
    clock.advance(1)
    assert names(result(router.resolve("multi.test")))[0] == "mx1.multi.test"


def test_all_bad_hosts_are_still_returned_in_order() -> None:
    """When every host is bad, all are still tried, in preference order."""
    router, _, _ = make_router()
    for name in ("mx3.multi.test", "mx1.multi.test", "mx2.multi.test"):
        router.mark_bad(name)
    dest = result(router.resolve("multi.test"))
    assert names(dest) == ["mx1.multi.test", "mx2.multi.test", "mx3.multi.test"]


def test_mark_good_forgets_bad_host() -> None:
    """mark_good with the str name undoes mark_bad (the MXCalculator key is a str)."""
    router, _, _ = make_router()
    router.mark_bad("mx1.multi.test")
    assert router.is_bad("mx1.multi.test")
    router.mark_good("mx1.multi.test")
    assert not router.is_bad("mx1.multi.test")
    assert names(result(router.resolve("multi.test")))[0] == "mx1.multi.test"


# -- MX resolution ------------------------------------------------------------------


def test_multi_mx_hosts_addresses_and_port() -> None:
    """Hosts come in preference order with A then AAAA addresses and delivery.port."""
    router, resolver, _ = make_router()
    dest = result(router.resolve("Multi.Test."))
    assert dest == Destination("multi.test", (
        MailHost("mx1.multi.test", ("127.0.0.11", "::1"), 2525, 10),
        MailHost("mx2.multi.test", ("127.0.0.12", "127.0.0.13"), 2525, 20),
        MailHost("mx3.multi.test", ("::1",), 2525, 30),
    ), None)
    assert {t for _, t in resolver.calls} == {"MX", "A", "AAAA"}
    assert ("multi.test", "MX") in resolver.calls


def test_cname_chain_is_followed_by_requery() -> None:
    """A domain that is a CNAME (twice) gets the target's MX set."""
    router, resolver, _ = make_router()
    dest = result(router.resolve("alias.test"))
    assert dest.key == "alias.test"
    assert names(dest) == ["mx1.multi.test", "mx2.multi.test", "mx3.multi.test"]
    assert ("multi.test", "MX") in resolver.calls


def test_cname_loop_defers() -> None:
    """A CNAME loop is a temporary 4.4.3 failure, not a hang."""
    router, _, _ = make_router()
    f = failure(router.resolve("loop1.test"))
    assert (f.code, f.permanent) == (451, False) and f.text.startswith("4.4.3 ")


def test_null_mx_bounces() -> None:
    """A null MX (RFC 7505) is a permanent 556 5.1.10."""
    router, _, _ = make_router()
    f = failure(router.resolve("nullmx.test"))
    assert (f.code, f.permanent) == (556, True)
    assert f.text.startswith("5.1.10 Recipient address has null MX")


def test_null_mx_among_real_mx_is_ignored() -> None:
    """A "." record next to real MX records is skipped, the others are used."""
    router, _, _ = make_router()
    assert names(result(router.resolve("mixednull.test"))) == ["mx1.multi.test"]


def test_nxdomain_bounces() -> None:
    """NXDOMAIN for the domain is a permanent 550 5.1.2."""
    router, _, _ = make_router()
    f = failure(router.resolve("nosuch.test"))
    assert (f.code, f.permanent) == (550, True) and f.text.startswith("5.1.2 ")


@pytest.mark.parametrize("domain, reason", [("servfail.test", "SERVFAIL"),
                                            ("timeout.test", "timeout")])
def test_dns_failure_defers(domain: str, reason: str) -> None:
    """SERVFAIL and a DNS timeout are a temporary 451 4.4.3."""
    router, _, _ = make_router()
    f = failure(router.resolve(domain))
    assert (f.code, f.permanent) == (451, False)
    assert f.text.startswith("4.4.3 ") and reason in f.text


@pytest.mark.parametrize("domain, address", [("aonly.test", "127.0.0.31"), ("v6only.test", "::1")])
def test_implicit_mx(domain: str, address: str) -> None:
    """A domain with no MX but an A or AAAA record is its own host, preference 0."""
    router, _, _ = make_router()
    assert result(router.resolve(domain)).hosts == (MailHost(domain, (address,), 2525, 0),)


def test_no_mx_no_address_bounces() -> None:
    """A domain with neither MX nor address records (NODATA) is a permanent 5.1.2."""
    router, _, _ = make_router()
    f = failure(router.resolve("nodata.test"))
    assert (f.code, f.permanent) == (550, True) and f.text.startswith("5.1.2 ")


def test_implicit_mx_address_servfail_defers() -> None:
    """No MX plus an address lookup SERVFAIL defers with 4.4.3 instead of bouncing."""
    router, _, _ = make_router(errors={("nodata.test", "A"): error.DNSServerError("x")})
    f = failure(router.resolve("nodata.test"))
    assert (f.code, f.permanent) == (451, False) and f.text.startswith("4.4.3 ")


def test_dangling_mx_host_is_skipped() -> None:
    """An MX host without any address is left out; the others remain."""
    router, _, _ = make_router()
    assert names(result(router.resolve("dangling.test"))) == ["mx2.multi.test"]


def test_all_mx_hosts_dangling_defers_4_4_4() -> None:
    """When no MX host has an address (all NXDOMAIN) the domain defers with 4.4.4."""
    router, _, _ = make_router()
    f = failure(router.resolve("alldangling.test"))
    assert (f.code, f.permanent) == (451, False) and f.text.startswith("4.4.4 ")


def test_mx_hosts_unresolvable_with_servfail_defers_4_4_3() -> None:
    """When no MX host has an address and one lookup failed temporarily, 4.4.3."""
    router, _, _ = make_router()
    f = failure(router.resolve("danglingsf.test"))
    assert (f.code, f.permanent) == (451, False) and f.text.startswith("4.4.3 ")


def test_address_literal_domain_needs_no_dns() -> None:
    """A domain literal like [127.0.0.1] is delivered to that address without DNS."""
    router, resolver, _ = make_router()
    dest = result(router.resolve("[IPv6:::1]"))
    assert dest.hosts == (MailHost("[ipv6:::1]", ("::1",), 2525, 0),)
    assert resolver.calls == []


def test_unexpected_error_becomes_temporary() -> None:
    """A resolver that blows up unexpectedly yields a temporary failure, never a crash."""
    class Broken:
        def lookupMailExchange(self, name: str) -> defer.Deferred:
            raise RuntimeError("boom")
    router = Router(Broken(), task.Clock(), {}, 25)
    f = failure(router.resolve("example.test"))
    assert (f.code, f.permanent) == (451, False)


# -- routes ---------------------------------------------------------------------------


def test_route_ip_literal_is_used_as_is() -> None:
    """A route to an IP literal needs no DNS and keeps the route's port and settings."""
    route = Route("[::1]", 2600, "required", "user", "pw")
    router, resolver, _ = make_router(routes={"multi.test": route})
    dest = result(router.resolve("multi.test"))
    assert dest == Destination("multi.test", (MailHost("::1", ("::1",), 2600, 0),), route)
    assert resolver.calls == []


def test_star_route_catches_other_domains() -> None:
    """The "*" route serves any domain without its own route, under key "*"."""
    router, resolver, _ = make_router(routes={"*": STAR, "multi.test": ROUTE})
    assert router.destination_key("nosuch.test") == "*"
    dest = result(router.resolve("nosuch.test"))
    assert dest.key == "*" and dest.route is STAR
    assert dest.hosts[0].addresses == ("127.0.0.2",)
    assert result(router.resolve("*")).route is STAR
    assert result(router.resolve("multi.test")).route is ROUTE
    assert resolver.calls == []


def test_route_host_name_resolved_with_a_and_aaaa() -> None:
    """A route host name is resolved with A and AAAA queries through the resolver."""
    route = Route("Smart.Test", 587, None, None, None)
    router, resolver, _ = make_router(routes={"*": route})
    dest = result(router.resolve("anything.test"))
    assert dest.hosts == (MailHost("smart.test", ("127.0.0.61", "::1"), 587, 0),)
    assert sorted(resolver.calls) == [("smart.test", "A"), ("smart.test", "AAAA")]


@pytest.mark.parametrize("host, status", [("nosuch.test", "4.4.4"), ("servfail.test", "4.4.3")])
def test_unresolvable_route_host_defers(host: str, status: str) -> None:
    """A route host without an address defers (a configuration problem, never a bounce)."""
    router, _, _ = make_router(routes={"*": Route(host, 25, None, None, None)})
    f = failure(router.resolve("anything.test"))
    assert (f.code, f.permanent) == (451, False) and f.text.startswith(status + " ")


def test_star_without_route_defers() -> None:
    """Resolving the "*" key with no "*" route is a temporary failure, not an MX lookup."""
    router, resolver, _ = make_router()
    f = failure(router.resolve("*"))
    assert (f.code, f.permanent) == (451, False)
    assert resolver.calls == []
