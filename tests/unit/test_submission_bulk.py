"""The submission listener's bulk DATA path (SubmissionProtocol.dataReceived)
must store exactly what Twisted's line-by-line path stores, however the input
is cut into chunks: dot unstuffing, the blank line before a body without
headers, SIZE, long lines, and commands pipelined after the final dot."""

from __future__ import annotations

import random

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.mail import smtp

from relay.submission import GroupCommitter, SubmissionFactory, SubmissionProtocol, _Settings, drop_long_lines


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


LONG = b"z" * (SubmissionProtocol.MAX_LENGTH + 10)
SECOND = b"MAIL FROM:<a@s.test>\r\nRCPT TO:<c@r.test>\r\nDATA\r\nSubject: second\r\n\r\nsecond\r\n.\r\nQUIT\r\n"
LONG_BODIES = {
    "one long line": b"Subject: x\r\n\r\n" + LONG + b"\r\nafter\r\n",
    "long line last": b"Subject: x\r\n\r\nbefore\r\n" + LONG + b"\r\n",
    "two long lines": b"Subject: x\r\n\r\n" + LONG + b"\r\n" + LONG + b"\r\n.x\r\n",
    # a long line with a dot and a command past the limit, and bare CR and LF
    "dot and command inside": b"Subject: x\r\n\r\n" + b"q" * 16384 + b".\rRSET\n" + b"w" * 16390 + b"\r\n",
    "bare LF dot inside": b"Subject: x\r\n\r\n" + LONG + b"\n.\r\nQUIT\r\n" + LONG + b"\r\n",
}


@pytest.mark.parametrize("name", sorted(LONG_BODIES))
@pytest.mark.parametrize("size", [0, 1, 7, 4096, 16385, 65536])
def test_a_data_line_over_the_limit_fails_its_message_and_the_session_goes_on(name, size):
    """A data line longer than MAX_LENGTH (where Twisted drops the connection)
    is read to its end: the message gets 501 5.6.0 after its final dot (SPEC
    "Content"), nothing of it is queued, and the next one in the session is."""
    after_354 = LONG_BODIES[name] + b".\r\n" + SECOND
    replies, data, _, transport = session(SubmissionProtocol, [ENVELOPE] + cut(after_354, size), max_size=1_000_000)
    assert replies == [b"220", b"250", b"250", b"250", b"354", b"501", b"250", b"250", b"354", b"250", b"221"]
    assert b"501 5.6.0 A line of the message is longer than 998 octets" in transport.value()
    assert data == [b"Subject: second\r\n\r\nsecond\r\n"]


def test_a_long_line_after_an_oversize_message_keeps_the_552():
    body = b"Subject: big\r\n\r\n" + b"y" * 70 + b"\r\n" + LONG + b"\r\n"
    replies, data, _, _ = session(SubmissionProtocol, [ENVELOPE] + cut(body + b".\r\n" + SECOND, 1000), max_size=60)
    assert replies[5:] == [b"552", b"250", b"250", b"354", b"250", b"221"]
    assert data == [b"Subject: second\r\n\r\nsecond\r\n"]


def test_a_command_line_over_the_limit_still_closes():
    """Where a command line over MAX_LENGTH ends is guesswork: 500 and close."""
    replies, data, _, transport = session(SubmissionProtocol, [b"EHLO c.test\r\nNOOP " + LONG + b"\r\nQUIT\r\n"])
    assert replies[-1] == b"500" and transport.disconnecting


class ShortLines(SubmissionProtocol):
    """The listener with a 24-octet line limit, so that random data crosses it
    often (and the session's commands, with a CR cut from its LF, do not)."""

    MAX_LENGTH = 24


@pytest.mark.parametrize("seed", range(60))
def test_long_lines_are_handled_the_same_however_the_data_is_cut(seed):
    """The listener's own path, cut anywhere (also between CR and LF): the same
    replies and queued data as in one read; a message with a line over the
    limit gets the 501 and the next message in the session is queued."""
    rng = random.Random(seed)
    limit = ShortLines.MAX_LENGTH
    lines = [rng.choice([b"", b"..", b"x" * rng.randrange(60), b"a\rb", b"\r" * 25, b"y" * 25])
             for _ in range(rng.randrange(1, 12))]
    after_354 = b"Subject: x\r\n\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n" + SECOND
    whole = session(ShortLines, [ENVELOPE, after_354], max_size=100_000)
    points = sorted(rng.sample(range(1, len(after_354)), rng.randrange(1, 8)))
    chunks = [after_354[a:b] for a, b in zip([0] + points, points + [len(after_354)])]
    cut_up = session(ShortLines, [ENVELOPE] + chunks, max_size=100_000)
    assert cut_up[:2] == whole[:2]
    replies, data = whole[:2]
    if any(len(line) > limit for line in lines):
        assert replies[5] == b"501" and b"5.6.0 A line of the message is longer than" in whole[3].value()
        assert data == [b"Subject: second\r\n\r\nsecond\r\n"]
    assert replies[-4:] == [b"250", b"354", b"250", b"221"]


def test_drop_long_lines_takes_out_only_data_lines_over_the_limit():
    lines = [b"", b"..", b"x" * 30, b"a\rb", b"\r" * 25, b"short"]
    tail = b".\r\n" + b"t" * 30 + b"\r\nQUIT\r\n"
    text = b"".join(line + b"\r\n" for line in lines) + tail
    want = b"".join(line + b"\r\n" for line in lines if len(line) <= 20) + tail
    assert drop_long_lines(text, False, 20) == (want, b"", False, True)


def test_drop_long_lines_reports_what_it_did():
    assert drop_long_lines(b"short\r\nlines\r\n", False, 10) == (b"short\r\nlines\r\n", b"", False, False)
    assert drop_long_lines(b"ok\r\n" + b"x" * 11 + b"\r\nok2", False, 10) == (b"ok\r\nok2", b"", False, True)
    # the read ends inside a long line: whole lines only, and the CR that may start its CRLF
    assert drop_long_lines(b"ok\r\n" + b"x" * 11 + b"\r", False, 10) == (b"ok\r\n", b"\r", True, True)
    assert drop_long_lines(b"\nnext", True, 10) == (b"", b"", True, True)     # a bare LF ends no line
    assert drop_long_lines(b"\r\nnext", True, 10) == (b"next", b"", False, True)
    assert drop_long_lines(b"more of it", True, 10) == (b"", b"", True, True)
    # after the final dot nothing is data: a long command line is not taken out here
    assert drop_long_lines(b".\r\n" + b"c" * 11, False, 10) == (b".\r\n" + b"c" * 11, b"", False, False)


def test_the_received_field_names_this_relay_and_the_client():
    replies, _, spool, _ = session(SubmissionProtocol, [ENVELOPE + BODIES["headers"] + b".\r\nQUIT\r\n"])
    assert replies[-2:] == [b"250", b"221"]
    assert spool.messages[0].data.startswith(
        b"Received: from c.test ([127.0.0.1])\r\n\tby relay.test (relay) with ESMTP\r\n\tfor <b@r.test>;\r\n\t")
