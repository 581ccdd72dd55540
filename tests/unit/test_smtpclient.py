"""Unit tests for relay.smtpclient: scripted server lines over StringTransport.

No sockets: ``open_session`` runs on a ``MemoryReactorClock``; the test builds
the protocol from the factory it handed to ``connectTCP``, connects it to a
``StringTransport`` and plays the server's replies.
"""

from __future__ import annotations

import base64

from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relay.model import ClaimedMessage, ClaimedRecipient, Envelope
from relay.smtpclient import SessionEnd, open_session, to_wire

CONNECT_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0
BODY = b"Subject: t\r\n\r\nhello\r\n"


def envelope(
    rcpts: tuple[str, ...] = ("r1@b.test",),
    *,
    sender: str = "s@a.test",
    data: bytes = BODY,
    mid: str = "m1",
) -> Envelope:
    """An envelope for ``rcpts`` with a message as the spool hands it out."""
    recipients = tuple(
        ClaimedRecipient(id=i, message_id=mid, address=a, domain=a.rsplit("@", 1)[1], attempts=0, queued_at=0.0)
        for i, a in enumerate(rcpts, 1)
    )
    message = ClaimedMessage(
        id=mid, sender=sender, data=data, size=len(data), eight_bit=not data.isascii(),
        created_at=0.0, recipients=recipients,
    )
    return Envelope(message=message, recipients=recipients)


def stuffed(data: bytes) -> bytes:
    """Reference dot-stuffing, line by line (independent of the module's)."""
    lines = data.split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines[:-1]) + b".\r\n"


def first_difference(got: bytes, want: bytes) -> str | None:
    """Where two large byte strings first differ (None if equal)."""
    if got == want:
        return None
    at = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    return f"differs at offset {at}: {got[at - 20:at + 20]!r} != {want[at - 20:at + 20]!r}"


class FakeTransport(StringTransport):
    """A StringTransport that records TCP_NODELAY and STARTTLS."""

    nodelay = None
    tls_options = None

    def setTcpNoDelay(self, enabled):
        self.nodelay = enabled

    def startTLS(self, options):
        self.tls_options = options


class Session:
    """One scripted session: the client under test and what it did."""

    def __init__(self, envelopes=(), *, tls="none", credentials=None, on_result=None, next_envelope=None):
        self.clock = MemoryReactorClock()
        self.queue = list(envelopes)
        self.results: list[tuple[Envelope, list]] = []
        self.pulls = 0
        self.d = open_session(
            self.clock, address="127.0.0.1", port=25, host_name="mx.b.test", ehlo="relay.test", tls=tls,
            connect_timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
            next_envelope=next_envelope or self._next, on_result=on_result or self._on_result,
            credentials=credentials,
        )
        self.host, self.port, self.factory, self.timeout, _ = self.clock.tcpClients[0]
        self.ended: list[SessionEnd] = []
        self.failed: list[Failure] = []
        self.d.addCallbacks(self.ended.append, self.failed.append)
        self.proto = None
        self.transport = None

    def _next(self):
        self.pulls += 1
        return self.queue.pop(0) if self.queue else None

    def _on_result(self, env, results):
        self.results.append((env, results))

    def connect(self):
        self.proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        self.transport = FakeTransport()
        self.proto.makeConnection(self.transport)
        return self

    def server(self, *lines: bytes) -> None:
        """The server sends ``lines`` in one write."""
        self.proto.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def sent(self) -> bytes:
        """What the client wrote since the last call."""
        value = self.transport.value()
        self.transport.clear()
        return value

    def commands(self) -> list[bytes]:
        return self.sent().split(b"\r\n")[:-1]

    def ready(self, *ehlo: bytes) -> Session:
        """Connect and get through the greeting and EHLO."""
        self.connect()
        self.server(b"220 mx.b.test ESMTP")
        assert self.commands() == [b"EHLO relay.test"]
        self.server(*(ehlo or (b"250 mx.b.test",)))
        return self

    def close_if_asked(self, reason=None) -> None:
        """Deliver connectionLost when the client closed its transport."""
        if self.transport.disconnecting:
            self.proto.connectionLost(reason or Failure(ierror.ConnectionDone()))

    def lose(self, reason=None) -> None:
        self.proto.connectionLost(reason or Failure(ierror.ConnectionDone()))

    def end(self) -> SessionEnd:
        assert len(self.ended) == 1, (self.ended, self.failed)
        return self.ended[0]

    def codes(self, n: int = 0) -> list[int]:
        return [r.code for r in self.results[n][1]]


class TransactionTests(SynchronousTestCase):
    """Per-recipient outcomes from the replies of one transaction."""

    def test_mixed_rcpt_replies(self):
        """RCPT 250/450/550 and DATA 250 give each recipient its own reply, sent as pre-formatted lines."""
        env = envelope(("ok@b.test", "temp@b.test", "perm@b.test"))
        s = Session([env]).ready()
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])
        s.server(b"250 ok")
        self.assertEqual(s.commands(), [b"RCPT TO:<ok@b.test>"])
        s.server(b"250 ok")
        self.assertEqual(s.commands(), [b"RCPT TO:<temp@b.test>"])
        s.server(b"450 4.2.0 temp")
        self.assertEqual(s.commands(), [b"RCPT TO:<perm@b.test>"])
        s.server(b"550 5.1.1 no such user")
        self.assertEqual(s.commands(), [b"DATA"])
        s.server(b"354 go")
        self.assertEqual(s.sent(), BODY + b".\r\n")
        s.server(b"250-2.0.0 queued", b"250 as 1234")
        results = s.results[0][1]
        self.assertEqual([(r.code, r.text, r.possible_duplicate) for r in results], [
            (250, "2.0.0 queued as 1234", False),
            (450, "4.2.0 temp", False),
            (550, "5.1.1 no such user", False),
        ])
        self.assertEqual([r.recipient for r in results], list(env.recipients))
        self.assertEqual(s.commands(), [b"QUIT"])  # no RSET after a completed transaction
        s.server(b"221 bye")
        s.close_if_asked()
        end = s.end()
        self.assertEqual((end.host_failure, end.envelopes, end.transactions, end.error), (None, 1, 1, None))

    def test_all_rcpts_refused(self):
        """When every RCPT is refused no DATA is sent, each keeps its own code, and RSET closes the transaction."""
        s = Session([envelope(("a@b.test", "c@b.test"))]).ready()
        s.server(b"250 ok")
        s.server(b"450 4.2.0 busy")
        s.server(b"550 5.1.1 unknown")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>", b"RCPT TO:<a@b.test>", b"RCPT TO:<c@b.test>", b"RSET"])
        self.assertEqual([(r.code, r.text) for r in s.results[0][1]], [(450, "4.2.0 busy"), (550, "5.1.1 unknown")])
        s.server(b"250 reset")
        self.assertEqual(s.commands(), [b"QUIT"])

    def test_mail_from_refused_after_a_delivered_message(self):
        """A refused MAIL FROM decides every recipient with its reply, despite the stale numOk of the previous transaction."""
        first = envelope(("a@b.test",), mid="m1")
        second = envelope(("x@b.test", "y@b.test"), mid="m2")
        third = envelope(("z@b.test",), mid="m3")
        s = Session([first, second, third]).ready()
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.sent()
        s.server(b"250 queued")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])
        s.server(b"553 5.7.1 sender rejected")
        self.assertEqual(s.codes(1), [553, 553])
        self.assertEqual(s.results[1][1][0].text, "5.7.1 sender rejected")
        # No RCPT, and no RSET after a refused MAIL: straight to the next message.
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])
        self.assertIs(s.results[1][0], second)

    def test_data_command_451(self):
        """DATA answered 451 defers the accepted recipients, keeps RCPT refusals, and sends RSET."""
        s = Session([envelope(("a@b.test", "b@b.test"))]).ready()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no")
        s.sent()
        s.server(b"451 4.3.0 try later")
        self.assertEqual([(r.code, r.text) for r in s.results[0][1]], [(451, "4.3.0 try later"), (550, "5.1.1 no")])
        self.assertEqual(s.commands(), [b"RSET"])

    def test_data_answered_250_is_not_a_delivery(self):
        """A 2xx to DATA (no 354, so no body was sent) defers the recipients and sends RSET."""
        s = Session([envelope(("a@b.test",))]).ready()
        s.server(b"250 ok", b"250 ok")
        s.sent()
        s.server(b"250 2.0.0 whatever")
        [result] = s.results[0][1]
        self.assertEqual(result.code, 451)
        self.assertTrue(result.text.startswith("4.5.0 ") and "250" in result.text, result.text)
        self.assertEqual(s.commands(), [b"RSET"])

    def test_final_reply_554(self):
        """A 554 after the final dot bounces the accepted recipients."""
        s = Session([envelope(("a@b.test", "b@b.test"))]).ready()
        s.server(b"250 ok", b"250 ok", b"250 ok", b"354 go")
        s.sent()
        s.server(b"554 5.6.0 rejected")
        self.assertEqual([(r.code, r.text) for r in s.results[0][1]], [(554, "5.6.0 rejected")] * 2)
        self.assertEqual(s.commands(), [b"QUIT"])

    def test_two_envelopes_without_rset(self):
        """Two transactions share the connection with no RSET between them."""
        s = Session([envelope(mid="m1"), envelope(("q@b.test",), mid="m2")]).ready()
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.server(b"250 one")
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.server(b"250 two")
        written = s.sent()
        self.assertNotIn(b"RSET", written)
        self.assertEqual(written.count(b"MAIL FROM:"), 2)
        self.assertTrue(written.endswith(b"QUIT\r\n"))
        self.assertEqual([s.codes(0), s.codes(1)], [[250], [250]])
        self.assertEqual(s.pulls, 3)

    def test_on_result_exception_does_not_stop_the_session(self):
        """An exception in on_result is logged and the session goes on to the next envelope."""
        calls = []

        def on_result(env, results):
            calls.append(env)
            raise RuntimeError("drain bug")

        s = Session([envelope(mid="m1"), envelope(mid="m2")], on_result=on_result).ready()
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.sent()
        s.server(b"250 one")
        self.assertEqual(len(calls), 1)
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_next_envelope_exception_quits(self):
        """An exception in next_envelope ends the session with QUIT and an error, not a hang."""
        def broken():
            raise RuntimeError("spool bug")

        s = Session(next_envelope=broken).ready()
        self.assertEqual(s.commands(), [b"QUIT"])
        s.server(b"221 bye")
        s.close_if_asked()
        self.assertIn("next_envelope", s.end().error)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class FailureTests(SynchronousTestCase):
    """421, lost connections, timeouts and protocol errors."""

    def test_rcpt_421_stops_the_session(self):
        """A 421 to RCPT defers every undecided recipient with it and nothing more is pulled."""
        s = Session([envelope(("a@b.test", "b@b.test", "c@b.test", "d@b.test")), envelope(mid="m2")]).ready()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no")
        s.server(b"421 4.3.2 shutting down")
        self.assertEqual([(r.code, r.text) for r in s.results[0][1]], [
            (421, "4.3.2 shutting down"), (550, "5.1.1 no"), (421, "4.3.2 shutting down"), (421, "4.3.2 shutting down"),
        ])
        self.assertTrue(s.transport.disconnecting)
        s.close_if_asked()
        self.assertEqual(s.pulls, 1)
        end = s.end()
        self.assertIsNone(end.host_failure)
        self.assertIn("421", end.error)

    def test_mail_421_stops_the_session(self):
        """A 421 to MAIL FROM of the second envelope defers it and closes the connection."""
        s = Session([envelope(mid="m1"), envelope(("x@b.test", "y@b.test"), mid="m2"), envelope(mid="m3")]).ready()
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.server(b"250 done")
        s.server(b"421 4.4.5 too busy")
        self.assertEqual(s.codes(1), [421, 421])
        self.assertTrue(s.transport.disconnecting)
        s.server(b"250 ignored")  # nothing is acted on after the close
        self.assertEqual(s.pulls, 2)

    def test_lost_after_the_dot_is_a_possible_duplicate(self):
        """A connection lost after the final dot defers accepted recipients with possible_duplicate."""
        s = Session([envelope(("a@b.test", "b@b.test"))]).ready()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no", b"354 go")
        self.assertTrue(s.sent().endswith(b"\r\n.\r\n"))
        s.lose()
        results = s.results[0][1]
        self.assertEqual([(r.code, r.possible_duplicate) for r in results], [(451, True), (550, False)])
        self.assertTrue(results[0].text.startswith("4.4.2 "))
        self.assertIn("may have been delivered", results[0].text)
        self.assertIsNone(s.end().host_failure)
        self.assertEqual(s.pulls, 1)

    def test_lost_before_the_dot_is_not_a_duplicate(self):
        """A connection lost while waiting for the RCPT reply defers without possible_duplicate."""
        s = Session([envelope(("a@b.test", "b@b.test")), envelope(mid="m2")]).ready()
        s.server(b"250 ok", b"250 ok")
        s.lose()
        self.assertEqual([(r.code, r.possible_duplicate) for r in s.results[0][1]], [(451, False), (451, False)])
        self.assertTrue(s.results[0][1][0].text.startswith("4.4.2 "))
        self.assertEqual(s.pulls, 1)
        self.assertEqual(s.end().envelopes, 1)

    def test_timeout_after_the_dot(self):
        """No reply to the final dot within command_timeout aborts and marks a possible duplicate."""
        s = Session([envelope()]).ready()
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.clock.advance(COMMAND_TIMEOUT - 1)
        self.assertEqual(s.results, [])
        s.clock.advance(1)
        result = s.results[0][1][0]
        self.assertEqual((result.code, result.possible_duplicate), (451, True))
        self.assertTrue(result.text.startswith("4.4.2 Timed out"))
        self.assertTrue(s.transport.disconnected)  # aborted, not a polite close
        s.lose()
        self.assertIn("Timed out", s.end().error)

    def test_timeout_waiting_for_rcpt_reply(self):
        """A silent peer during RCPT defers the envelope without possible_duplicate."""
        s = Session([envelope()]).ready()
        s.server(b"250 ok")
        s.clock.advance(COMMAND_TIMEOUT)
        result = s.results[0][1][0]
        self.assertEqual((result.code, result.possible_duplicate), (451, False))
        self.assertIn("RCPT TO", result.text)

    def test_slow_but_live_peer_is_not_cut_off(self):
        """Each reply restarts the idle timer, so a session longer than command_timeout still completes."""
        s = Session([envelope()]).ready()
        s.clock.advance(COMMAND_TIMEOUT - 1)
        s.server(b"250 ok")
        s.clock.advance(COMMAND_TIMEOUT - 1)
        s.server(b"250 ok")
        s.clock.advance(COMMAND_TIMEOUT - 1)
        s.server(b"354 go")
        s.clock.advance(COMMAND_TIMEOUT - 1)
        s.server(b"250 queued")
        self.assertEqual(s.codes(), [250])

    def test_malformed_reply(self):
        """A reply that is not SMTP defers the envelope with 4.5.0 and aborts the connection."""
        s = Session([envelope()]).ready()
        s.server(b"HTTP/1.1 400 Bad Request")
        result = s.results[0][1][0]
        self.assertEqual(result.code, 451)
        self.assertTrue(result.text.startswith("4.5.0 "))
        self.assertTrue(s.transport.disconnected)

    def test_cancel_mid_transaction(self):
        """Cancelling the Deferred aborts the connection and still reports the envelope."""
        s = Session([envelope()]).ready()
        s.server(b"250 ok")
        s.d.cancel()
        self.assertEqual(s.codes(), [451])
        self.assertTrue(s.transport.disconnected)
        self.assertTrue(s.failed[0].check(CancelledError))
        s.lose()  # the later connectionLost must not fire the Deferred again


class HostFailureTests(SynchronousTestCase):
    """Failures before any envelope is pulled become SessionEnd.host_failure."""

    def test_connect_uses_address_and_timeout(self):
        """connectTCP gets the IP address, the port and connect_timeout."""
        s = Session()
        self.assertEqual((s.host, s.port, s.timeout), ("127.0.0.1", 25, CONNECT_TIMEOUT))

    def test_connection_refused(self):
        """A refused connection is a 4.4.1 host failure that tries the next host."""
        s = Session([envelope()])
        s.factory.clientConnectionFailed(None, Failure(ierror.ConnectionRefusedError()))
        failure = s.end().host_failure
        self.assertEqual((failure.code, failure.try_next_host), (421, True))
        self.assertTrue(failure.text.startswith("4.4.1 Connection refused"))
        self.assertEqual(s.pulls, 0)

    def test_connect_timeout(self):
        """A TCP connect timeout is a 4.4.1 host failure."""
        s = Session()
        s.factory.clientConnectionFailed(None, Failure(ierror.TimeoutError()))
        self.assertTrue(s.end().host_failure.text.startswith("4.4.1 Connection to mx.b.test[127.0.0.1]:25 timed out"))

    def test_no_greeting(self):
        """No greeting within connect_timeout aborts with a 4.4.1 host failure."""
        s = Session([envelope()]).connect()
        self.assertTrue(s.transport.nodelay)
        s.clock.advance(CONNECT_TIMEOUT)
        self.assertTrue(s.transport.disconnected)
        s.lose()
        failure = s.end().host_failure
        self.assertEqual((failure.code, failure.try_next_host), (421, True))
        self.assertTrue(failure.text.startswith("4.4.1 No greeting"))
        self.assertEqual(s.pulls, 0)

    def test_greeting_421_and_554(self):
        """A 421 or 554 greeting is a host failure with the greeting's code and text, then QUIT."""
        for line, code in ((b"421 4.3.2 busy", 421), (b"554 5.7.1 go away", 554)):
            s = Session([envelope()]).connect()
            s.server(line)
            self.assertEqual(s.commands(), [b"QUIT"])
            s.close_if_asked()
            failure = s.end().host_failure
            self.assertEqual((failure.code, failure.text[:5], failure.try_next_host), (code, line[4:9].decode(), True))
            self.assertEqual(s.pulls, 0)

    def test_helo_refused_does_not_loop(self):
        """EHLO then HELO refused ends with a host failure after a bounded number of commands."""
        s = Session([envelope()]).connect()
        s.server(b"220 hi")
        s.server(b"500 what")
        s.server(b"550 no HELO either")
        s.server(b"550 again", b"550 and again")
        self.assertEqual(s.commands(), [b"EHLO relay.test", b"HELO relay.test", b"QUIT"])
        s.close_if_asked()
        self.assertEqual(s.end().host_failure.code, 550)

    def test_ehlo_421_does_not_fall_back_to_helo(self):
        """A 421 to EHLO is a host failure, not a reason to try HELO."""
        s = Session().connect()
        s.server(b"220 hi", b"421 closing")
        self.assertEqual(s.commands(), [b"EHLO relay.test", b"QUIT"])
        s.close_if_asked()
        self.assertEqual(s.end().host_failure.code, 421)

    def test_helo_fallback_delivers(self):
        """A peer that only knows HELO still gets the message, without ESMTP parameters."""
        s = Session([envelope()]).connect()
        s.server(b"220 hi", b"502 no EHLO")
        s.server(b"250 hello")
        self.assertEqual(s.commands()[-1], b"MAIL FROM:<s@a.test>")

    def test_rset_refused_does_not_loop(self):
        """A refused RSET ends the session instead of being re-sent forever."""
        s = Session([envelope(), envelope(mid="m2")]).ready()
        s.server(b"250 ok", b"550 no")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>", b"RCPT TO:<r1@b.test>", b"RSET"])
        s.server(b"500 RSET what")
        s.server(b"500 again", b"500 again")
        self.assertEqual(s.commands(), [b"QUIT"])
        s.close_if_asked()
        self.assertEqual(s.pulls, 1)
        self.assertIn("RSET", s.end().error)

    def test_tls_required_without_starttls(self):
        """tls=required and no STARTTLS offered is a 4.7.5 host failure; nothing is sent in plaintext."""
        s = Session([envelope()], tls="required").ready(b"250-mx", b"250 8BITMIME")
        self.assertEqual(s.commands(), [b"QUIT"])
        s.close_if_asked()
        failure = s.end().host_failure
        self.assertEqual((failure.code, failure.try_next_host), (454, True))
        self.assertTrue(failure.text.startswith("4.7.5 "))
        self.assertEqual(s.pulls, 0)

    def test_tls_handshake_failure_required(self):
        """A connection lost during the TLS handshake (certificate check) is a 4.7.5 host failure."""
        s = Session([envelope()], tls="required").ready(b"250-mx", b"250 STARTTLS")
        self.assertEqual(s.commands(), [b"STARTTLS"])
        s.server(b"220 go ahead")
        self.assertIsNotNone(s.transport.tls_options)
        s.sent()
        s.lose(Failure(ierror.ConnectionLost("certificate verify failed")))
        failure = s.end().host_failure
        self.assertTrue(failure.text.startswith("4.7.5 TLS with mx.b.test"))
        self.assertEqual(s.pulls, 0)

    def test_tls_handshake_timeout_required(self):
        """No answer after STARTTLS within command_timeout is a 4.7.5 host failure in required mode."""
        s = Session([envelope()], tls="required").ready(b"250-mx", b"250 STARTTLS")
        s.server(b"220 go ahead")
        s.clock.advance(COMMAND_TIMEOUT)
        self.assertTrue(s.transport.disconnected)
        s.lose()
        self.assertTrue(s.end().host_failure.text.startswith("4.7.5 TLS with mx.b.test"))

    def test_starttls_injection_is_discarded(self):
        """Replies sent in plaintext right after '220' are dropped, not read as the answer to the EHLO over TLS."""
        s = Session([envelope()], tls="opportunistic").ready(b"250-mx", b"250 STARTTLS")
        self.assertEqual(s.commands(), [b"STARTTLS"])
        s.server(b"220 go ahead", b"250 fake")
        self.assertIsNotNone(s.transport.tls_options)
        self.assertEqual(s.commands(), [b"EHLO relay.test"])
        self.assertEqual(s.pulls, 0)  # "250 fake" did not complete the EHLO
        s.server(b"250-mx", b"250 8BITMIME")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])
        s.server(b"421 bye")
        s.close_if_asked()
        self.assertTrue(s.end().tls)

    def test_opportunistic_starttls_refused_goes_on_in_plaintext(self):
        """In opportunistic mode a refused STARTTLS command continues without TLS."""
        s = Session([envelope()], tls="opportunistic").ready(b"250-mx", b"250 STARTTLS")
        s.sent()
        s.server(b"454 4.7.0 TLS not available")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])

    def test_opportunistic_credentials_are_not_sent_in_plaintext(self):
        """tls=opportunistic with credentials: when TLS does not start (not offered,
        or STARTTLS refused), AUTH is not sent; a 4.7.0 host failure (the next
        address may offer TLS), never unauthenticated mail (SPEC "TLS": only
        "none" sends AUTH in plaintext)."""
        for greeting, starttls_reply in (((b"250-mx", b"250 AUTH PLAIN LOGIN"), None),
                                         ((b"250-mx", b"250-STARTTLS", b"250 AUTH PLAIN"), b"454 4.7.0 not now")):
            s = Session([envelope()], tls="opportunistic", credentials=("user", "s3cret")).ready(*greeting)
            if starttls_reply:
                self.assertEqual(s.commands(), [b"STARTTLS"])
                s.server(starttls_reply)
            self.assertEqual(s.commands(), [b"QUIT"])
            s.close_if_asked()
            end = s.end()
            failure = end.host_failure
            self.assertEqual((failure.code, failure.try_next_host), (454, True))
            self.assertTrue(failure.text.startswith("4.7.0 mx.b.test[") and "plaintext" in failure.text, failure)
            self.assertNotIn("s3cret", repr(end))
            self.assertEqual(s.pulls, 0)

    def test_opportunistic_credentials_go_once_tls_is_up(self):
        s = Session([envelope()], tls="opportunistic", credentials=("user", "pw")).ready(b"250-mx", b"250 STARTTLS")
        self.assertEqual(s.commands(), [b"STARTTLS"])
        s.server(b"220 go ahead")
        self.assertEqual(s.commands(), [b"EHLO relay.test"])
        s.server(b"250-mx", b"250 AUTH PLAIN")
        self.assertEqual(s.commands(), [b"AUTH PLAIN " + base64.b64encode(b"user\0user\0pw")])

    def test_auth_refused(self):
        """A refused AUTH is a temporary 4.7.0 host failure that does not leak the password."""
        s = Session([envelope()], credentials=("user", "s3cret")).ready(b"250-mx", b"250 AUTH LOGIN PLAIN")
        first = s.commands()
        self.assertEqual(first, [b"AUTH PLAIN " + base64.b64encode(b"user\0user\0s3cret")])
        s.server(b"535 5.7.8 bad credentials")
        s.server(b"535 5.7.8 bad credentials")
        self.assertEqual(s.commands()[-1], b"QUIT")
        s.close_if_asked()
        end = s.end()
        failure = end.host_failure
        self.assertEqual((failure.code, failure.try_next_host), (454, False))
        self.assertTrue(failure.text.startswith("4.7.0 Authentication"))
        self.assertNotIn("s3cret", repr(end))
        self.assertEqual(s.pulls, 0)

    def test_auth_login_succeeds(self):
        """AUTH LOGIN answers the two challenges and then starts the transaction."""
        s = Session([envelope()], credentials=("user", "pw")).ready(b"250-mx", b"250 AUTH LOGIN")
        self.assertEqual(s.commands(), [b"AUTH LOGIN"])
        s.server(b"334 " + base64.b64encode(b"Username:"))
        self.assertEqual(s.commands(), [base64.b64encode(b"user")])
        s.server(b"334 " + base64.b64encode(b"Password:"))
        self.assertEqual(s.commands(), [base64.b64encode(b"pw")])
        s.server(b"235 ok")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])
        s.server(b"421 bye")
        s.close_if_asked()
        self.assertTrue(s.end().authenticated)

    def test_auth_not_offered(self):
        """Credentials and no AUTH offered is a host failure, never unauthenticated mail."""
        s = Session([envelope()], credentials=("user", "pw")).ready(b"250 mx")
        self.assertEqual(s.commands(), [b"QUIT"])
        s.close_if_asked()
        self.assertTrue(s.end().host_failure.text.startswith("4.7.0 "))


class ExtensionTests(SynchronousTestCase):
    """SIZE, 8BITMIME and SMTPUTF8."""

    def test_no_parameters_when_nothing_is_offered(self):
        """Without SIZE/8BITMIME/SMTPUTF8 in EHLO, MAIL FROM carries no parameters."""
        s = Session([envelope(sender="")]).ready(b"250-mx", b"250 PIPELINING")
        self.assertEqual(s.commands(), [b"MAIL FROM:<>", b"RCPT TO:<r1@b.test>", b"DATA"])

    def test_parameters_when_offered(self):
        """SIZE, BODY=8BITMIME and SMTPUTF8 are sent when offered and needed."""
        data = "Subject: é\r\n\r\nnaïve\r\n".encode()
        s = Session([envelope(("ü@b.test",), data=data)]).ready(
            b"250-mx", b"250-size 1000", b"250-8bitmime", b"250 SMTPUTF8")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test> SIZE=%d BODY=8BITMIME SMTPUTF8" % len(data)])
        s.server(b"250 ok")
        self.assertEqual(s.commands(), ["RCPT TO:<ü@b.test>".encode()])

    def test_size_counts_crlf_form_without_stuffing(self):
        """SIZE is the CRLF message size (RFC 1870), not counting stuffing dots."""
        data = b".a\r\n.b\r\n"
        s = Session([envelope(data=data)]).ready(b"250-mx", b"250 SIZE")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test> SIZE=8"])

    def test_8bit_without_8bitmime(self):
        """An 8-bit body to a peer without 8BITMIME bounces 5.6.3 for everyone and sends nothing."""
        s = Session([envelope(("a@b.test", "b@b.test"), data="naïve\r\n".encode()), envelope(mid="m2")]).ready()
        self.assertEqual([(r.code, r.text[:6]) for r in s.results[0][1]], [(554, "5.6.3 ")] * 2)
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])  # the next envelope went ahead
        self.assertEqual(s.pulls, 2)

    def test_non_ascii_recipient_without_smtputf8(self):
        """A non-ASCII recipient without SMTPUTF8 bounces 5.6.7 alone; the others are sent."""
        s = Session([envelope(("ü@b.test", "a@b.test"))]).ready(b"250-mx", b"250 8BITMIME")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>"])
        s.server(b"250 ok")
        self.assertEqual(s.commands(), [b"RCPT TO:<a@b.test>"])
        s.server(b"250 ok", b"354 go")
        s.sent()
        s.server(b"250 queued")
        self.assertEqual([(r.code, r.text[:6]) for r in s.results[0][1]], [(553, "5.6.7 "), (250, "queued")])

    def test_non_ascii_sender_without_smtputf8(self):
        """A non-ASCII sender without SMTPUTF8 bounces every recipient with 5.6.7."""
        s = Session([envelope(("a@b.test",), sender="ü@a.test")]).ready()
        self.assertEqual([(r.code, r.text[:6]) for r in s.results[0][1]], [(553, "5.6.7 ")])
        self.assertEqual(s.commands(), [b"QUIT"])

    def test_oversize_message(self):
        """A message larger than the advertised SIZE bounces 552 5.3.4 without being sent; SIZE 0 means no limit."""
        s = Session([envelope(data=b"x" * 100 + b"\r\n")]).ready(b"250-mx", b"250 SIZE 50")
        self.assertEqual([(r.code, r.text[:6]) for r in s.results[0][1]], [(552, "5.3.4 ")])
        self.assertEqual(s.commands(), [b"QUIT"])
        s = Session([envelope(data=b"x" * 100 + b"\r\n")]).ready(b"250-mx", b"250 SIZE 0")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test> SIZE=102"])

    def test_bad_address_never_reaches_the_wire(self):
        """An address with CR/LF (never valid in the spool) is refused locally, not rewritten by quoteaddr."""
        s = Session([envelope(("a@b.test\r\nRCPT TO:<evil@x.test>", "ok@b.test"))]).ready()
        s.server(b"250 ok")
        self.assertEqual(s.commands(), [b"MAIL FROM:<s@a.test>", b"RCPT TO:<ok@b.test>"])
        s.server(b"250 ok", b"354 go")
        s.sent()
        s.server(b"250 ok")
        self.assertEqual(s.codes(), [553, 250])


class BodyTests(SynchronousTestCase):
    """The body on the wire: dot-stuffing, chunk boundaries, line endings."""

    def dotted_body(self) -> bytes:
        """Lines starting with '.' at offsets 0, 16384 and 32768."""
        parts = [b".first line\r\n"]
        for offset, line in ((16384, b".at 16384\r\n"), (32768, b".at 32768\r\n")):
            gap = offset - sum(map(len, parts)) - 2
            parts.append(b"x" * gap + b"\r\n")
            parts.append(line)
        body = b"".join(parts) + b"last\r\n"
        assert body[16384:16386] == b".a" and body[32768:32770] == b".a"
        return body

    def smuggling_body(self) -> bytes:
        """A lone '.' line at offset 16384 followed by what would be SMTP commands."""
        head = b"Subject: x\r\n\r\n"
        filler = b"y" * (16384 - len(head) - 2) + b"\r\n"
        body = head + filler + b".\r\nMAIL FROM:<evil@x.test>\r\n..two\r\n"
        assert body[16384:16387] == b".\r\n"
        return body

    def deliver(self, data: bytes, single_write_max: int | None = None) -> bytes:
        """Run one transaction with ``data`` and return the bytes written after 354."""
        s = Session([envelope(data=data)]).ready()
        if single_write_max is not None:
            s.proto.single_write_max = single_write_max
        s.server(b"250 ok", b"250 ok")
        s.sent()
        s.server(b"354 go")
        while s.transport.producer is not None:
            s.transport.producer.resumeProducing()
        body = s.sent()
        s.server(b"250 ok")
        self.assertEqual(s.codes(), [250])
        return body

    def test_dot_lines_at_chunk_boundaries(self):
        """Lines starting with '.' at 0, 16384 and 32768 are each stuffed, in one write and in 16 KiB chunks."""
        data = self.dotted_body()
        expected = stuffed(data)
        self.assertIsNone(first_difference(self.deliver(data), expected))
        self.assertIsNone(first_difference(self.deliver(data, single_write_max=0), expected))
        self.assertEqual(expected.count(b"\r\n..at "), 2)
        self.assertTrue(expected.startswith(b"..first line\r\n"))

    def test_lone_dot_at_16384(self):
        """A lone '.' line at 16384 is sent as '..' so it cannot end the data early."""
        data = self.smuggling_body()
        for limit in (None, 0):
            wire = self.deliver(data, single_write_max=limit)
            self.assertIsNone(first_difference(wire, stuffed(data)))
            self.assertEqual(wire.count(b"\r\n.\r\n"), 1)  # only the real end of data
            self.assertIn(b"\r\n..\r\nMAIL FROM:<evil@x.test>\r\n...two\r\n.\r\n", wire)

    def test_chunked_body_resets_the_idle_timer(self):
        """While a large body is accepted chunk by chunk the idle timer keeps restarting."""
        s = Session([envelope(data=self.dotted_body())]).ready()
        s.proto.single_write_max = 0
        s.server(b"250 ok", b"250 ok", b"354 go")
        while s.transport.producer is not None:
            s.clock.advance(COMMAND_TIMEOUT - 1)
            s.transport.producer.resumeProducing()
        self.assertGreater(s.clock.seconds(), 3 * COMMAND_TIMEOUT)
        self.assertEqual(s.results, [])
        s.server(b"250 ok")
        self.assertEqual(s.codes(), [250])

    def test_reply_while_the_body_is_being_written(self):
        """A reply before the whole body is written decides the envelope with it (no duplicate) and aborts."""
        s = Session([envelope(data=self.dotted_body()), envelope(mid="m2")]).ready()
        s.proto.single_write_max = 0
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.transport.producer.resumeProducing()
        s.server(b"552 5.3.4 too much mail data")
        result = s.results[0][1][0]
        self.assertEqual((result.code, result.text, result.possible_duplicate), (552, "5.3.4 too much mail data", False))
        self.assertTrue(s.transport.disconnected)
        self.assertEqual(s.pulls, 1)

    def test_crlf_data_is_not_doubled(self):
        """CRLF data goes out unchanged (no CR CR LF), followed by the final dot."""
        data = b"Subject: a\r\n\r\nline one\r\nline two\r\n"
        wire = self.deliver(data)
        self.assertEqual(wire, data + b".\r\n")
        self.assertNotIn(b"\r\r\n", wire)

    def test_to_wire_normalises_bare_line_endings(self):
        """Bare LF and CR become CRLF before stuffing, so '\\n.\\n' cannot end the data."""
        self.assertEqual(to_wire(b"a\n.\nb"), b"a\r\n..\r\nb\r\n.\r\n")
        self.assertEqual(to_wire(b"a\r.\r\n"), b"a\r\n..\r\n.\r\n")
        self.assertEqual(to_wire(b""), b".\r\n")


def test_session_end_is_frozen():
    """SessionEnd is an immutable value."""
    end = SessionEnd(host_failure=None)
    try:
        end.envelopes = 3  # type: ignore[misc]
    except (AttributeError, TypeError):
        return
    raise AssertionError("SessionEnd accepted an assignment")
