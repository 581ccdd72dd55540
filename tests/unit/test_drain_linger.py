"""Unit tests for the drain's connections kept open (``linger``) and its
claim pacing while busy (``busy_claim_delay``), on a Clock with the fakes of
test_drain.py."""

from __future__ import annotations

import random

from twisted.internet import defer

from relay.drain import DrainService

from test_drain import SEED, Harness, make_message, no_unexpected_failures, _cheap_gc  # noqa: F401

LINGER = 2.0


def harness(*, linger: float = LINGER, busy_claim_delay: float = 0.0, **config) -> Harness:
    h = Harness(**config)
    h.drain = DrainService(config=h.config, spool=h.spool, router=h.router, reactor=h.clock,
                           session_opener=h.opener, rng=random.Random(SEED), linger=linger,
                           busy_claim_delay=busy_claim_delay)
    return h


def deliver_one(h: Harness, session) -> object:
    """Answer what the session has pulled, then pull again: the next envelope, None or a Deferred."""
    while session.pending:
        session.answer()
    nxt = session._next()
    if nxt is not None and not isinstance(nxt, defer.Deferred):
        session.pulled.append(nxt)
        session.pending.append(nxt)
    h.settle()
    return nxt


class TestLinger:

    def test_an_empty_queue_keeps_the_connection_for_new_mail(self):
        """After its last envelope a session waits; mail claimed later goes to it, not to a new connection."""
        h = harness(poll_interval=60.0)
        h.spool.add(make_message("a@x.test"))
        h.start()
        (s,) = h.opener.sessions
        assert s.pull() is not None
        waiting = deliver_one(h, s)
        assert isinstance(waiting, defer.Deferred) and not waiting.called
        assert h.is_idle()          # an idle connection holds nothing
        second = h.spool.add(make_message("b@x.test"))[0]
        h.drain.wake()
        assert waiting.called
        envelope = waiting.result
        assert envelope.message.id == second.id
        assert len(h.opener.sessions) == 1

    def test_the_connection_quits_after_linger(self):
        """Nothing new within linger seconds: the waiting session gets None (QUIT)."""
        h = harness(poll_interval=60.0)
        h.spool.add(make_message("a@x.test"))
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        waiting = deliver_one(h, s)
        h.clock.advance(LINGER - 0.1)
        assert not waiting.called
        h.clock.advance(0.1)
        assert waiting.called and waiting.result is None

    def test_a_session_that_never_carried_mail_waits_too(self):
        """A new connection that finds the queue empty (others took the work) waits for the next mail."""
        h = harness(poll_interval=60.0)
        h.spool.add(make_message("a@x.test"))
        h.start()
        (s,) = h.opener.sessions
        h.drain._destinations["x.test"].queue.clear()   # as if another connection took it
        waiting = s._next()
        assert isinstance(waiting, defer.Deferred) and not waiting.called
        h.clock.advance(LINGER)
        assert waiting.called and waiting.result is None

    def test_without_linger_a_session_quits_when_the_queue_is_empty(self):
        """linger 0: a connection that finds nothing to send quits at once."""
        h = harness(linger=0.0, poll_interval=60.0)
        h.spool.add(make_message("a@x.test"))
        h.start()
        (s,) = h.opener.sessions
        h.drain._destinations["x.test"].queue.clear()
        assert s._next() is None

    def test_stop_releases_waiting_sessions(self):
        """stopService answers every waiting session with None at once."""
        h = harness(poll_interval=60.0)
        h.spool.add(make_message("a@x.test"))
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        waiting = deliver_one(h, s)
        stopped = h.drain.stopService()
        assert waiting.called and waiting.result is None
        s.end()
        h.settle()
        assert stopped.called

    def test_a_lost_connection_leaves_the_mail_for_a_new_one(self):
        """A waiting session whose connection is lost (its Deferred cancelled) gets nothing; new mail opens a connection."""
        h = harness(poll_interval=60.0)
        h.spool.add(make_message("a@x.test"))
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        waiting = deliver_one(h, s)
        waiting.addErrback(lambda f: f.trap(defer.CancelledError))
        waiting.cancel()
        s.end()
        h.settle()
        h.spool.add(make_message("b@x.test"))
        h.drain.wake()
        h.settle()
        assert len(h.opener.sessions) == 2
        assert h.opener.sessions[1].pull() is not None

    def test_a_waiting_session_gives_way_to_another_destination(self):
        """With every connection taken by waiting sessions, mail for another destination closes one of them."""
        h = harness(poll_interval=60.0, concurrency=1)
        h.spool.add(make_message("a@x.test"))
        h.start()
        (s,) = h.opener.sessions
        s.pull()
        waiting = deliver_one(h, s)
        h.spool.add(make_message("b@y.test"))
        h.drain.wake()
        assert waiting.called and waiting.result is None
        assert len(h.opener.sessions) == 1      # not before the first one has ended
        s.end()
        h.settle()
        assert len(h.opener.sessions) == 2
        assert h.opener.sessions[1].host_name == "mx.y.test"


class TestBusyClaimDelay:

    def test_idle_drain_claims_at_once(self):
        """Nothing claimed: a wake claims immediately."""
        h = harness(poll_interval=60.0, busy_claim_delay=0.01)
        h.start()
        assert len(h.spool.claims) == 1
        h.spool.add(make_message("a@x.test"))
        h.drain.wake()
        assert len(h.spool.claims) == 2

    def test_busy_drain_claims_after_the_delay(self):
        """With recipients being delivered, wakes within the delay become one claim after it."""
        h = harness(poll_interval=60.0, busy_claim_delay=0.01)
        h.spool.add(make_message("a@x.test"))
        h.start()
        assert len(h.spool.claims) == 1
        h.spool.add(make_message("b@x.test"))
        h.drain.wake()
        h.spool.add(make_message("c@x.test"))
        h.drain.wake()
        assert len(h.spool.claims) == 1
        h.clock.advance(0.01)
        assert len(h.spool.claims) == 2
        assert sum(len(m.recipients) for m in h.spool.due) == 0
