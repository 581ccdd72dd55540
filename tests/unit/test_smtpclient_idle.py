"""Unit tests for relay.smtpclient: ``next_envelope()`` returning a Deferred
(the connection is kept open, idle, until it fires)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from test_smtpclient import COMMAND_TIMEOUT, BODY, Session, envelope


class IdleSessionTests(SynchronousTestCase):

    def _session(self):
        waiters: list[Deferred] = []
        self.cancelled: list[Deferred] = []
        queue = [envelope(mid="m1")]

        def next_envelope():
            if queue:
                return queue.pop(0)
            d = Deferred(self.cancelled.append)
            waiters.append(d)
            return d

        s = Session(next_envelope=next_envelope).ready()
        s.server(b"250 ok", b"250 ok", b"354 go")
        self.assertEqual(s.sent(), b"MAIL FROM:<s@a.test>\r\nRCPT TO:<r1@b.test>\r\nDATA\r\n" + BODY + b".\r\n")
        s.server(b"250 queued")
        return s, waiters

    def test_waits_without_a_command_timeout_then_sends_the_envelope(self):
        """A Deferred from next_envelope keeps the connection open past command_timeout; its envelope goes next."""
        s, waiters = self._session()
        self.assertEqual(len(waiters), 1)
        self.assertEqual(s.sent(), b"")
        s.clock.advance(COMMAND_TIMEOUT * 3)
        self.assertFalse(s.transport.disconnecting)
        waiters[0].callback(envelope(("x@b.test",), mid="m2"))
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.sent()
        s.server(b"250 queued")
        self.assertEqual([env.message.id for env, _ in s.results], ["m1", "m2"])
        self.assertEqual(len(waiters), 2)
        # The command timer runs again while a transaction is open.
        waiters[1].callback(envelope(("y@b.test",), mid="m3"))
        s.sent()
        s.clock.advance(COMMAND_TIMEOUT + 1)
        self.assertTrue(s.transport.disconnecting)

    def test_none_later_quits(self):
        """The Deferred firing None ends the session with QUIT and no error."""
        s, waiters = self._session()
        waiters[0].callback(None)
        self.assertEqual(s.commands(), [b"QUIT"])
        s.server(b"221 bye")
        s.close_if_asked()
        end = s.end()
        self.assertEqual((end.envelopes, end.transactions, end.error), (1, 1, None))

    def test_connection_lost_while_idle_cancels_the_deferred(self):
        """The peer closing an idle connection cancels the waiting Deferred; the session ends without an error."""
        s, waiters = self._session()
        s.lose()
        self.assertEqual(self.cancelled, [waiters[0]])
        end = s.end()
        self.assertEqual((end.host_failure, end.envelopes, end.error), (None, 1, None))
        self.assertEqual(len(s.results), 1)

    def test_a_reply_while_idle_closes(self):
        """A line from the peer while idle (a 421 before it hangs up) closes the connection and cancels the wait."""
        s, waiters = self._session()
        s.server(b"421 4.4.2 idle too long")
        self.assertTrue(s.transport.disconnecting)
        self.assertEqual(self.cancelled, [waiters[0]])
        s.close_if_asked()
        self.assertEqual(len(s.ended), 1)

    def test_cancelling_the_session_while_idle(self):
        """Cancelling the session's Deferred while idle aborts and cancels the wait."""
        s, waiters = self._session()
        s.d.cancel()
        self.assertEqual(self.cancelled, [waiters[0]])
