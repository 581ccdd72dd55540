"""Unit tests for relay.smtpclient with PIPELINING (RFC 2920) in the EHLO reply.

MAIL FROM, every RCPT TO and DATA go out in one write; the replies are read
in order and give the same per-recipient results as the unpipelined exchange.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from test_smtpclient import BODY, COMMAND_TIMEOUT, Session, envelope

EHLO = (b"250-mx.b.test", b"250-8BITMIME", b"250 PIPELINING")


def group(*rcpts: str, sender: str = "s@a.test") -> bytes:
    """The pipelined command group for ``rcpts``, as one write."""
    lines = [f"MAIL FROM:<{sender}>".encode()] + [f"RCPT TO:<{r}>".encode() for r in rcpts] + [b"DATA"]
    return b"".join(line + b"\r\n" for line in lines)


class PipelinedSession(Session):
    """A Session that records every transport write and advertises PIPELINING."""

    def connect(self):
        super().connect()
        self.writes: list[bytes] = []
        write = self.transport.write

        def recording_write(data):
            self.writes.append(data)
            write(data)

        self.transport.write = recording_write
        return self

    def ready(self, *ehlo: bytes):
        return super().ready(*(ehlo or EHLO))

    def replies(self) -> list[tuple[int, str, bool]]:
        return self.results_of(0)

    def results_of(self, n: int) -> list[tuple[int, str, bool]]:
        return [(r.code, r.text, r.possible_duplicate) for r in self.results[n][1]]


class PipelinedTransactionTests(SynchronousTestCase):
    """Complete and refused transactions over a pipelined group."""

    def test_group_in_one_write_then_body_after_354(self):
        """MAIL, every RCPT and DATA go in one write; nothing more until 354, then only the body."""
        env = envelope(("a@b.test", "c@b.test", "d@b.test"))
        s = PipelinedSession([env]).ready()
        self.assertEqual(s.writes[-1], group("a@b.test", "c@b.test", "d@b.test"))
        self.assertEqual(s.sent(), group("a@b.test", "c@b.test", "d@b.test"))
        writes = len(s.writes)
        s.server(b"250 ok", b"250 ok", b"250 ok")
        s.server(b"250 ok")
        self.assertEqual(s.sent(), b"")
        self.assertEqual(len(s.writes), writes)
        s.server(b"354 go")
        self.assertEqual(s.sent(), BODY + b".\r\n")
        s.server(b"250 2.0.0 queued")
        self.assertEqual(s.replies(), [(250, "2.0.0 queued", False)] * 3)
        self.assertEqual(s.commands(), [b"QUIT"])  # no RSET after a completed transaction
        s.server(b"221 bye")
        s.close_if_asked()
        end = s.end()
        self.assertEqual((end.host_failure, end.envelopes, end.transactions, end.error), (None, 1, 1, None))

    def test_replies_in_one_packet(self):
        """All the replies of the group arriving at once are handled in order."""
        s = PipelinedSession([envelope(("a@b.test", "c@b.test"))]).ready()
        s.sent()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no", b"354 go")
        self.assertEqual(s.sent(), BODY + b".\r\n")
        s.server(b"250 queued")
        self.assertEqual(s.replies(), [(250, "queued", False), (550, "5.1.1 no", False)])

    def test_mixed_rcpt_replies(self):
        """RCPT 250/450/550 give each recipient its own reply; the accepted one gets the final reply."""
        env = envelope(("ok@b.test", "temp@b.test", "perm@b.test"))
        s = PipelinedSession([env]).ready()
        s.sent()
        s.server(b"250 sender ok", b"250 ok", b"450 4.2.0 temp", b"550 5.1.1 no such user")
        self.assertEqual(s.sent(), b"")
        s.server(b"354 go")
        self.assertEqual(s.sent(), BODY + b".\r\n")
        s.server(b"250-2.0.0 queued", b"250 as 1234")
        self.assertEqual(s.replies(), [
            (250, "2.0.0 queued as 1234", False),
            (450, "4.2.0 temp", False),
            (550, "5.1.1 no such user", False),
        ])
        self.assertEqual([r.recipient for r in s.results[0][1]], list(env.recipients))

    def test_mail_refused_then_rset_and_next_envelope(self):
        """A refused MAIL decides every recipient with its reply; the RCPT/DATA replies are consumed, then RSET."""
        first = envelope(("x@b.test", "y@b.test"), mid="m1")
        second = envelope(("z@b.test",), mid="m2")
        s = PipelinedSession([first, second]).ready()
        self.assertEqual(s.commands()[-4:], [b"MAIL FROM:<s@a.test>", b"RCPT TO:<x@b.test>", b"RCPT TO:<y@b.test>", b"DATA"])
        s.server(b"553 5.7.1 sender rejected")
        self.assertEqual(s.replies(), [(553, "5.7.1 sender rejected", False)] * 2)
        self.assertIs(s.results[0][0], first)
        s.server(b"503 5.5.1 need MAIL", b"503 5.5.1 need MAIL")
        self.assertEqual(s.sent(), b"")  # the DATA reply is still owed
        s.server(b"503 5.5.1 need RCPT")
        self.assertEqual(s.commands(), [b"RSET"])
        self.assertEqual(len(s.results), 1)
        s.server(b"250 reset")
        self.assertEqual(s.sent(), group("z@b.test"))
        s.server(b"250 ok", b"250 ok", b"354 go")
        self.assertEqual(s.sent(), BODY + b".\r\n")
        s.server(b"250 queued")
        self.assertEqual(s.results_of(1), [(250, "queued", False)])
        self.assertEqual(s.commands(), [b"QUIT"])
        s.server(b"221 bye")
        s.close_if_asked()
        end = s.end()
        self.assertEqual((end.envelopes, end.transactions, end.error), (2, 1, None))

    def test_mail_refused_and_data_354(self):
        """MAIL refused but DATA answered 354: a lone dot ends the empty data, its reply is consumed, then RSET."""
        s = PipelinedSession([envelope(("x@b.test",))]).ready()
        s.sent()
        s.server(b"550 5.7.1 no", b"503 5.5.1 need MAIL", b"354 go")
        self.assertEqual(s.sent(), b".\r\n")
        s.server(b"554 5.5.1 no valid recipients")
        self.assertEqual(s.commands(), [b"RSET"])
        s.server(b"250 reset")
        self.assertEqual(s.commands(), [b"QUIT"])
        self.assertEqual(s.replies(), [(550, "5.7.1 no", False)])
        s.server(b"221 bye")
        s.close_if_asked()
        self.assertEqual(s.end().transactions, 0)

    def test_all_rcpts_refused_data_503(self):
        """Every RCPT refused: each keeps its own reply, the DATA 503 is consumed, then RSET."""
        s = PipelinedSession([envelope(("a@b.test", "c@b.test"))]).ready()
        s.sent()
        s.server(b"250 ok", b"450 4.2.0 busy", b"550 5.1.1 unknown")
        self.assertEqual(s.replies(), [(450, "4.2.0 busy", False), (550, "5.1.1 unknown", False)])
        self.assertEqual(s.sent(), b"")
        s.server(b"503 5.5.1 no valid recipients")
        self.assertEqual(s.commands(), [b"RSET"])
        s.server(b"250 reset")
        self.assertEqual(s.commands(), [b"QUIT"])
        s.server(b"221 bye")
        s.close_if_asked()
        end = s.end()
        self.assertEqual((end.envelopes, end.transactions, end.error), (1, 0, None))
        self.assertEqual(len(s.results), 1)

    def test_all_rcpts_refused_data_354(self):
        """Every RCPT refused and DATA 354 (non-conforming): a lone dot, its 250 ignored, nothing delivered, RSET."""
        s = PipelinedSession([envelope(("a@b.test", "c@b.test")), envelope(("q@b.test",), mid="m2")]).ready()
        s.sent()
        s.server(b"250 ok", b"550 5.1.1 unknown", b"551 5.1.6 moved", b"354 go")
        self.assertEqual(s.sent(), b".\r\n")
        self.assertEqual(s.replies(), [(550, "5.1.1 unknown", False), (551, "5.1.6 moved", False)])
        s.server(b"250 2.0.0 queued an empty message")
        self.assertEqual(s.commands(), [b"RSET"])
        self.assertEqual(len(s.results), 1)
        s.server(b"250 reset")
        self.assertEqual(s.sent(), group("q@b.test"))
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.sent()
        s.server(b"250 queued")
        self.assertEqual(s.results_of(1), [(250, "queued", False)])
        self.assertEqual(s.commands(), [b"QUIT"])
        s.server(b"221 bye")
        s.close_if_asked()
        self.assertEqual(s.end().transactions, 1)  # the empty data is not a delivery

    def test_data_refused(self):
        """DATA refused: accepted recipients get its reply, refused ones keep theirs, then RSET."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test", "c@b.test"))]).ready()
        s.sent()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no", b"250 ok", b"451 4.3.0 try later")
        self.assertEqual(s.replies(), [
            (451, "4.3.0 try later", False), (550, "5.1.1 no", False), (451, "4.3.0 try later", False),
        ])
        self.assertEqual(s.commands(), [b"RSET"])
        s.server(b"250 reset")
        self.assertEqual(s.commands(), [b"QUIT"])

    def test_two_envelopes_in_one_session(self):
        """Two pipelined transactions share the connection, each group in one write, no RSET between them."""
        s = PipelinedSession([envelope(("a@b.test",), mid="m1"), envelope(("b@b.test", "c@b.test"), mid="m2")]).ready()
        self.assertEqual(s.writes[-1], group("a@b.test"))
        s.sent()
        s.server(b"250 ok", b"250 ok", b"354 go")
        self.assertEqual(s.sent(), BODY + b".\r\n")
        s.server(b"250 one")
        self.assertEqual(s.writes[-1], group("b@b.test", "c@b.test"))
        self.assertEqual(s.sent(), group("b@b.test", "c@b.test"))
        s.server(b"250 ok", b"250 ok", b"450 4.2.1 later", b"354 go")
        self.assertEqual(s.sent(), BODY + b".\r\n")
        s.server(b"250 two")
        self.assertEqual(s.results_of(0), [(250, "one", False)])
        self.assertEqual(s.results_of(1), [(250, "two", False), (450, "4.2.1 later", False)])
        self.assertEqual(s.commands(), [b"QUIT"])
        s.server(b"221 bye")
        s.close_if_asked()
        end = s.end()
        self.assertEqual((end.envelopes, end.transactions, end.error), (2, 2, None))
        self.assertEqual(s.pulls, 3)

    def test_locally_refused_recipient_is_not_in_the_group(self):
        """A recipient refused before sending (bad syntax) is left out of the group and keeps its local result."""
        s = PipelinedSession([envelope(("a@b.test\r\nRCPT TO:<evil@x.test>", "ok@b.test"))]).ready()
        self.assertEqual(s.writes[-1], group("ok@b.test"))
        s.sent()
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.sent()
        s.server(b"250 queued")
        self.assertEqual([r.code for r in s.results[0][1]], [553, 250])

    def test_without_pipelining_nothing_changes(self):
        """Without PIPELINING in EHLO the commands still go one at a time."""
        s = PipelinedSession([envelope(("a@b.test", "c@b.test"))]).ready(b"250-mx", b"250 8BITMIME")
        self.assertEqual(s.writes[-1], b"MAIL FROM:<s@a.test>\r\n")
        s.sent()
        s.server(b"250 ok")
        self.assertEqual(s.commands(), [b"RCPT TO:<a@b.test>"])
        s.server(b"250 ok")
        self.assertEqual(s.commands(), [b"RCPT TO:<c@b.test>"])
        s.server(b"250 ok")
        self.assertEqual(s.commands(), [b"DATA"])


class PipelinedFailureTests(SynchronousTestCase):
    """421, lost connections, timeouts and malformed replies inside a pipelined group."""

    def test_421_after_mail(self):
        """A 421 to MAIL decides every recipient with it and ends the session; the rest is not acted on."""
        s = PipelinedSession([envelope(("x@b.test", "y@b.test")), envelope(mid="m2")]).ready()
        s.sent()
        s.server(b"421 4.4.5 too busy")
        self.assertEqual(s.replies(), [(421, "4.4.5 too busy", False)] * 2)
        self.assertTrue(s.transport.disconnecting)
        self.assertEqual(s.sent(), b"QUIT\r\n")
        s.server(b"503 ignored", b"503 ignored", b"354 ignored")
        self.assertEqual(s.sent(), b"")
        s.close_if_asked()
        self.assertEqual(s.pulls, 1)
        end = s.end()
        self.assertIsNone(end.host_failure)
        self.assertIn("421", end.error)

    def test_421_to_a_rcpt(self):
        """A 421 to a RCPT defers it and every undecided recipient; earlier RCPT refusals keep their reply."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test", "c@b.test", "d@b.test"))]).ready()
        s.sent()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no", b"421 4.3.2 shutting down")
        self.assertEqual(s.replies(), [
            (421, "4.3.2 shutting down", False), (550, "5.1.1 no", False),
            (421, "4.3.2 shutting down", False), (421, "4.3.2 shutting down", False),
        ])
        self.assertTrue(s.transport.disconnecting)
        s.close_if_asked()
        self.assertIn("421", s.end().error)

    def test_421_to_data(self):
        """A 421 to DATA decides the accepted recipients with it and ends the session."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test")), envelope(mid="m2")]).ready()
        s.sent()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no", b"421 4.3.2 bye")
        self.assertEqual(s.replies(), [(421, "4.3.2 bye", False), (550, "5.1.1 no", False)])
        self.assertTrue(s.transport.disconnecting)
        self.assertNotIn(b"RSET", s.sent())
        self.assertEqual(s.pulls, 1)

    def test_421_to_data_after_every_rcpt_refused(self):
        """Every RCPT refused then 421 to DATA: the RCPT replies stand, the session ends without RSET."""
        s = PipelinedSession([envelope(("a@b.test",)), envelope(mid="m2")]).ready()
        s.sent()
        s.server(b"250 ok", b"550 5.1.1 no", b"421 4.3.2 bye")
        self.assertEqual(s.replies(), [(550, "5.1.1 no", False)])
        self.assertTrue(s.transport.disconnecting)
        self.assertNotIn(b"RSET", s.sent())
        s.close_if_asked()
        self.assertEqual(s.pulls, 1)
        self.assertIn("421", s.end().error)

    def test_421_while_skipping_after_a_refused_mail(self):
        """A 421 among the replies consumed after a refused MAIL ends the session (the results already went out)."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test")), envelope(mid="m2")]).ready()
        s.sent()
        s.server(b"550 5.7.1 no", b"421 4.3.2 bye")
        self.assertEqual(s.replies(), [(550, "5.7.1 no", False)] * 2)
        self.assertTrue(s.transport.disconnecting)
        self.assertNotIn(b"RSET", s.sent())
        s.close_if_asked()
        self.assertEqual(s.pulls, 1)
        self.assertIn("421", s.end().error)

    def test_lost_after_the_group_was_sent(self):
        """A connection lost before any reply to the group defers every recipient, not a possible duplicate."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test")), envelope(mid="m2")]).ready()
        s.sent()
        s.lose()
        results = s.results[0][1]
        self.assertEqual([(r.code, r.possible_duplicate) for r in results], [(451, False), (451, False)])
        self.assertTrue(results[0].text.startswith("4.4.2 Connection to mx.b.test[127.0.0.1]:25 lost during MAIL FROM"))
        self.assertEqual(s.pulls, 1)
        end = s.end()
        self.assertEqual((end.host_failure, end.envelopes), (None, 1))

    def test_lost_in_the_middle_of_the_rcpt_replies(self):
        """Lost after some RCPT replies: refused recipients keep their reply, the others are deferred (no duplicate)."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test", "c@b.test"))]).ready()
        s.sent()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no")
        s.lose()
        self.assertEqual([(r.code, r.possible_duplicate) for r in s.results[0][1]], [(451, False), (550, False), (451, False)])
        self.assertIn("lost during RCPT TO", s.results[0][1][0].text)

    def test_lost_waiting_for_the_data_reply(self):
        """Lost while the DATA reply is owed: accepted recipients are deferred, not possible duplicates."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test"))]).ready()
        s.sent()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no")
        s.lose()
        self.assertEqual([(r.code, r.possible_duplicate) for r in s.results[0][1]], [(451, False), (550, False)])
        self.assertIn("lost during DATA", s.results[0][1][0].text)

    def test_lost_after_the_dot_is_a_possible_duplicate(self):
        """Lost after the final dot: accepted recipients are possible duplicates, as without pipelining."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test"))]).ready()
        s.sent()
        s.server(b"250 ok", b"250 ok", b"550 5.1.1 no", b"354 go")
        self.assertTrue(s.sent().endswith(b"\r\n.\r\n"))
        s.lose()
        results = s.results[0][1]
        self.assertEqual([(r.code, r.possible_duplicate) for r in results], [(451, True), (550, False)])
        self.assertIn("may have been delivered", results[0].text)

    def test_lost_while_skipping_replies(self):
        """Lost while the replies of a refused MAIL are being consumed: the results already went out, once."""
        s = PipelinedSession([envelope(("a@b.test",)), envelope(mid="m2")]).ready()
        s.sent()
        s.server(b"550 5.7.1 no")
        s.lose()
        self.assertEqual(len(s.results), 1)
        self.assertEqual(s.replies(), [(550, "5.7.1 no", False)])
        self.assertEqual(s.pulls, 1)
        self.assertIn("lost", s.end().error)

    def test_timeout_waiting_for_rcpt_replies(self):
        """No reply to the rest of the group within command_timeout aborts and defers without duplicate."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test"))]).ready()
        s.sent()
        s.server(b"250 ok", b"550 5.1.1 no")
        s.clock.advance(COMMAND_TIMEOUT)
        results = s.results[0][1]
        self.assertEqual([(r.code, r.possible_duplicate) for r in results], [(550, False), (451, False)])
        self.assertTrue(results[1].text.startswith("4.4.2 Timed out"))
        self.assertIn("RCPT TO", results[1].text)
        self.assertTrue(s.transport.disconnected)

    def test_timeout_after_the_dot(self):
        """No reply to the final dot within command_timeout: a possible duplicate, as without pipelining."""
        s = PipelinedSession([envelope()]).ready()
        s.sent()
        s.server(b"250 ok", b"250 ok", b"354 go")
        s.clock.advance(COMMAND_TIMEOUT)
        result = s.results[0][1][0]
        self.assertEqual((result.code, result.possible_duplicate), (451, True))

    def test_malformed_reply_in_the_group(self):
        """A malformed reply among the group's replies defers the open recipients with 4.5.0 and aborts."""
        s = PipelinedSession([envelope(("a@b.test", "b@b.test"))]).ready()
        s.sent()
        s.server(b"250 ok", b"550 5.1.1 no", b"HTTP/1.1 400 Bad Request")
        results = s.results[0][1]
        self.assertEqual([(r.code, r.possible_duplicate) for r in results], [(550, False), (451, False)])
        self.assertTrue(results[1].text.startswith("4.5.0 Malformed reply"))
        self.assertTrue(s.transport.disconnected)
