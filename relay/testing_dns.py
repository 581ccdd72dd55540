"""A small authoritative DNS server on loopback, for tests.

Zones are a plain dict of names (no zone cuts, no SOA)::

    {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")],
                         "A": ["127.0.0.2"], "AAAA": ["::1"], "TXT": ["hello"]},
        "nullmx.test": {"MX": [(0, "")]},          # RFC 7505 null MX ("." works too)
        "alias.test": {"CNAME": "example.test"},
        "servfail.test": "SERVFAIL",              # every query answered SERVFAIL
        "silent.test": "TIMEOUT",                 # every query dropped, never answered
    }

A name not in the dict gets NXDOMAIN; a name present without a record of the
asked type gets an empty NOERROR answer (NODATA).  A CNAME is answered for
every type and, like a real authoritative server, the chain is followed
inside the data (set ``chase_cnames=False`` to answer with the CNAME only).
Name matching is case-insensitive and ignores a trailing dot.

Two ways to use it:

* in a trial test: ``fixture = DNSFixture(zones, reactor)``,
  ``yield fixture.start()``, then query ``("127.0.0.1", fixture.port)``,
  ``self.addCleanup(fixture.stop)``; ``fixture.queries`` lists the
  ``(name, type)`` pairs asked so far (type as ``"MX"``, ``"A"`` ...);
* as a process: ``python -m relay.testing_dns --port 0 --zones zones.json``
  prints the UDP port (TCP listens on the same number) on one line when
  ready; SIGTERM or SIGINT stop it.  In JSON, MX entries are ``[10, "mx"]``.

Only loopback interfaces are accepted.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, server

__all__ = ["DNSFixture", "MemoryAuthority", "main"]

_SPECIAL = ("SERVFAIL", "TIMEOUT")
_TTL = 60
_MAX_CHASE = 16


def _norm(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.lower().rstrip(".")


def _records(rtype: str, values: Any) -> list[Any]:
    """Twisted record payloads for one ``"TYPE": values`` entry."""
    if rtype == "CNAME":
        return [dns.Record_CNAME(_norm(values).encode("idna"), ttl=_TTL)]
    if isinstance(values, (str, bytes)) or (rtype == "MX" and values and isinstance(values[0], int)):
        values = [values]
    out: list[Any] = []
    for value in values:
        if rtype == "A":
            out.append(dns.Record_A(value, ttl=_TTL))
        elif rtype == "AAAA":
            out.append(dns.Record_AAAA(value, ttl=_TTL))
        elif rtype == "MX":
            pref, exchange = value
            out.append(dns.Record_MX(int(pref), _norm(exchange).encode("idna"), ttl=_TTL))
        elif rtype == "TXT":
            out.append(dns.Record_TXT(value.encode() if isinstance(value, str) else value, ttl=_TTL))
        else:
            raise ValueError(f"record type {rtype!r} is not supported by the fixture")
    return out


class MemoryAuthority(common.ResolverBase):
    """An IResolver answering authoritatively from a zones dict (see the
    module docstring); SERVFAIL/TIMEOUT names are handled by the factory."""

    def __init__(self, zones: Mapping[str, Any], *, chase_cnames: bool = True) -> None:
        common.ResolverBase.__init__(self)
        self.chase_cnames = chase_cnames
        self.special: dict[str, str] = {}
        self.records: dict[str, list[Any]] = {}
        for name, data in zones.items():
            key = _norm(name)
            if isinstance(data, str):
                if data.upper() not in _SPECIAL:
                    raise ValueError(f"{name}: {data!r} is not one of {_SPECIAL}")
                self.special[key] = data.upper()
                continue
            recs: list[Any] = []
            for rtype, values in data.items():
                recs.extend(_records(rtype.upper(), values))
            self.records[key] = recs

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> defer.Deferred:
        current = _norm(name)
        if current not in self.records:
            return defer.fail(dns.AuthoritativeDomainError(name))  # -> NXDOMAIN
        answers: list[dns.RRHeader] = []
        for _ in range(_MAX_CHASE):
            recs = self.records.get(current, [])
            matching = [r for r in recs if r.TYPE == type or type == dns.ALL_RECORDS]
            answers += [dns.RRHeader(current.encode("idna"), r.TYPE, dns.IN, r.ttl, r, auth=True)
                        for r in matching]
            cname = [r for r in recs if r.TYPE == dns.CNAME]
            if matching or not cname:
                break
            answers.append(dns.RRHeader(current.encode("idna"), dns.CNAME, dns.IN,
                                        cname[0].ttl, cname[0], auth=True))
            current = _norm(cname[0].name.name)
            if not self.chase_cnames or current in self.special:
                break
        return defer.succeed((answers, [], []))


class _FixtureServerFactory(server.DNSServerFactory):
    """DNSServerFactory that records queries and plays SERVFAIL / TIMEOUT."""

    def __init__(self, authority: MemoryAuthority) -> None:
        server.DNSServerFactory.__init__(self, authorities=[authority])
        self.authority = authority
        self.queries: list[tuple[str, str]] = []

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> Any:
        query = message.queries[0]
        name = _norm(query.name.name)
        self.queries.append((name, dns.QUERY_TYPES.get(query.type, str(query.type))))
        behaviour = self.authority.special.get(name)
        if behaviour == "TIMEOUT":
            return None
        if behaviour == "SERVFAIL":
            # Answered here (not via a resolver failure) so nothing is logged as an error.
            self.sendReply(protocol, self._responseFromMessage(message=message, rCode=dns.ESERVER),
                           address)
            return None
        return server.DNSServerFactory.handleQuery(self, message, protocol, address)


class DNSFixture:
    """A DNS server for *zones* on ``interface`` (loopback only): UDP on
    *port* (0 = the OS picks) and TCP on the same number when it is free."""

    def __init__(self, zones: Mapping[str, Any], reactor: Any, *, interface: str = "127.0.0.1",
                 port: int = 0, chase_cnames: bool = True) -> None:
        if not ipaddress.ip_address(interface).is_loopback:
            raise ValueError(f"DNSFixture only listens on loopback, not {interface}")
        self.reactor = reactor
        self.interface = interface
        self.requested_port = port
        self.authority = MemoryAuthority(zones, chase_cnames=chase_cnames)
        self.factory = _FixtureServerFactory(self.authority)
        self.port: int | None = None
        self._udp: Any = None
        self._tcp: Any = None

    @property
    def address(self) -> tuple[str, int]:
        """``(interface, port)``, the form ``client.Resolver(servers=...)`` takes."""
        assert self.port is not None, "start() first"
        return (self.interface, self.port)

    @property
    def queries(self) -> list[tuple[str, str]]:
        """The ``(name, TYPE)`` of every query received so far (both transports)."""
        return self.factory.queries

    def start(self) -> defer.Deferred[DNSFixture]:
        """Start listening; the Deferred fires with the fixture (``port`` set)."""
        try:
            self._listen()
        except Exception:
            return defer.fail()
        return defer.succeed(self)

    def _listen(self) -> None:
        for _ in range(20 if self.requested_port == 0 else 1):
            proto = dns.DNSDatagramProtocol(self.factory, reactor=self.reactor)
            udp = self.reactor.listenUDP(self.requested_port, proto, interface=self.interface)
            port = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(port, self.factory, interface=self.interface)
            except CannotListenError:
                if self.requested_port == 0:
                    udp.stopListening()
                    continue
                tcp = None  # a fixed port whose TCP twin is taken: UDP only
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise CannotListenError(self.interface, 0, OSError("no UDP port with a free TCP twin"))

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and drop TCP connections; the Deferred fires when done."""
        ports, self._udp, self._tcp = [self._udp, self._tcp], None, None
        for proto in list(self.factory.connections):
            proto.transport.loseConnection()
        ds = [defer.maybeDeferred(p.stopListening) for p in ports if p is not None]
        return defer.gatherResults(ds).addCallback(lambda _: None)


def main(argv: list[str] | None = None) -> int:
    """``python -m relay.testing_dns --port N --zones FILE.json``."""
    parser = argparse.ArgumentParser(prog="python -m relay.testing_dns",
                                     description="Serve test DNS zones on loopback.")
    parser.add_argument("--port", type=int, default=0, help="UDP/TCP port (0 = any free one)")
    parser.add_argument("--zones", required=True, help="JSON file: the zones dict")
    parser.add_argument("--interface", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--no-chase-cnames", action="store_true",
                        help="answer a CNAME without following it")
    args = parser.parse_args(argv)
    with open(args.zones, encoding="utf-8") as f:
        zones = json.load(f)

    from twisted.internet import reactor

    fixture = DNSFixture(zones, reactor, interface=args.interface, port=args.port,
                         chase_cnames=not args.no_chase_cnames)

    def ready(_: Any) -> None:
        print(fixture.port, flush=True)

    def failed(reason: Any) -> None:
        print(f"testing_dns: {reason.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    def go() -> None:
        defer.maybeDeferred(fixture.start).addCallbacks(ready, failed)

    reactor.callWhenRunning(go)
    reactor.addSystemEventTrigger("before", "shutdown", fixture.stop)
    reactor.run()  # installs SIGTERM/SIGINT handlers that stop the reactor
    return 0 if fixture.port is not None else 1


if __name__ == "__main__":
    sys.exit(main())
