"""The listener's MAIL and RCPT replies for malformed commands (no sockets)."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from relay.submission import GroupCommitter, SubmissionFactory, _Settings


class NoSpool:
    def enqueue(self, messages, now):
        return defer.succeed([])


def replies(*commands: bytes) -> list[bytes]:
    """The reply lines (code and enhanced status) to EHLO then ``commands``."""
    settings = _Settings(hostname="relay.test", max_size=1000,
                         committer=GroupCommitter(NoSpool(), task.Clock()), requires_auth=False)
    proto = SubmissionFactory(settings, None).buildProtocol(None)
    proto.callLater = task.Clock().callLater
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4321))
    proto.makeConnection(transport)
    for command in (b"EHLO c.test",) + commands:
        proto.dataReceived(command + b"\r\n")
    lines = [line for line in transport.value().split(b"\r\n") if line[3:4] == b" "]
    return [b" ".join(line.split(b" ")[:2]) for line in lines[2:]]   # after 220 and EHLO


@pytest.mark.parametrize("command, reply", [
    (b"MAIL FROM:a@s.test", b"501 5.5.2"),                 # no angle brackets
    (b"MAIL FROM:<a@s.test> SIZE", b"501 5.5.4"),          # SIZE without a number
    (b"MAIL FROM:<a@s.test> SIZE=2000", b"552 5.3.4"),     # over the limit
    (b"MAIL FROM:<a@s.test> BODY=BINARYMIME", b"501 5.5.4"),
    (b"MAIL FROM:<a@s.test> FOO=bar", b"555 5.5.4"),
    ("MAIL FROM:<é@s.test>".encode(), b"553 5.6.7"),
    (b"MAIL FROM:<a b@s.test>", b"553 5.1.7"),
    (b"MAIL FROM:<a@s.test> AUTH=<>", b"250 2.1.0"),
])
def test_mail_replies(command, reply):
    assert replies(command) == [reply]


@pytest.mark.parametrize("command, reply", [
    (b"RCPT TO:r@d.test", b"501 5.5.2"),
    (b"RCPT TO:<r@d.test> NOTIFY=NEVER", b"555 5.5.4"),
    ("RCPT TO:<ü@d.test>".encode(), b"553 5.6.7"),
    (b"RCPT TO:<r@>", b"553 5.1.3"),
    (b"RCPT TO:<r@d.test>", b"250 2.1.5"),
])
def test_rcpt_replies(command, reply):
    assert replies(b"MAIL FROM:<a@s.test>", command) == [b"250 2.1.0", reply]


def test_rcpt_before_mail_is_503():
    assert replies(b"RCPT TO:<r@d.test>") == [b"503 5.5.1"]
