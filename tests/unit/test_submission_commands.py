"""The listener's MAIL and RCPT replies for malformed commands (no sockets)."""

from __future__ import annotations

import base64

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from relay.submission import AUTH_FAILURE_LIMIT
from tests.unit.submission_fakes import PLAIN_OK, REMOTE, Session, Spool, code

MAIL = b"MAIL FROM:<a@s.test>"


@pytest.mark.parametrize("before, command, reply", [
    ((), b"MAIL FROM:a@s.test", b"501 5.5.2"),                 # no angle brackets
    ((), b"MAIL FROM:<a@s.test> SIZE", b"501 5.5.4"),          # SIZE without a number
    ((), b"MAIL FROM:<a@s.test> SIZE=20000", b"552 5.3.4"),    # over the limit (10,000)
    ((), b"MAIL FROM:<a@s.test> BODY=BINARYMIME", b"501 5.5.4"),
    ((), b"MAIL FROM:<a@s.test> FOO=bar", b"555 5.5.4"),
    ((), "MAIL FROM:<é@s.test>".encode(), b"553 5.6.7"),
    ((), b"MAIL FROM:<a b@s.test>", b"553 5.1.7"),
    ((), b"MAIL FROM:<a@s.test> AUTH=<>", b"250 2.1.0"),
    ((MAIL,), b"RCPT TO:r@d.test", b"501 5.5.2"),
    ((MAIL,), b"RCPT TO:<r@d.test> NOTIFY=NEVER", b"555 5.5.4"),
    ((MAIL,), "RCPT TO:<ü@d.test>".encode(), b"553 5.6.7"),
    ((MAIL,), b"RCPT TO:<r@>", b"553 5.1.3"),
    ((MAIL,), b"RCPT TO:<r@d.test>", b"250 2.1.5"),
    ((), b"RCPT TO:<r@d.test>", b"503 5.5.1"),                 # before MAIL
])
def test_mail_and_rcpt_replies(before, command, reply):
    s = Session()
    s.ehlo()
    for line in before:
        assert code(s.cmd(line)) == [b"250 2.1.0"]
    assert code(s.cmd(command)) == [reply]


@pytest.mark.parametrize("command, reply", [
    (b"EHLO", b"501 5.5.4 Syntax: EHLO hostname"),
    (b"HELO ", b"501 5.5.4 Syntax: HELO hostname"),
    (b"EXPN staff", b"502 5.5.1 Command not implemented."),       # known, not offered
    (b"BDAT 10 LAST", b"502 5.5.1 Command not implemented."),
    (b"FROB x", b"500 5.5.2 Command not recognized."),            # unknown
    (b"", b"500 5.5.2 Syntax error: empty command."),
    (b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret"), b"503 5.5.1 Send EHLO first."),
])
def test_session_command_replies(command, reply):
    """Replies with the code RFC 5321 gives them (and an enhanced status), before and outside a transaction."""
    s = Session(users=True)
    assert s.cmd(command) == [reply]


class FailedLogins:
    """The relay.submission log's 'AUTH failed' events while in use."""

    def __enter__(self):
        self.events = []
        globalLogPublisher.addObserver(self.observe)
        return self.events

    def observe(self, event):
        if event.get("log_namespace") == "relay.submission" and "AUTH failed" in event.get("log_format", ""):
            self.events.append(formatEvent(event))

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.observe)


def test_failed_logins_are_logged_and_limited():
    """Each wrong password: 535 5.7.8 and a log line naming the user and the client; the
    AUTH_FAILURE_LIMIT-th: 421 and the connection closes.  A good login after fewer failures works."""
    wrong = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0guess")
    s = Session(REMOTE, users=True)
    s.ehlo()
    with FailedLogins() as logged:
        for _ in range(AUTH_FAILURE_LIMIT - 1):
            assert s.cmd(wrong) == [b"535 5.7.8 Authentication credentials invalid."]
        assert not s.transport.disconnecting
        assert code(s.cmd(wrong)) == [b"421 relay.test"]
        assert b"4.7.0 Too many failed authentications" in s.transport.value()
        assert s.transport.disconnecting
    assert len(logged) == AUTH_FAILURE_LIMIT
    assert logged[0] == f"AUTH failed from 192.0.2.7: user 'alice' (1 of {AUTH_FAILURE_LIMIT} allowed in this session)"

    s = Session(REMOTE, users=True)
    s.ehlo()
    with FailedLogins():
        assert code(s.cmd(wrong)) == [b"535 5.7.8"]
    assert code(s.cmd(PLAIN_OK)) == [b"235 Authentication"]
    assert s.cmd(PLAIN_OK) == [b"503 5.5.1 Already authenticated."]
    assert code(s.cmd(b"MAIL FROM:<a@s.test>")) == [b"250 2.1.0"]


MESSAGE = b"MAIL FROM:<a@s.test>\r\nRCPT TO:<b@r.test>\r\nRCPT TO:<c@r.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"


def test_a_name_chosen_by_the_client_cannot_pose_as_another_address():
    """The client's address comes first, and the name's spaces, quotes and controls are replaced."""
    hostile = "x' from 10.9.9.9 (1 of 3)\n"
    s = Session(REMOTE, users=True)
    s.ehlo()
    with FailedLogins() as logged:
        s.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0" + hostile.encode() + b"\0guess"))
    assert logged == ["AUTH failed from 192.0.2.7: user 'x??from?10.9.9.9?(1?of?3)?' (1 of 3 allowed in this session)"]


def test_a_queued_message_is_logged_once_committed():
    """One line per queued message, when its commit ends: queue id, sender, stored size, recipients, client."""
    s = Session(spool=Spool(hold=True))
    lines: list[str] = []
    s.proto.settings.log_line = lines.append
    s.ehlo()
    assert s.send(MESSAGE)[-1].startswith(b"354")
    assert lines == [], "nothing logged before the commit"
    s.spool.release()
    assert code(s.replies())[-1] == b"250 2.0.0"
    [stored] = s.spool.messages
    assert lines == [f"Q0: from=<a@s.test>, size={len(stored.data)}, nrcpt=2, client=127.0.0.1"]
    s.spool.hold = False
    assert code(s.send(MESSAGE.replace(b"hi\r\n", b"x" * 999 + b"\r\n")))[-1] == b"501 5.6.0"
    assert len(lines) == 1, "a refused message is not logged"


def test_the_line_names_the_authenticated_user_and_a_failing_log_does_not_cost_the_250():
    s = Session(REMOTE, users=True)
    lines: list[str] = []
    s.proto.settings.log_line = lines.append
    s.ehlo()
    assert code(s.cmd(PLAIN_OK)) == [b"235 Authentication"]
    assert code(s.send(MESSAGE))[-1] == b"250 2.0.0"
    assert lines[0].endswith(", nrcpt=2, client=192.0.2.7, sasl_username=alice"), lines

    def broken(line):
        raise OSError("log gone")

    s.proto.settings.log_line = broken
    assert code(s.send(MESSAGE))[-1] == b"250 2.0.0"
    assert len(s.spool.messages) == 2
