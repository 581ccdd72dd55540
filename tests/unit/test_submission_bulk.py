"""The submission listener's bulk DATA path (SubmissionProtocol.dataReceived)
must store exactly what Twisted's line-by-line path stores, however the input
is cut into chunks: dot unstuffing, the blank line before a body without
headers, SIZE, long lines, and commands pipelined after the final dot."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.mail import smtp

from relay.submission import GroupCommitter, SubmissionFactory, SubmissionProtocol, _Settings


class FakeSpool:
    def __init__(self):
        self.messages = []

    def enqueue(self, messages, now):
        self.messages.extend(messages)
        return defer.succeed([f"Q{len(self.messages) - len(messages) + i}" for i in range(len(messages))])


class LineByLine(SubmissionProtocol):
    """The reference: Twisted's own line splitting for everything."""

    dataReceived = smtp.ESMTP.dataReceived


def session(proto_class, chunks, max_size=10_000):
    spool = FakeSpool()
    settings = _Settings(hostname="relay.test", max_size=max_size,
                         committer=GroupCommitter(spool, task.Clock()), requires_auth=False)
    factory = SubmissionFactory(settings, None)
    proto = factory.buildProtocol(None)
    proto.__class__ = proto_class
    proto.callLater = task.Clock().callLater   # the idle timeout must not land on the global reactor
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4321))
    proto.makeConnection(transport)
    for chunk in chunks:
        proto.dataReceived(chunk)
    replies = [line.split(b" ", 1)[0][:3] for line in transport.value().split(b"\r\n") if line[3:4] == b" "]
    # the Received: field has the time in it: compare what follows it
    data = [m.data[m.data.index(b"\r\n", m.data.index(b";\r\n\t") + 4) + 2:] for m in spool.messages]
    return replies, data, spool, transport


ENVELOPE = b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@r.test>\r\nDATA\r\n"
BODIES = {
    "headers": b"Subject: hi\r\nFrom: a@s.test\r\n\r\nline one\r\nline two\r\n",
    "dots": b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\n.x\r\nend\r\n",
    "no headers": b"just a body line\r\nand another\r\n",
    "blank first": b"\r\nbody after a blank line\r\n",
    "too big": b"Subject: big\r\n\r\n" + b"y" * 70 + b"\r\n",
}


def cut(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] if size else [data]


@pytest.mark.parametrize("name", sorted(BODIES))
@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 64])
def test_bulk_path_stores_what_the_line_path_stores(name, size):
    wire = ENVELOPE + BODIES[name] + b".\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<c@r.test>\r\nDATA\r\n" \
        + b"Subject: second\r\n\r\nsecond\r\n.\r\nQUIT\r\n"
    max_size = 60 if name == "too big" else 10_000
    want = session(LineByLine, [wire], max_size)[:2]
    got = session(SubmissionProtocol, cut(wire, size), max_size)[:2]
    assert got == want
    assert want[0][-1] == b"221"
    if name == "too big":
        assert b"552" in want[0]


def test_a_line_over_the_limit_still_closes():
    """A data line longer than MAX_LENGTH gets 501 5.6.0 (SPEC "Content") and the connection is closed."""
    wire = ENVELOPE + b"Subject: x\r\n\r\n" + b"z" * (SubmissionProtocol.MAX_LENGTH + 10) + b"\r\n.\r\n"
    for proto_class in (LineByLine, SubmissionProtocol):
        replies, data, _, transport = session(proto_class, [wire])
        assert replies[-1] == b"501" and data == []
        assert transport.disconnecting


def test_the_received_field_names_this_relay_and_the_client():
    replies, _, spool, _ = session(SubmissionProtocol, [ENVELOPE + BODIES["headers"] + b".\r\nQUIT\r\n"])
    assert replies[-2:] == [b"250", b"221"]
    assert spool.messages[0].data.startswith(
        b"Received: from c.test ([127.0.0.1])\r\n\tby relay.test (relay) with ESMTP\r\n\tfor <b@r.test>;\r\n\t")
