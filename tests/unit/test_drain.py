"""Unit tests for relay.drain.DrainService, driven by a task.Clock (no sockets,
no database, no sleeps).

The drain's collaborators are replaced by in-memory fakes:

* ``FakeSpool`` implements the DeferredSpool methods the drain calls (claim,
  renew, release, recover, record) with already-fired Deferreds, hands out
  the ClaimedMessages a test prepared and records every call;
* ``FakeRouter`` resolves destination keys to canned Destinations (or fails
  with a RoutingFailure) and records mark_bad/mark_good;
* ``FakeOpener`` stands in for ``relay.smtpclient.open_session``: every
  connection is a ``FakeSession`` the test scripts by hand -- pull envelopes
  with ``next_envelope()``, answer them through ``on_result()``, end the
  session or fail the host, whenever the test decides.  Cancelling a session
  reports its envelope in flight as lost (451), as the real client does.
"""

from __future__ import annotations

import email
import gc
import email.policy
import itertools
import random
from dataclasses import dataclass, replace
from typing import Callable

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from relay.config import Config
from relay.drain import DrainService
from relay.model import (
    ClaimedMessage,
    ClaimedRecipient,
    Envelope,
    HostFailure,
    NewMessage,
    Outcome,
    RecipientResult,
    State,
)
from relay.routing import Destination, MailHost, RoutingFailure
from relay.smtpclient import SessionEnd

T0 = 1_700_000_000.0        # the Clock's reading when a test starts
NODE = "node-1"
SEED = 1234
FLUSH = 0.01                # more than the drain's flush_delay (5 ms)

_ids = itertools.count(1)


# -- values ---------------------------------------------------------------------


def make_message(*addresses: str, sender: str = "app@sender.test", queued_at: float = T0,
                 attempts: int = 0) -> ClaimedMessage:
    """A claimed message with one recipient per address (ids are unique per test run)."""
    qid = f"Q{next(_ids)}"
    data = (f"From: {sender or 'daemon@sender.test'}\r\nTo: {', '.join(addresses)}\r\n"
            f"Subject: hello {qid}\r\nMessage-ID: <{qid}@sender.test>\r\n\r\nHello.\r\n").encode()
    recipients = tuple(
        ClaimedRecipient(id=next(_ids), message_id=qid, address=a, domain=a.rpartition("@")[2],
                         attempts=attempts, queued_at=queued_at)
        for a in addresses)
    return ClaimedMessage(id=qid, sender=sender, data=data, size=len(data), eight_bit=False,
                          created_at=queued_at, recipients=recipients)


def make_config(**overrides) -> Config:
    fields = dict(hostname="relay.test", node=NODE, spool_url="sqlite:///unused.db",
                  concurrency=10, per_domain_concurrency=5, lease=30.0, poll_interval=1.0,
                  batch_size=100, retry_initial=300.0, retry_maximum=14400.0, max_lifetime=86400.0,
                  tls="opportunistic")
    fields.update(overrides)
    return Config(**fields)


def dsn_fields(message: NewMessage) -> dict:
    """The readable headers and per-recipient delivery-status fields of a DSN."""
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    raw = status.as_bytes().decode()
    groups = raw.split("\r\n\r\n") if "\r\n\r\n" in raw else raw.split("\n\n")
    recipients = []
    for block in groups:
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace())
        if "Final-Recipient" in fields:
            recipients.append(fields)
    return {"from": parsed["From"], "to": parsed["To"], "auto": parsed["Auto-Submitted"],
            "recipients": recipients}


# -- fakes ----------------------------------------------------------------------


@dataclass
class Recorded:
    node: str
    now: float
    outcomes: list[Outcome]
    new_messages: list[NewMessage]


class FakeSpool:
    """The DeferredSpool methods the drain uses, in memory, recording every call."""

    def __init__(self) -> None:
        self.due: list[ClaimedMessage] = []
        self.recipients: dict[int, ClaimedRecipient] = {}
        self.calls: list[str] = []
        self.claims: list[dict] = []
        self.claimed_ids: set[int] = set()
        self.records: list[Recorded] = []
        self.releases: list[tuple[str, list[int], float]] = []
        self.renewals: list[tuple[str, float, float]] = []
        self.renewed_ids: list[list[int] | None] = []
        self.recovers: list[tuple[str, float]] = []
        self.fail_records = 0       # fail this many record() calls
        self.failed_records = 0
        self.fail_claims = 0

    def add(self, *messages: ClaimedMessage) -> list[ClaimedMessage]:
        for m in messages:
            self.due.append(m)
            for r in m.recipients:
                self.recipients[r.id] = r
        return list(messages)

    def claim(self, node, now, lease, limit, exclude_domains=()):
        self.calls.append("claim")
        self.claims.append(dict(node=node, now=now, lease=lease, limit=limit, exclude=list(exclude_domains)))
        if self.fail_claims:
            self.fail_claims -= 1
            return defer.fail(RuntimeError("spool unavailable"))
        out, remaining, left = [], [], limit
        for m in self.due:
            take = [r for r in m.recipients if r.domain not in exclude_domains][:max(left, 0)]
            keep = tuple(r for r in m.recipients if r not in take)
            if take:
                out.append(replace(m, recipients=tuple(take)))
                left -= len(take)
                self.claimed_ids.update(r.id for r in take)
            if keep:
                remaining.append(replace(m, recipients=keep))
        self.due = remaining
        return defer.succeed(out)

    def renew(self, node, now, lease, recipient_ids=None):
        self.calls.append("renew")
        self.renewals.append((node, now, lease))
        self.renewed_ids.append(None if recipient_ids is None else sorted(recipient_ids))
        return defer.succeed(len(self.claimed_ids))

    def release(self, node, recipient_ids, now):
        self.calls.append("release")
        self.releases.append((node, list(recipient_ids), now))
        return defer.succeed(len(recipient_ids))

    def recover(self, node, now):
        self.calls.append("recover")
        self.recovers.append((node, now))
        return defer.succeed(0)

    def record(self, node, now, outcomes, new_messages=()):
        self.calls.append("record")
        if self.fail_records:
            self.fail_records -= 1
            self.failed_records += 1
            return defer.fail(RuntimeError("database is locked"))
        self.records.append(Recorded(node, now, list(outcomes), list(new_messages)))
        return defer.succeed([f"DSN{i}" for i, _ in enumerate(new_messages)])

    # -- views for assertions
    @property
    def outcomes(self) -> list[Outcome]:
        return [o for rec in self.records for o in rec.outcomes]

    @property
    def dsns(self) -> list[NewMessage]:
        return [m for rec in self.records for m in rec.new_messages]

    @property
    def released_ids(self) -> list[int]:
        return [i for _, ids, _ in self.releases for i in ids]

    def outcome(self, address: str) -> Outcome:
        """The one outcome recorded for the recipient with this address."""
        found = [o for o in self.outcomes if self.recipients[o.recipient_id].address == address]
        assert len(found) == 1, f"{len(found)} outcomes for {address}: {found}"
        return found[0]


def one_host(key: str, addresses: tuple[str, ...] = ("192.0.2.1",)) -> Destination:
    return Destination(key=key, hosts=(MailHost(f"mx.{key}", addresses, 25, 10),), route=None)


class FakeRouter:
    """Resolves every key to ``mx.<key>`` unless told otherwise; records host marks."""

    def __init__(self) -> None:
        self.destinations: dict[str, Destination] = {}
        self.failures: dict[str, Exception] = {}
        self.resolved: list[str] = []
        self.bad: list[str] = []
        self.good: list[str] = []

    def resolve(self, key: str) -> defer.Deferred:
        self.resolved.append(key)
        if key in self.failures:
            return defer.fail(self.failures[key])
        return defer.succeed(self.destinations.get(key) or one_host(key))

    def mark_bad(self, host_name: str) -> None:
        self.bad.append(host_name)

    def mark_good(self, host_name: str) -> None:
        self.good.append(host_name)


class FakeSession:
    """One ``open_session`` call, scripted by the test."""

    def __init__(self, kwargs: dict) -> None:
        self.kwargs = kwargs
        self.address: str = kwargs["address"]
        self.host_name: str = kwargs["host_name"]
        self.port: int = kwargs["port"]
        self._next = kwargs["next_envelope"]
        self._on_result = kwargs["on_result"]
        self.pulled: list[Envelope] = []
        self.pending: list[Envelope] = []        # pulled, not answered yet
        self.result_calls = 0
        self.cancelled = False
        self.deferred: defer.Deferred = defer.Deferred(self._cancel)

    @property
    def live(self) -> bool:
        return not self.deferred.called

    def pull(self) -> Envelope | None:
        envelope = self._next()
        if envelope is not None:
            self.pulled.append(envelope)
            self.pending.append(envelope)
        return envelope

    def answer(self, envelope: Envelope | None = None, code: int = 250, text: str = "2.0.0 Ok",
               per_address: dict[str, tuple[int, str]] | None = None, possible_duplicate: bool = False) -> None:
        """Call on_result for ``envelope`` (default: the oldest unanswered one)."""
        envelope = envelope or self.pending[0]
        self.pending.remove(envelope)
        per_address = per_address or {}
        results = [RecipientResult(recipient=r, code=per_address.get(r.address, (code, text))[0],
                                   text=per_address.get(r.address, (code, text))[1],
                                   possible_duplicate=possible_duplicate)
                   for r in envelope.recipients]
        self.result_calls += 1
        self._on_result(envelope, results)

    def deliver_all(self, code: int = 250, text: str = "2.0.0 Ok") -> None:
        """Answer what is pending, pull and answer until the queue is empty, then QUIT."""
        while self.pending:
            self.answer(code=code, text=text)
        while self.pull() is not None:
            self.answer(code=code, text=text)
        self.end()

    def end(self, error: str | None = None) -> None:
        self.deferred.callback(SessionEnd(host_failure=None, envelopes=len(self.pulled),
                                          transactions=len(self.pulled), error=error))

    def fail_host(self, code: int = 421, text: str = "4.4.1 Connection refused",
                  try_next_host: bool = True) -> None:
        assert not self.pulled, "a host failure happens before any envelope is pulled"
        self.deferred.callback(SessionEnd(host_failure=HostFailure(code, text, try_next_host)))

    def _cancel(self, _d: defer.Deferred) -> None:
        # Like open_session: the envelope in flight is reported as lost, then
        # the Deferred fails with CancelledError.
        self.cancelled = True
        while self.pending:
            self.answer(code=451, text=f"4.4.2 Session with {self.host_name}[{self.address}]:{self.port} cancelled")


class FakeOpener:
    """Replaces open_session; ``script(session)`` (if set) runs as each session opens."""

    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []
        self.script: Callable[[FakeSession], None] | None = None
        self.max_live = 0
        self.max_live_by_host: dict[str, int] = {}

    def __call__(self, reactor, **kwargs) -> defer.Deferred:
        assert isinstance(reactor, task.Clock)
        session = FakeSession(kwargs)
        self.sessions.append(session)
        self.max_live = max(self.max_live, len(self.live()))
        host = session.host_name
        self.max_live_by_host[host] = max(self.max_live_by_host.get(host, 0), len(self.live(host)))
        if self.script is not None:
            self.script(session)
        return session.deferred

    def live(self, host: str | None = None) -> list[FakeSession]:
        return [s for s in self.sessions if s.live and (host is None or s.host_name == host)]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sessions]


class Harness:
    """A DrainService on a Clock with the fakes above."""

    def __init__(self, *, shutdown_timeout: float = 30.0, **config) -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.config = make_config(**config)
        self.spool = FakeSpool()
        self.router = FakeRouter()
        self.opener = FakeOpener()
        self.drain = DrainService(config=self.config, spool=self.spool, router=self.router,
                                  reactor=self.clock, session_opener=self.opener,
                                  rng=random.Random(SEED), shutdown_timeout=shutdown_timeout)

    def start(self) -> None:
        self.drain.startService()

    def settle(self) -> None:
        """Run whatever is due now and the pending batch flush (no poll)."""
        for _ in range(5):
            self.clock.advance(0)
        self.clock.advance(FLUSH)

    def drive(self, code: int = 250, rounds: int = 1000) -> None:
        """Let every live session answer one envelope per round until none is left."""
        for _ in range(rounds):
            live = self.opener.live()
            if not live:
                return
            for s in live:
                if not s.live:
                    continue
                if s.pending:
                    s.answer(code=code)
                if s.pull() is None:
                    s.end()
            self.settle()
        raise AssertionError("sessions still live after %d rounds" % rounds)

    def is_idle(self) -> bool:
        """True when the drain holds nothing claimed, queued or unrecorded."""
        return self.drain.idle().called


@pytest.fixture(scope="module", autouse=True)
def _cheap_gc():
    """Freeze the objects of the imports so each test's gc.collect() below stays fast."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def no_unexpected_failures():
    """Fail a test whose drain logged a traceback (an exception it did not expect)."""
    failures: list[dict] = []

    def observer(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event)

    gc.collect()        # an earlier test's unhandled Deferred errors are reported now, not here
    globalLogPublisher.addObserver(observer)
    yield failures
    gc.collect()        # report this test's unhandled Deferred errors while observing
    globalLogPublisher.removeObserver(observer)
    assert not failures, [f["log_failure"].getTraceback() for f in failures]


def claimed_union_check(h: Harness) -> None:
    """Every claimed recipient was recorded or released, exactly once, and nothing is left."""
    recorded = [o.recipient_id for o in h.spool.outcomes]
    released = h.spool.released_ids
    assert len(recorded) == len(set(recorded)), "a recipient was recorded twice"
    assert not set(recorded) & set(released), "a recipient was both recorded and released"
    assert set(recorded) | set(released) == h.spool.claimed_ids


# -- grouping -------------------------------------------------------------------


class TestGrouping:

    def test_recipients_of_one_message_at_one_domain_share_one_transaction(self):
        """Three recipients of one message at one domain go in one envelope and get one on_result call."""
        h = Harness()
        (m,) = h.spool.add(make_message("a@x.test", "b@x.test", "c@x.test"))
        h.start()
        (s,) = h.opener.sessions
        envelope = s.pull()
        assert [r.address for r in envelope.recipients] == ["a@x.test", "b@x.test", "c@x.test"]
        assert envelope.message.id == m.id
        assert s.pull() is None
        s.answer(envelope)
        s.end()
        h.settle()
        assert s.result_calls == 1
        assert len(h.spool.records) == 1
        assert {o.state for o in h.spool.outcomes} == {State.DELIVERED}
        assert len(h.spool.outcomes) == 3

    def test_two_domains_are_two_destinations(self):
        """Recipients of one message at two domains are routed and connected to separately."""
        h = Harness()
        h.spool.add(make_message("a@x.test", "b@y.test"))
        h.start()
        assert sorted(h.router.resolved) == ["x.test", "y.test"]
        assert sorted(s.host_name for s in h.opener.sessions) == ["mx.x.test", "mx.y.test"]
        for s in h.opener.sessions:
            envelope = s.pull()
            assert [r.domain for r in envelope.recipients] == [s.host_name.removeprefix("mx.")]
            s.deliver_all()
        h.settle()
        assert h.spool.outcome("a@x.test").host == "mx.x.test[192.0.2.1]:25"
        assert h.spool.outcome("b@y.test").host == "mx.y.test[192.0.2.1]:25"

    def test_more_than_100_recipients_are_split_into_transactions(self):
        """250 recipients of one message at one domain become envelopes of 100, 100 and 50."""
        h = Harness(batch_size=500, per_domain_concurrency=1)
        h.spool.add(make_message(*[f"u{i}@x.test" for i in range(250)]))
        h.start()
        (s,) = h.opener.sessions
        sizes = []
        while (envelope := s.pull()) is not None:
            sizes.append(len(envelope.recipients))
            s.answer(envelope)
        s.end()
        h.settle()
        assert sizes == [100, 100, 50]
        assert len({o.recipient_id for o in h.spool.outcomes}) == 250

    def test_messages_to_one_destination_share_one_connection(self):
        """Three messages to one domain go over one connection, one transaction each."""
        h = Harness(per_domain_concurrency=1)
        messages = h.spool.add(*(make_message(f"u{i}@x.test") for i in range(3)))
        h.start()
        (s,) = h.opener.sessions
        s.deliver_all()
        h.settle()
        assert [e.message.id for e in s.pulled] == [m.id for m in messages]
        assert len(h.opener.sessions) == 1


# -- connections per destination and in total ------------------------------------


class TestConcurrency:

    def test_first_connection_gates_the_others(self):
        """With 50 envelopes queued, one connection opens; once it pulls mail, up to 5 (never more)."""
        h = Harness(per_domain_concurrency=5, concurrency=100, poll_interval=60.0)
        h.spool.add(*(make_message(f"u{i}@big.test") for i in range(50)))
        h.start()
        h.settle()
        assert len(h.opener.sessions) == 1          # not proven yet
        first = h.opener.sessions[0]
        first.pull()
        h.settle()
        assert len(h.opener.live("mx.big.test")) == 5
        h.drive()
        assert h.opener.max_live_by_host["mx.big.test"] == 5
        assert len(h.spool.outcomes) == 50
        assert {o.state for o in h.spool.outcomes} == {State.DELIVERED}

    def test_dead_first_host_costs_one_connection(self):
        """When the first connection fails, no other connection is opened to that destination."""
        h = Harness(per_domain_concurrency=5)
        h.spool.add(*(make_message(f"u{i}@dead.test") for i in range(50)))
        h.opener.script = lambda s: s.fail_host()
        h.start()
        h.settle()
        assert len(h.opener.sessions) == 1
        assert len(h.spool.outcomes) == 50
        assert {o.state for o in h.spool.outcomes} == {State.DEFERRED}

    def test_global_concurrency_caps_the_sum_across_destinations(self):
        """concurrency=4 with two proven destinations allowing 5 each keeps at most 4 connections open."""
        h = Harness(per_domain_concurrency=5, concurrency=4, poll_interval=60.0)
        h.spool.add(*(make_message(f"u{i}@a.test", f"u{i}@b.test") for i in range(10)))
        h.start()
        assert len(h.opener.sessions) == 2
        for s in h.opener.sessions:
            s.pull()
        h.settle()
        assert len(h.opener.live()) == 4
        h.drive()
        assert h.opener.max_live == 4
        assert len(h.spool.outcomes) == 20

    def test_a_finished_connection_makes_room_for_another_destination(self):
        """With concurrency=1, the second destination gets its connection when the first one closes."""
        h = Harness(concurrency=1)
        h.spool.add(make_message("a@a.test"), make_message("b@b.test"))
        h.start()
        (first,) = h.opener.sessions
        assert first.host_name == "mx.a.test"
        first.deliver_all()
        assert [s.host_name for s in h.opener.live()] == ["mx.b.test"]

    def test_hosts_refusing_extra_connections_are_not_hammered(self):
        """A proven destination whose extra connections are refused does not reconnect in a loop."""
        h = Harness(per_domain_concurrency=3, poll_interval=60.0)
        h.spool.add(*(make_message(f"u{i}@busy.test") for i in range(50)))
        h.start()
        first = h.opener.sessions[0]
        first.pull()

        def refuse(s):   # the peer allows one connection: the others are greeted with 421
            if len(h.opener.sessions) <= 30:     # (a bound, so that a reconnect loop ends)
                h.clock.callLater(0, s.fail_host, 421, "4.3.2 Too many connections")
        h.opener.script = refuse
        for _ in range(10):
            h.settle()
        # the two extra connections were tried once each, and not replaced at once
        assert len(h.opener.sessions) == 3, len(h.opener.sessions)
        assert first.live
        first.deliver_all()
        h.settle()
        assert len(h.spool.outcomes) == 50
        assert {o.state for o in h.spool.outcomes} == {State.DELIVERED}


# -- host failover ---------------------------------------------------------------


def two_hosts(key: str) -> Destination:
    return Destination(key=key, hosts=(MailHost(f"mx1.{key}", ("10.0.0.1", "10.0.0.2"), 25, 10),
                                       MailHost(f"mx2.{key}", ("10.0.0.3",), 25, 20)), route=None)


class TestFailover:

    def test_next_address_then_next_host(self):
        """A failing host's every address is tried, then the next host; the bad host is marked, the good one too."""
        h = Harness()
        h.router.destinations["x.test"] = two_hosts("x.test")
        h.spool.add(make_message("a@x.test"))

        def script(s):
            if s.address != "10.0.0.3":
                s.fail_host(421, f"4.4.1 Connection refused by {s.host_name}[{s.address}]:25")
        h.opener.script = script
        h.start()
        assert h.opener.addresses == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        assert h.router.bad == ["mx1.x.test"]
        h.opener.sessions[-1].deliver_all()
        h.settle()
        assert h.router.good == ["mx2.x.test"]
        assert h.router.bad == ["mx1.x.test"]
        outcome = h.spool.outcome("a@x.test")
        assert outcome.state is State.DELIVERED
        assert outcome.host == "mx2.x.test[10.0.0.3]:25"

    def test_all_hosts_failing_defers_every_queued_recipient_with_backoff(self):
        """When no host is left every queued recipient is deferred with the last 4xx and a jittered backoff."""
        h = Harness(per_domain_concurrency=1)
        h.router.destinations["x.test"] = two_hosts("x.test")
        h.spool.add(make_message("a@x.test", "b@x.test"), make_message("c@x.test"),
                    make_message("d@x.test", attempts=2))
        h.opener.script = lambda s: s.fail_host(421, f"4.4.1 Connection refused by {s.address}")
        h.start()
        h.settle()
        assert h.opener.addresses == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        assert h.router.bad == ["mx1.x.test", "mx2.x.test"]
        assert h.router.good == []
        outcomes = h.spool.outcomes
        assert [h.spool.recipients[o.recipient_id].address for o in outcomes] == \
            ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
        rng = random.Random(SEED)   # the same draws, in the same order, as the drain's
        for o in outcomes:
            r = h.spool.recipients[o.recipient_id]
            base = 300.0 * 2 ** r.attempts       # initial * 2^(n-1) after the n-th failure
            assert o.state is State.DEFERRED
            assert (o.code, o.response) == (421, "4.4.1 Connection refused by 10.0.0.3")
            assert o.next_attempt_at == pytest.approx(T0 + base * rng.uniform(0.9, 1.1))
            assert T0 + 0.9 * base <= o.next_attempt_at <= T0 + 1.1 * base
        assert len({o.next_attempt_at for o in outcomes}) == 4   # jittered, not equal
        assert h.spool.dsns == []

    def test_last_host_answering_5xx_defers_instead_of_bouncing(self):
        """A 5xx greeting from the last host still defers (SPEC Routing), as a 4xx with the same detail."""
        h = Harness()
        h.spool.add(make_message("a@x.test"))
        h.opener.script = lambda s: s.fail_host(554, "5.7.1 No mail from you")
        h.start()
        h.settle()
        outcome = h.spool.outcome("a@x.test")
        assert outcome.state is State.DEFERRED
        assert (outcome.code, outcome.response) == (451, "4.7.1 No mail from you")
        assert h.spool.dsns == []

    def test_auth_failure_does_not_fail_over(self):
        """A host failure with try_next_host=False (AUTH refused) tries no other host and marks none bad."""
        h = Harness()
        h.router.destinations["x.test"] = two_hosts("x.test")
        h.spool.add(make_message("a@x.test"))
        h.opener.script = lambda s: s.fail_host(454, "4.7.0 Authentication failed", try_next_host=False)
        h.start()
        h.settle()
        assert h.opener.addresses == ["10.0.0.1"]
        assert h.router.bad == []
        outcome = h.spool.outcome("a@x.test")
        assert (outcome.state, outcome.code) == (State.DEFERRED, 454)


# -- outcomes and bounces ----------------------------------------------------------


class TestOutcomes:

    def test_replies_decide_each_recipients_state(self):
        """2xx delivers, 4xx defers with a next attempt, 5xx bounces; codes and replies are kept."""
        h = Harness()
        h.spool.add(make_message("ok@x.test", "later@x.test", "gone@x.test"))
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        s.answer(per_address={"ok@x.test": (250, "2.0.0 queued as 1"),
                              "later@x.test": (451, "4.3.0 try later"),
                              "gone@x.test": (550, "5.1.1 no such user")})
        s.end()
        h.settle()
        ok, later, gone = (h.spool.outcome(a) for a in ("ok@x.test", "later@x.test", "gone@x.test"))
        assert (ok.state, ok.code, ok.next_attempt_at) == (State.DELIVERED, 250, None)
        assert (later.state, later.code, later.response) == (State.DEFERRED, 451, "4.3.0 try later")
        assert T0 + 270 <= later.next_attempt_at <= T0 + 330
        assert (gone.state, gone.code, gone.response) == (State.BOUNCED, 550, "5.1.1 no such user")
        assert gone.next_attempt_at is None
        assert all(o.attempted for o in (ok, later, gone))
        assert h.drain.stats["delivered"] == 1 and h.drain.stats["deferred"] == 1
        assert h.drain.stats["bounced"] == 1

    def test_bounce_dsn_goes_to_the_sender_from_the_null_sender(self):
        """A 5xx produces one DSN from <> to the original sender listing only the bounced recipient."""
        h = Harness()
        h.spool.add(make_message("ok@x.test", "later@x.test", "gone@x.test", sender="app@sender.test"))
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        s.answer(per_address={"later@x.test": (451, "4.3.0 try later"),
                              "gone@x.test": (550, "5.1.1 no such user")})
        s.end()
        h.settle()
        (bounce,) = h.spool.dsns
        assert bounce.sender == ""
        assert bounce.recipients == ("app@sender.test",)
        fields = dsn_fields(bounce)
        assert fields["from"].addresses[0].addr_spec == "MAILER-DAEMON@relay.test"
        assert fields["auto"] == "auto-replied"
        assert [r["Final-Recipient"] for r in fields["recipients"]] == ["rfc822; gone@x.test"]
        assert fields["recipients"][0]["Status"] == "5.1.1"
        assert fields["recipients"][0]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
        assert fields["recipients"][0]["Remote-MTA"] == "dns; mx.x.test"

    def test_one_dsn_per_message_transaction(self):
        """Two messages with two bounced recipients each give two DSNs, each listing its own two."""
        h = Harness(per_domain_concurrency=1)
        h.spool.add(make_message("a1@x.test", "a2@x.test", sender="one@sender.test"),
                    make_message("b1@x.test", "b2@x.test", sender="two@sender.test"))
        h.start()
        h.opener.sessions[0].deliver_all(code=550, text="5.1.1 no such user")
        h.settle()
        assert {o.state for o in h.spool.outcomes} == {State.BOUNCED}
        dsns = sorted(h.spool.dsns, key=lambda m: m.recipients)
        assert [m.recipients for m in dsns] == [("one@sender.test",), ("two@sender.test",)]
        assert [[r["Final-Recipient"] for r in dsn_fields(m)["recipients"]] for m in dsns] == [
            ["rfc822; a1@x.test", "rfc822; a2@x.test"], ["rfc822; b1@x.test", "rfc822; b2@x.test"]]

    def test_one_dsn_for_a_message_whose_recipients_bounce_at_two_domains(self):
        """SPEC "Bounces": recipients of a message that bounce in the same attempt
        get one DSN, also when they went to two destinations: the first bounce
        waits (outcome and DSN together) until the other destination has answered."""
        h = Harness()
        h.spool.add(make_message("a@x.test", "b@y.test", "c@z.test"))
        h.start()
        sx, sy, sz = sorted(h.opener.sessions, key=lambda s: s.host_name)
        sx.pull()
        sx.answer(code=550, text="5.1.1 no such user")
        sx.end()
        h.settle()
        assert h.spool.records == [] and h.spool.dsns == []          # b and c are still being tried
        sz.deliver_all()
        h.settle()
        assert [o.state for o in h.spool.outcomes] == [State.DELIVERED]   # c recorded; a still waits
        sy.pull()
        sy.answer(code=554, text="5.7.1 rejected")
        sy.end()
        h.settle()
        h.clock.advance(1)                      # past the flush interval
        (bounce,) = h.spool.dsns
        assert [r["Final-Recipient"] for r in dsn_fields(bounce)["recipients"]] == ["rfc822; a@x.test",
                                                                                   "rfc822; b@y.test"]
        assert h.spool.outcome("a@x.test").state is State.BOUNCED
        assert h.spool.outcome("b@y.test").state is State.BOUNCED
        # the bounces and their DSN went in one record
        (rec,) = [r for r in h.spool.records if r.new_messages]
        assert {h.spool.recipients[o.recipient_id].address for o in rec.outcomes} == {"a@x.test", "b@y.test"}
        assert h.is_idle()

    def test_one_dsn_for_more_than_100_recipients_bounced_at_one_domain(self):
        """150 recipients at one domain go in two transactions: a routing
        failure (claims of 100 and 50, failed in one record), or 5xx to both
        transactions on two connections (claimed together), still gives the
        sender one DSN listing all 150."""
        h = Harness()
        h.router.failures["x.test"] = RoutingFailure(550, "5.1.2 Domain x.test does not exist (NXDOMAIN)", True)
        h.spool.add(make_message(*[f"r{i}@x.test" for i in range(150)]))
        h.start()
        h.settle()
        (bounce,) = h.spool.dsns
        assert len(dsn_fields(bounce)["recipients"]) == 150
        h = Harness(per_domain_concurrency=2, batch_size=200)
        h.spool.add(make_message(*[f"r{i}@x.test" for i in range(150)]))
        h.start()
        first = h.opener.sessions[0]
        first.pull()
        first.answer(code=550, text="5.1.1 no such user")      # the first transaction: 100
        h.settle()
        h.clock.advance(1)
        assert h.spool.dsns == [] and len(h.opener.live()) == 2   # the second connection has the other 50
        h.drive(code=550)
        h.clock.advance(1)
        (bounce,) = h.spool.dsns
        assert len(dsn_fields(bounce)["recipients"]) == 150
        assert len([o for o in h.spool.outcomes if o.state is State.BOUNCED]) == 150

    def test_a_bounce_waiting_for_its_siblings_is_recorded_at_shutdown(self):
        """Stopping does not wait for a DSN's siblings: what bounced is recorded
        with its DSN, the sibling that never started is released."""
        h = Harness()
        h.router.destinations["y.test"] = one_host("y.test")
        h.spool.add(make_message("a@x.test", "b@y.test"))
        h.start()
        sx, sy = sorted(h.opener.sessions, key=lambda s: s.host_name)
        sx.pull()
        sx.answer(code=550, text="5.1.1 no such user")
        sx.end()
        h.settle()
        assert h.spool.records == []
        d = h.drain.stopService()
        sy.fail_host()
        h.settle()
        h.clock.advance(1)
        assert d.called
        assert h.spool.outcome("a@x.test").state is State.BOUNCED
        (bounce,) = h.spool.dsns
        assert [r["Final-Recipient"] for r in dsn_fields(bounce)["recipients"]] == ["rfc822; a@x.test"]
        assert [h.spool.recipients[i].address for i in h.spool.released_ids] == ["b@y.test"]
        claimed_union_check(h)
        assert h.is_idle()

    def test_null_sender_message_never_causes_a_dsn(self):
        """A bounce of a message from <> is recorded but produces no DSN."""
        h = Harness()
        h.spool.add(make_message("gone@x.test", sender=""))
        h.start()
        h.opener.sessions[0].deliver_all(code=550, text="5.1.1 no such user")
        h.settle()
        assert h.spool.outcome("gone@x.test").state is State.BOUNCED
        assert h.spool.dsns == []
        assert len(h.spool.records) == 1

    def test_possible_duplicate_is_recorded_as_a_deferral(self):
        """A lost reply after the final dot (possible duplicate) is deferred with a next attempt, not lost."""
        h = Harness()
        h.spool.add(make_message("a@x.test"))
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        s.answer(code=451, text="4.4.2 Connection lost after the final dot; possible duplicate",
                 possible_duplicate=True)
        s.end(error="connection lost")
        h.settle()
        outcome = h.spool.outcome("a@x.test")
        assert outcome.state is State.DEFERRED
        assert T0 + 270 <= outcome.next_attempt_at <= T0 + 330
        assert h.spool.dsns == []


# -- routing failures ------------------------------------------------------------------


class TestRoutingFailures:

    @pytest.mark.parametrize("code, text, status", [
        (556, "5.1.10 Recipient address has null MX (x.test)", "5.1.10"),     # RFC 7505 null MX
        (550, "5.1.2 Domain x.test does not exist (NXDOMAIN)", "5.1.2"),      # NXDOMAIN
    ])
    def test_permanent_routing_failure_bounces_with_a_dsn(self, code, text, status):
        """A permanent RoutingFailure bounces every recipient of the destination at once, with a DSN."""
        h = Harness()
        h.router.failures["x.test"] = RoutingFailure(code, text, permanent=True)
        h.spool.add(make_message("a@x.test", "b@x.test"), make_message("c@x.test"))
        h.start()
        h.settle()
        assert h.opener.sessions == []
        assert [(o.state, o.code, o.response) for o in h.spool.outcomes] == [(State.BOUNCED, code, text)] * 3
        assert len(h.spool.dsns) == 2
        for m in h.spool.dsns:
            assert {r["Status"] for r in dsn_fields(m)["recipients"]} == {status}

    def test_temporary_routing_failure_defers(self):
        """A temporary RoutingFailure (4.4.3 DNS failure) defers with a backoff and no DSN."""
        h = Harness()
        text = "4.4.3 DNS lookup failed for x.test: SERVFAIL"
        h.router.failures["x.test"] = RoutingFailure(451, text, permanent=False)
        h.spool.add(make_message("a@x.test"))
        h.start()
        h.settle()
        assert h.opener.sessions == []
        outcome = h.spool.outcome("a@x.test")
        assert (outcome.state, outcome.code, outcome.response) == (State.DEFERRED, 451, text)
        assert T0 + 270 <= outcome.next_attempt_at <= T0 + 330
        assert h.spool.dsns == []

    def test_synchronous_routing_failure_does_not_stop_the_claims(self):
        """A resolve() that has already failed when it returns (an invalid domain) leaves the drain claiming."""
        # Router.resolve fails synchronously for a label over 63 octets, which enqueue accepts.
        h = Harness(poll_interval=2.0)
        h.router.failures["x.test"] = RoutingFailure(550, "5.1.2 Bad destination domain 'x.test'", True)
        h.spool.add(make_message("a@x.test"))
        h.start()
        h.settle()
        assert h.spool.outcome("a@x.test").state is State.BOUNCED
        h.spool.add(make_message("b@y.test"))
        h.clock.advance(2.0)
        assert [s.host_name for s in h.opener.sessions] == ["mx.y.test"]

    def test_unexpected_router_error_defers(self):
        """A router that breaks its contract (raises something else) defers the mail instead of dropping it."""
        h = Harness()
        h.router.failures["x.test"] = KeyError("bug")
        h.spool.add(make_message("a@x.test"))
        h.start()
        h.settle()
        outcome = h.spool.outcome("a@x.test")
        assert (outcome.state, outcome.code) == (State.DEFERRED, 451)
        assert outcome.response.startswith("4.4.3")


# -- expiry ------------------------------------------------------------------------------


class TestExpiry:

    def test_expired_recipient_bounces_without_a_session(self):
        """A claimed recipient older than max_lifetime bounces with 4.4.7, unattempted, with a DSN."""
        h = Harness(max_lifetime=86400.0)
        h.spool.add(make_message("old@x.test", queued_at=T0 - 86401))
        h.start()
        h.settle()
        assert h.opener.sessions == []
        assert h.router.resolved == []
        outcome = h.spool.outcome("old@x.test")
        assert outcome.state is State.BOUNCED
        assert outcome.attempted is False
        assert outcome.response.startswith("4.4.7")
        (bounce,) = h.spool.dsns
        assert bounce.sender == "" and bounce.recipients == ("app@sender.test",)
        assert [r["Status"] for r in dsn_fields(bounce)["recipients"]] == ["4.4.7"]

    def test_only_the_expired_recipients_of_a_message_bounce(self):
        """Of a message's recipients only the expired ones bounce; the others are delivered as usual."""
        h = Harness(max_lifetime=86400.0)
        m = make_message("old@x.test", "new@x.test", queued_at=T0 - 86401)
        # Same message, one recipient queued later (e.g. re-queued by an operator).
        old, new = m.recipients
        m = replace(m, recipients=(old, replace(new, queued_at=T0 - 10)))
        h.spool.add(m)
        h.start()
        (s,) = h.opener.sessions
        envelope = s.pull()
        assert [r.address for r in envelope.recipients] == ["new@x.test"]
        s.answer(envelope)
        s.end()
        h.settle()
        assert h.spool.outcome("old@x.test").state is State.BOUNCED
        assert h.spool.outcome("new@x.test").state is State.DELIVERED
        (bounce,) = h.spool.dsns
        assert [r["Final-Recipient"] for r in dsn_fields(bounce)["recipients"]] == ["rfc822; old@x.test"]

    def test_deferral_after_max_lifetime_becomes_a_bounce(self):
        """A 4xx that arrives after the recipient's max_lifetime bounces it (4.4.7 in the DSN)."""
        h = Harness(max_lifetime=86400.0)
        h.spool.add(make_message("a@x.test", queued_at=T0 - 86400 + 10))
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        h.clock.advance(20)          # a slow transaction: the lifetime ends meanwhile
        s.answer(code=451, text="4.3.0 try later")
        s.end()
        h.settle()
        outcome = h.spool.outcome("a@x.test")
        assert outcome.state is State.BOUNCED
        assert outcome.next_attempt_at is None
        (bounce,) = h.spool.dsns
        (rcpt,) = dsn_fields(bounce)["recipients"]
        assert rcpt["Status"] == "4.4.7"
        assert rcpt["Diagnostic-Code"] == "smtp; 451 4.3.0 try later"


# -- recording in batches ------------------------------------------------------------------


class TestBatching:

    def test_outcomes_of_one_reactor_turn_are_recorded_together(self):
        """Ten on_result calls in the same reactor turn are recorded by a single record() call."""
        h = Harness(per_domain_concurrency=1)
        h.spool.add(*(make_message(f"u{i}@x.test") for i in range(10)))
        h.start()
        (s,) = h.opener.sessions
        s.deliver_all()
        assert h.spool.records == []       # not yet: the batch is flushed a moment later
        h.settle()
        assert len(h.spool.records) == 1
        assert len(h.spool.records[0].outcomes) == 10
        assert h.spool.records[0].node == NODE

    def test_under_load_one_record_per_flush_interval(self):
        """Outcomes that arrive while a record() is under way are written together,
        flush_interval after that record() began; a full batch is written at once."""
        h = Harness(per_domain_concurrency=1, batch_size=4)
        h.spool.add(*(make_message(f"u{i}@x.test") for i in range(8)))
        calls: list[tuple[defer.Deferred, tuple]] = []
        real_record = h.spool.record

        def slow_record(*args):
            d = defer.Deferred()
            calls.append((d, args))
            return d

        def finish(n: int) -> None:
            d, args = calls[n]
            real_record(*args).chainDeferred(d)

        h.spool.record = slow_record
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        s.answer()
        h.clock.advance(h.drain.flush_delay)          # a first outcome: written after flush_delay
        assert len(calls) == 1
        for _ in range(2):
            s.pull()
            s.answer()
        h.clock.advance(0.01)
        finish(0)                                     # 10 ms later: two outcomes are waiting
        h.clock.advance(h.drain.flush_interval - 0.012)
        assert len(calls) == 1
        h.clock.advance(0.004)
        assert len(calls) == 2 and len(calls[1][1][2]) == 2
        for _ in range(4):
            s.pull()
            s.answer()
        finish(1)                                     # a full batch (4) is waiting: at once
        h.clock.advance(0)
        assert len(calls) == 3 and len(calls[2][1][2]) == 4
        finish(2)
        s.deliver_all()
        h.clock.advance(h.drain.flush_delay)
        finish(3)
        assert sorted(h.spool.recipients[o.recipient_id].address for o in h.spool.outcomes) == \
            sorted(f"u{i}@x.test" for i in range(8))

    def test_failed_record_is_retried_and_nothing_is_lost(self):
        """A record() that fails is retried later with the same outcomes plus those that arrived meanwhile."""
        h = Harness(per_domain_concurrency=1)
        h.spool.add(*(make_message(f"u{i}@x.test") for i in range(4)))
        h.spool.fail_records = 1
        h.start()
        (s,) = h.opener.sessions
        for _ in range(2):
            s.pull()
            s.answer()
        h.settle()
        assert h.spool.failed_records == 1 and h.spool.records == []
        s.deliver_all()                     # two more outcomes while the retry waits
        h.settle()
        assert h.spool.records == []
        h.clock.advance(1.0)
        assert len(h.spool.records) == 1
        assert len(h.spool.outcomes) == 4
        assert {h.spool.recipients[o.recipient_id].address for o in h.spool.outcomes} == \
            {f"u{i}@x.test" for i in range(4)}
        assert h.is_idle()


# -- claiming -------------------------------------------------------------------------------


class TestClaiming:

    def test_full_batch_claims_again_at_once(self):
        """A claim that returns a full batch is followed by another claim without waiting."""
        h = Harness(batch_size=10, poll_interval=5.0)
        h.spool.add(*(make_message(f"u{i}@x.test") for i in range(15)))
        h.start()
        assert len(h.spool.claims) == 1
        assert h.spool.claims[0]["limit"] == 10
        h.clock.advance(0)
        assert len(h.spool.claims) == 2
        assert h.spool.due == []

    def test_partial_batch_waits_for_the_poll_interval(self):
        """A claim that returns less than a batch is followed by the next one poll_interval later."""
        h = Harness(batch_size=10, poll_interval=5.0)
        h.spool.add(*(make_message(f"u{i}@x.test") for i in range(3)))
        h.start()
        assert len(h.spool.claims) == 1
        h.clock.advance(4.9)
        assert len(h.spool.claims) == 1
        h.clock.advance(0.1)
        assert len(h.spool.claims) == 2
        claim = h.spool.claims[1]
        assert (claim["node"], claim["now"], claim["lease"]) == (NODE, T0 + 5.0, 30.0)

    def test_deep_backlog_excludes_its_domain_from_the_next_claim(self):
        """A destination with a deep backlog is left out of the next claim; the others are not."""
        # batch_size 100, per_domain_concurrency 1: a backlog of 50 recipients is deep.
        h = Harness(batch_size=100, per_domain_concurrency=1, poll_interval=1.0)
        h.spool.add(*(make_message(f"u{i}@slow.test") for i in range(60)), make_message("a@fast.test"))
        h.start()
        assert h.spool.claims[0]["exclude"] == []
        h.clock.advance(1.0)
        assert h.spool.claims[1]["exclude"] == ["slow.test"]

    def test_small_backlog_is_not_excluded(self):
        """A destination with only a few queued recipients stays in the claims."""
        h = Harness(batch_size=100, per_domain_concurrency=1, poll_interval=1.0)
        h.spool.add(*(make_message(f"u{i}@slow.test") for i in range(10)))
        h.start()
        h.clock.advance(1.0)
        assert h.spool.claims[1]["exclude"] == []

    def test_wake_claims_at_once_when_idle(self):
        """wake() while waiting for the next poll claims immediately and delivers the new mail."""
        h = Harness(poll_interval=60.0)
        h.start()
        assert len(h.spool.claims) == 1
        h.spool.add(make_message("a@x.test"))
        h.drain.wake()
        assert len(h.spool.claims) == 2
        assert len(h.opener.sessions) == 1

    def test_wake_after_stop_does_not_claim(self):
        """wake() on a stopped drain claims nothing."""
        h = Harness(poll_interval=60.0)
        h.start()
        h.drain.stopService()
        h.spool.add(make_message("a@x.test"))
        h.drain.wake()
        h.clock.advance(120)
        assert len(h.spool.claims) == 1

    def test_failed_claim_is_retried_after_the_poll_interval(self):
        """A claim that fails (spool down) is tried again later and the mail is then delivered."""
        h = Harness(poll_interval=2.0)
        h.spool.add(make_message("a@x.test"))
        h.spool.fail_claims = 1
        h.start()
        assert len(h.spool.claims) == 1 and h.opener.sessions == []
        h.clock.advance(2.0)
        assert len(h.spool.claims) == 2
        assert len(h.opener.sessions) == 1


# -- leases ---------------------------------------------------------------------------------


class TestLeases:

    def test_start_recovers_this_nodes_claims_first(self):
        """startService takes back this node's earlier claims before it claims anything."""
        h = Harness()
        h.start()
        assert h.spool.calls[:2] == ["recover", "claim"]
        assert h.spool.recovers == [(NODE, T0)]

    def test_leases_are_renewed_every_third_of_the_lease_while_claimed(self):
        """With a 30 s lease, renew runs every 10 s while recipients are claimed, and stops after."""
        h = Harness(lease=30.0, poll_interval=100.0)
        h.spool.add(make_message("a@x.test"))
        h.start()
        h.clock.advance(9.9)
        assert h.spool.renewals == []
        h.clock.advance(0.1)
        assert h.spool.renewals == [(NODE, T0 + 10.0, 30.0)]
        h.clock.advance(10.0)
        assert len(h.spool.renewals) == 2
        h.opener.sessions[0].deliver_all()
        h.settle()
        h.clock.advance(30.0)
        assert len(h.spool.renewals) == 2

    def test_only_the_recipients_held_are_renewed(self):
        """Renewal names the recipients the drain holds: a claim it never learnt of
        (a hand-off whose reply was lost) is left to expire and be claimed again."""
        h = Harness(lease=30.0, poll_interval=100.0)
        [m] = h.spool.add(make_message("a@x.test", "b@x.test"))
        h.start()
        h.clock.advance(10.0)
        assert h.spool.renewed_ids == [sorted(r.id for r in m.recipients)]


# -- graceful stop --------------------------------------------------------------------------


class TestGracefulStop:

    def _three_destinations(self) -> Harness:
        """a.test and b.test each with a transaction in progress and two queued, c.test still connecting."""
        h = Harness(per_domain_concurrency=1, shutdown_timeout=30.0)
        h.spool.add(*(make_message(f"a{i}@a.test") for i in range(3)),
                    *(make_message(f"b{i}@b.test") for i in range(3)),
                    make_message("c0@c.test"))
        h.start()
        sessions = {s.host_name: s for s in h.opener.sessions}
        assert sorted(sessions) == ["mx.a.test", "mx.b.test", "mx.c.test"]
        sessions["mx.a.test"].pull()
        sessions["mx.b.test"].pull()
        h.settle()
        return h

    def test_stop_releases_unstarted_and_waits_for_sessions_in_progress(self):
        """stopService releases queued recipients, lets started transactions finish and records them."""
        h = self._three_destinations()
        a, b, c = (next(s for s in h.opener.sessions if s.host_name == f"mx.{d}.test") for d in "abc")
        stopped = h.drain.stopService()
        assert len(h.spool.releases) == 1
        node, ids, now = h.spool.releases[0]
        assert (node, now) == (NODE, h.clock.seconds())
        assert sorted(h.spool.recipients[i].address for i in ids) == \
            ["a1@a.test", "a2@a.test", "b1@b.test", "b2@b.test", "c0@c.test"]
        assert not stopped.called
        assert c.pull() is None            # the connecting session starts nothing
        c.end()
        a.answer()
        assert a.pull() is None
        a.end()
        b.answer(code=451, text="4.3.0 try later")
        assert b.pull() is None
        b.end()
        assert stopped.called
        assert h.spool.outcome("a0@a.test").state is State.DELIVERED
        assert h.spool.outcome("b0@b.test").state is State.DEFERRED
        claimed_union_check(h)
        assert h.is_idle()
        claims, renewals = len(h.spool.claims), len(h.spool.renewals)
        h.clock.advance(100)
        assert (len(h.spool.claims), len(h.spool.renewals)) == (claims, renewals)

    def test_stop_cancels_sessions_after_the_shutdown_timeout(self):
        """A session still busy at shutdown_timeout is cancelled; its envelope is recorded as deferred."""
        h = self._three_destinations()
        a, b, c = (next(s for s in h.opener.sessions if s.host_name == f"mx.{d}.test") for d in "abc")
        stopped = h.drain.stopService()
        a.deliver_all()
        c.deliver_all()
        h.clock.advance(29.0)
        assert not stopped.called and not b.cancelled
        h.clock.advance(1.0)
        assert b.cancelled
        assert stopped.called
        outcome = h.spool.outcome("b0@b.test")
        assert outcome.state is State.DEFERRED
        assert outcome.response.startswith("4.4.2")
        assert outcome.next_attempt_at is not None
        assert h.spool.outcome("a0@a.test").state is State.DELIVERED
        claimed_union_check(h)
        assert h.is_idle()

    def test_nothing_stays_claimed_when_a_cancelled_session_reports_nothing(self):
        """A session cancelled without reporting its envelope still leaves nothing claimed (released)."""
        h = Harness(shutdown_timeout=5.0)
        h.spool.add(make_message("a@x.test"))
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        s.pending.clear()                  # this session will not report its envelope when cancelled
        stopped = h.drain.stopService()
        h.clock.advance(5.0)
        assert stopped.called
        assert h.spool.outcomes == []
        claimed_union_check(h)

    def test_stop_records_pending_outcomes_even_if_the_spool_fails_once(self):
        """Outcomes waiting for a failed record() are recorded during stop, not dropped."""
        h = Harness(per_domain_concurrency=1)
        h.spool.add(make_message("a@x.test"), make_message("b@x.test"))
        h.spool.fail_records = 1
        h.start()
        (s,) = h.opener.sessions
        s.deliver_all()
        h.settle()                         # first record() failed; retry in 1 s
        assert h.spool.records == []
        stopped = h.drain.stopService()
        assert stopped.called
        assert sorted(h.spool.recipients[o.recipient_id].address for o in h.spool.outcomes) == \
            ["a@x.test", "b@x.test"]
        claimed_union_check(h)


class TestHandoff:
    """Mail the submission listener queued already claimed (ISpool.enqueue_claimed)."""

    def test_adopted_messages_are_delivered_and_recorded_without_a_claim(self):
        h = Harness(poll_interval=60.0)
        h.start()
        claims_before = len(h.spool.claims)
        assert h.drain.claim_terms() == (NODE, 30.0)
        messages = [make_message("a@x.test", "b@x.test"), make_message("c@y.test")]
        for m in messages:
            for r in m.recipients:
                h.spool.recipients[r.id] = r
        h.drain.adopt(messages)
        assert sorted(s.host_name for s in h.opener.sessions) == ["mx.x.test", "mx.y.test"]
        h.drive()
        assert len(h.spool.claims) == claims_before
        assert sorted(h.spool.recipients[o.recipient_id].address for o in h.spool.outcomes) == \
            ["a@x.test", "b@x.test", "c@y.test"]
        assert {o.state for o in h.spool.outcomes} == {State.DELIVERED}
        assert h.is_idle()

    def test_no_terms_when_full_or_stopping(self):
        h = Harness(batch_size=4, concurrency=1, poll_interval=60.0)
        h.start()
        assert h.drain.max_claimed == 8
        h.drain.adopt([make_message(*(f"u{i}@x.test" for i in range(8)))])
        assert h.drain.claim_terms() is None          # as much claimed as it takes
        h.drive()
        assert h.drain.claim_terms() == (NODE, 30.0)
        h.drain.stopService()
        assert h.drain.claim_terms() is None

    def test_adopted_while_stopped_are_released(self):
        h = Harness(poll_interval=60.0)
        h.start()
        h.drain.stopService()
        h.settle()
        message = make_message("a@x.test")
        h.drain.adopt([message])
        assert h.spool.released_ids == [message.recipients[0].id]
        assert h.opener.sessions == []


class TestHandoffFairness:

    def test_no_terms_until_start_up_recover_has_finished(self):
        """recover() takes back this node's inflight recipients: a hand-off committed
        before it ran would be undone and claimed a second time."""
        h = Harness(poll_interval=60.0)
        pending = defer.Deferred()
        h.spool.recover = lambda node, now: pending
        h.start()
        assert h.drain.claim_terms() is None
        pending.callback(0)
        assert h.drain.claim_terms() == (NODE, 30.0)

    def test_terms_also_after_a_failed_recover(self, no_unexpected_failures):
        h = Harness(poll_interval=60.0)
        h.spool.recover = lambda node, now: defer.fail(RuntimeError("spool down"))
        h.start()
        assert h.drain.claim_terms() == (NODE, 30.0)
        [logged] = no_unexpected_failures          # "could not take back earlier claims", expected
        assert logged["log_failure"].check(RuntimeError)
        no_unexpected_failures.clear()

    def test_a_busy_listener_leaves_room_for_claims(self):
        """Hand-offs stop short of the claim window by what a claim needs, so mail due
        in the spool (retries, DSNs, other processes' mail) is still claimed."""
        h = Harness(batch_size=8, concurrency=1, poll_interval=5.0)
        h.start()
        assert (h.drain.max_claimed, h.drain._claim_reserve) == (16, 2)
        n = 0
        while h.drain.claim_terms() is not None:
            n += 1
            h.drain.adopt([make_message(f"u{n}@busy.test")])
        assert len(h.drain._claimed) == 14
        h.spool.add(make_message("due@other.test"))
        h.clock.advance(5.0)                       # the next poll
        assert h.spool.claims[-1]["limit"] == 2
        assert "due@other.test" in [r.address for r in h.drain._claimed.values()]
