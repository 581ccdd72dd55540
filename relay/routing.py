"""Where mail for a destination goes: the routes table, then MX via twisted.names.

SPEC "Delivery semantics" -> "Routing": a ``routes`` entry for the domain (or
``"*"``) wins; otherwise the MX hosts are tried in preference order (random
among equal preferences, every address of a host in turn).  A domain without
MX but with an address record is its own mail host (implicit MX).  Null MX
(RFC 7505) bounces with 5.1.10, NXDOMAIN bounces with 5.1.2, a DNS failure or
timeout defers with 4.4.3.

``twisted.mail.relaymanager.MXCalculator.getMX`` is not used (it crashes on
equal preferences, returns one host, ignores null MX and silently drops the MX
set for bytes or trailing-dot names; see shared/notes/twisted.md §0.3 and §6).
The MX set is queried with ``resolver.lookupMailExchange`` and ordered here;
addresses come from explicit A and AAAA queries (never ``getHostByName``,
which sends ``ANY``, nor the system resolver).  ``MXCalculator`` is kept only
for its bad-host memory (``markBad``/``markGood``/``badMXs``, str keys).

Mapping of DNS outcomes (``RoutingFailure``):

========================================  ====  ==========  =========
situation                                 code  status      permanent
========================================  ====  ==========  =========
null MX (RFC 7505)                        556   5.1.10      yes
NXDOMAIN for the domain (MX query)        550   5.1.2       yes
no MX and no A/AAAA (NODATA)              550   5.1.2       yes
SERVFAIL / timeout / other DNS error      451   4.4.3       no
CNAME chain longer than 8 or a loop       451   4.4.3       no
MX hosts exist, none has an address       451   4.4.3 if a lookup failed
                                                temporarily, else 4.4.4
route host has no address / DNS error     451   4.4.4 / 4.4.3
unexpected error in the router            451   4.3.0       no
========================================  ====  ==========  =========
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.mail.relaymanager import MXCalculator
from twisted.names import client, dns, error, hosts, resolve
from zope.interface import Attribute, Interface, implementer

from relay.config import Route, parse_nameserver

__all__ = [
    "DNS_TIMEOUT",
    "MAX_CNAME_DEPTH",
    "Destination",
    "IRouter",
    "MailHost",
    "Route",
    "Router",
    "RoutingFailure",
    "destination_key",
    "make_resolver",
    "normalize_domain",
    "parse_nameserver",
]

_log = Logger()

#: Per-attempt UDP timeouts of the resolver ``make_resolver`` builds: each
#: value is one round over every configured server, so one query to one dead
#: server fails after 1 + 3 = 4 seconds (with N servers: 4 * N seconds).
DNS_TIMEOUT: tuple[float, ...] = (1, 3)

#: Most CNAME hops followed for one name (loops end here too).
MAX_CNAME_DEPTH = 8

#: How long a host marked bad stays at the end of the host list (seconds).
BAD_HOST_SECONDS = 3600

# -- values ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailHost:
    """A host to connect to: its name (for logs, bad-host marking and TLS
    verification), its addresses in the order to try, and the TCP port."""

    name: str
    addresses: tuple[str, ...]
    port: int
    preference: int


@dataclass(frozen=True, slots=True)
class Destination:
    """The result of routing one destination key: hosts in the order to try
    them, and the route (``None`` for MX delivery)."""

    key: str
    hosts: tuple[MailHost, ...]
    route: Route | None


class RoutingFailure(Exception):
    """Routing a destination failed; ``code``/``text`` are the SMTP-style reply
    to record for every recipient of it (``text`` starts with the enhanced
    status), and ``permanent`` says bounce (True) or defer (False)."""

    def __init__(self, code: int, text: str, permanent: bool) -> None:
        super().__init__(code, text, permanent)
        self.code = code
        self.text = text
        self.permanent = permanent

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    def __repr__(self) -> str:
        return f"RoutingFailure({self.code}, {self.text!r}, permanent={self.permanent})"


# -- pure helpers ---------------------------------------------------------------


def normalize_domain(domain: str | bytes) -> str:
    """Return *domain* as a lower-cased str without trailing dot(s)."""
    if isinstance(domain, bytes):
        domain = domain.decode("ascii", "replace")
    return domain.strip().lower().rstrip(".")


def _route_key(domain: str, routes: Mapping[str, Route]) -> str | None:
    """The key of *routes* that applies to the normalised *domain*, if any."""
    if domain in routes:
        return domain
    for key in routes:  # tolerate un-normalised keys ("Example.COM.")
        if key != "*" and normalize_domain(key) == domain:
            return key
    return "*" if "*" in routes else None


def destination_key(domain: str, routes: Mapping[str, Route]) -> str:
    """The destination a recipient domain belongs to: the domain itself when
    it has its own route, else ``"*"`` when that route exists, else the
    domain (lower-cased, no trailing dot).  Pure; the drain groups with it."""
    d = normalize_domain(domain)
    key = _route_key(d, routes)
    return "*" if key == "*" else d


def _ip_literal(host: str) -> str | None:
    """The address of an IP literal (``1.2.3.4``, ``::1``, ``[::1]``), else None."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return None


def _address_literal(domain: str) -> str | None:
    """The address of an RFC 5321 address literal domain (``[127.0.0.1]``,
    ``[IPv6:::1]``), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def _to_ascii(name: str) -> str:
    """The A-label (IDNA) form of *name*; raises UnicodeError if it has none."""
    if name.isascii():
        if not name or any(not label or len(label) > 63 for label in name.split(".")):
            raise UnicodeError(f"bad domain name {name!r}")
        return name
    return name.encode("idna").decode("ascii")


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def make_resolver(nameservers: Sequence[str], reactor: Any, *,
                  timeout: Sequence[float] = DNS_TIMEOUT) -> Any:
    """Build the twisted.names resolver for ``dns.nameservers``.

    An empty list means the system's: ``/etc/hosts`` then the servers of
    ``/etc/resolv.conf`` (what ``client.createResolver()`` builds, but with
    *reactor* injected and *timeout* instead of 60 s).  Otherwise a
    ``client.Resolver`` querying the given servers in order.  A dead server
    makes one query fail after ``sum(timeout)`` seconds per server (4 s).
    No cache: ``CacheResolver`` in a ``ResolverChain`` is never filled by
    client lookups, so it would only add delayed calls.
    """
    timeout = tuple(timeout)
    if not nameservers:
        return resolve.ResolverChain([
            hosts.Resolver(b"/etc/hosts"),
            client.Resolver(resolv="/etc/resolv.conf", reactor=reactor, timeout=timeout),
        ])
    servers = [parse_nameserver(s) for s in nameservers]
    return client.Resolver(servers=servers, reactor=reactor, timeout=timeout)


# -- the router ---------------------------------------------------------------


class IRouter(Interface):
    """Turns a destination key into the mail hosts to try, in order."""

    routes = Attribute("Mapping[str, Route]: the routes table.")

    def destination_key(domain: str) -> str:
        """The destination key of a recipient domain (see ``destination_key``)."""

    def resolve(key: str) -> defer.Deferred[Destination]:
        """Route *key* (a destination key or a recipient domain).

        @return: a Deferred firing with a L{Destination} whose ``hosts`` is
            never empty; hosts marked bad come after the others.
        @raise RoutingFailure: (as the Deferred's failure) when there is no
            host to try; ``permanent`` says bounce or defer.  Never fails
            with anything else.
        """

    def mark_bad(host_name: str) -> None:
        """Record that *host_name* (a ``MailHost.name``) could not take mail;
        it goes to the end of host lists for an hour."""

    def mark_good(host_name: str) -> None:
        """Record that *host_name* took mail (forget it was bad)."""


class _CNAMEChainTooLong(Exception):
    """A CNAME chain longer than MAX_CNAME_DEPTH, or a loop."""


_Lookup = Callable[[str], Awaitable[Any]]


@implementer(IRouter)
class Router:
    """See L{IRouter}.  ``resolver`` provides ``lookupMailExchange``,
    ``lookupAddress`` and ``lookupIPV6Address``; ``clock`` drives the
    bad-host memory; ``port`` is ``delivery.port``; ``rng`` orders equal MX
    preferences (inject a seeded ``random.Random`` in tests)."""

    def __init__(self, resolver: Any, clock: IReactorTime, routes: Mapping[str, Route],
                 port: int, *, rng: random.Random | None = None,
                 bad_host_seconds: float = BAD_HOST_SECONDS) -> None:
        self.resolver = resolver
        self.clock = clock
        self.routes = {("*" if k == "*" else normalize_domain(k)): r for k, r in routes.items()}
        self.port = port
        self._random = rng if rng is not None else random.Random()
        self._mx = MXCalculator(resolver=resolver, clock=clock)
        self._mx.timeOutBadMX = bad_host_seconds

    # bad-host memory (MXCalculator keys are str; see twisted.md §6 gotchas)

    def mark_bad(self, host_name: str) -> None:
        self._mx.markBad(normalize_domain(host_name))

    def mark_good(self, host_name: str) -> None:
        self._mx.markGood(normalize_domain(host_name))

    def is_bad(self, host_name: str) -> bool:
        """True while *host_name* is marked bad (expiry at ``badUntil``, lazily)."""
        name = normalize_domain(host_name)
        until = self._mx.badMXs.get(name)
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self._mx.badMXs[name]
            return False
        return True

    def destination_key(self, domain: str) -> str:
        return destination_key(domain, self.routes)

    def order_exchanges(self, exchanges: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        """Order (preference, name) pairs: duplicates dropped (lowest
        preference kept), preference order, equal preferences shuffled,
        then every host marked bad moved after the others (kept in order)."""
        best: dict[str, int] = {}
        for pref, name in exchanges:
            if name not in best or pref < best[name]:
                best[name] = pref
        items = [(pref, name) for name, pref in best.items()]
        self._random.shuffle(items)
        items.sort(key=lambda item: item[0])
        good = [item for item in items if not self.is_bad(item[1])]
        bad = [item for item in items if self.is_bad(item[1])]
        return good + bad

    def resolve(self, key: str) -> defer.Deferred[Destination]:
        return defer.ensureDeferred(self._resolve(key))

    # -- internals --------------------------------------------------------

    async def _resolve(self, key: str) -> Destination:
        try:
            domain = normalize_domain(key)
            route_key = _route_key(domain, self.routes)
            if route_key is not None:
                route = self.routes[route_key]
                host = await self._route_host(route)
                return Destination("*" if route_key == "*" else domain, (host,), route)
            if domain == "*":
                raise RoutingFailure(451, "4.3.0 No route for '*' is configured", False)
            literal = _address_literal(domain)
            if literal is not None:
                return Destination(domain, (MailHost(domain, (literal,), self.port, 0),), None)
            return Destination(domain, await self._mx_hosts(domain), None)
        except RoutingFailure:
            raise
        except Exception:
            _log.failure("Unexpected error while routing {key!r}", key=key)
            raise RoutingFailure(451, f"4.3.0 Internal error while routing {key}", False) from None

    async def _route_host(self, route: Route) -> MailHost:
        literal = _ip_literal(route.host)
        name = normalize_domain(route.host)
        if literal is not None:
            return MailHost(literal, (literal,), route.port, 0)
        try:
            ascii_name = _to_ascii(name)
        except UnicodeError:
            raise RoutingFailure(451, f"4.4.4 Route host {route.host!r} is not a valid name",
                                 False) from None
        addresses, temp_error = await self._addresses(ascii_name)
        if addresses:
            return MailHost(name, addresses, route.port, 0)
        if temp_error is not None:
            raise _temporary(f"route host {name}", temp_error)
        raise RoutingFailure(451, f"4.4.4 Route host {name} has no address", False)

    async def _mx_hosts(self, domain: str) -> tuple[MailHost, ...]:
        try:
            ascii_domain = _to_ascii(domain)
        except UnicodeError:
            raise RoutingFailure(550, f"5.1.2 Bad destination domain {domain!r}", True) from None
        try:
            records = await self._chain(self.resolver.lookupMailExchange, ascii_domain, dns.MX)
        except error.DNSNameError:
            raise RoutingFailure(550, f"5.1.2 Domain {domain} does not exist (NXDOMAIN)",
                                 True) from None
        except Exception as exc:
            raise _temporary(f"MX of {domain}", exc) from None

        exchanges = [(int(r.preference), normalize_domain(str(r.name))) for r in records]
        if exchanges and all(name == "" for _, name in exchanges):
            raise RoutingFailure(556, f"5.1.10 Recipient address has null MX ({domain})", True)
        exchanges = [(pref, name) for pref, name in exchanges if name]

        if not exchanges:  # implicit MX (RFC 5321 §5.1)
            addresses, temp_error = await self._addresses(ascii_domain)
            if addresses:
                return (MailHost(domain, addresses, self.port, 0),)
            if temp_error is not None:
                raise _temporary(f"address of {domain}", temp_error)
            raise RoutingFailure(550, f"5.1.2 Domain {domain} has no MX or address record", True)

        ordered = self.order_exchanges(exchanges)
        results = await defer.gatherResults(
            [defer.ensureDeferred(self._host_addresses(name)) for _, name in ordered],
            consumeErrors=True,
        )
        hosts_: list[MailHost] = []
        temp_errors: list[Exception] = []
        for (pref, name), (addresses, temp_error) in zip(ordered, results):
            if addresses:
                hosts_.append(MailHost(name, addresses, self.port, pref))
            elif temp_error is not None:
                temp_errors.append(temp_error)
        if hosts_:
            return tuple(hosts_)
        if temp_errors:
            raise _temporary(f"the MX hosts of {domain}", temp_errors[0])
        raise RoutingFailure(451, f"4.4.4 No MX host of {domain} has an address", False)

    async def _host_addresses(self, name: str) -> tuple[tuple[str, ...], Exception | None]:
        try:
            ascii_name = _to_ascii(name)
        except UnicodeError:
            return (), None
        return await self._addresses(ascii_name)

    async def _addresses(self, name: str) -> tuple[tuple[str, ...], Exception | None]:
        """A then AAAA addresses of *name* (each in resolver order), and the
        first temporary error met (NXDOMAIN/NODATA are not errors here)."""
        d4 = defer.ensureDeferred(self._family(name, self.resolver.lookupAddress, dns.A))
        d6 = defer.ensureDeferred(self._family(name, self.resolver.lookupIPV6Address, dns.AAAA))
        v4, err4 = await d4
        v6, err6 = await d6
        return _unique(v4 + v6), err4 or err6

    async def _family(self, name: str, lookup: _Lookup,
                      rtype: int) -> tuple[list[str], Exception | None]:
        try:
            records = await self._chain(lookup, name, rtype)
        except error.DNSNameError:
            return [], None
        except Exception as exc:
            return [], exc
        return [r.dottedQuad() if rtype == dns.A else str(ipaddress.ip_address(r.address))
                for r in records], None

    async def _chain(self, lookup: _Lookup, name: str, rtype: int) -> list[Any]:
        """Payloads of type *rtype* owned by *name* or the end of its CNAME
        chain.  The chain is followed inside each answer and, when a server
        returns only the CNAME, by querying the target (at most
        MAX_CNAME_DEPTH hops in all)."""
        current = name.lower()
        seen = {current}
        while True:
            answers, _authority, _additional = await lookup(current)
            records: dict[str, list[Any]] = {}
            cnames: dict[str, str] = {}
            for rr in answers:
                owner = normalize_domain(str(rr.name))
                if rr.type == rtype:
                    records.setdefault(owner, []).append(rr.payload)
                elif rr.type == dns.CNAME:
                    cnames[owner] = normalize_domain(str(rr.payload.name))
            moved = False
            while current not in records and current in cnames:
                current = cnames[current]
                if current in seen or len(seen) > MAX_CNAME_DEPTH:
                    raise _CNAMEChainTooLong(name)
                seen.add(current)
                moved = True
            if current in records:
                return records[current]
            if not moved:
                return []  # NODATA


def _temporary(what: str, exc: BaseException) -> RoutingFailure:
    """A 451 4.4.3 failure describing a DNS problem with *what*."""
    if isinstance(exc, RoutingFailure):
        return exc
    if isinstance(exc, error.DNSServerError):
        reason = "SERVFAIL"
    elif isinstance(exc, defer.TimeoutError):  # includes DNSQueryTimeoutError
        reason = "timeout"
    elif isinstance(exc, error.DNSQueryRefusedError):
        reason = "REFUSED"
    elif isinstance(exc, _CNAMEChainTooLong):
        reason = "CNAME chain too long or looping"
    elif isinstance(exc, error.DomainError):
        reason = type(exc).__name__
    else:
        reason = f"{type(exc).__name__}"
    return RoutingFailure(451, f"4.4.3 DNS lookup failed for {what}: {reason}", False)
