"""Twisted fakes for one submission-listener session (no sockets, no
handshake), shared by the listener's unit tests."""

from __future__ import annotations

import base64

from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relay.submission import GroupCommitter, SubmissionFactory, SubmissionRealm, UsersChecker, _Settings

REMOTE = IPv4Address("TCP", "192.0.2.7", 4321)     # a peer address only: nothing connects to it
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 4321)
#: The one user of sessions with users: alice / s3cret.
USERS = {"alice": "s3cret"}
#: AUTH PLAIN as alice (initial response).
PLAIN_OK = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret")
#: Stands in for the listener's CertificateOptions: the fake transport only records it.
CONTEXT = object()


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can "start TLS": it records when (how many
    bytes had been written) and with what; nothing is encrypted."""

    tls_at: int | None = None
    tls_context = None

    def startTLS(self, contextFactory, normal=True):
        assert self.tls_at is None, "startTLS called twice"
        self.tls_at = len(self.value())
        self.tls_context = contextFactory


class Spool:
    """Queues at once, or (``hold``) when ``release()`` is called."""

    def __init__(self, hold: bool = False):
        self.messages = []
        self.hold = hold
        self.waiting: list[tuple[list, defer.Deferred]] = []

    def enqueue(self, messages, now):
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((messages, d))
        if not self.hold:
            self.release()
        return d

    def release(self):
        waiting, self.waiting = self.waiting, []
        for messages, d in waiting:
            self.messages.extend(messages)
            d.callback([f"Q{len(self.messages) - len(messages) + i}" for i in range(len(messages))])


class Session:
    """One listener session over a fake transport: from ``peer``, with TLS
    configured or not, with :data:`USERS` or none, onto ``spool``."""

    def __init__(self, peer=LOOPBACK, *, tls: bool = False, users: bool = False, spool: Spool | None = None,
                 settings: _Settings | None = None):
        self.spool = spool or Spool()
        if settings is None:       # else a listener shared with other sessions (its committer has its spool)
            settings = _Settings(hostname="relay.test", max_size=10_000,
                                 committer=GroupCommitter(self.spool, task.Clock()),
                                 requires_auth=users, tls=CONTEXT if tls else None)
        portal = Portal(SubmissionRealm(settings), [UsersChecker(USERS)]) if users else None
        self.proto = SubmissionFactory(settings, portal).buildProtocol(peer)
        self.proto.callLater = task.Clock().callLater   # the idle timeout must not land on the global reactor
        self.transport = TLSStringTransport(peerAddress=peer)
        self.proto.makeConnection(self.transport)
        self.seen = len(self.transport.value())           # the greeting

    def send(self, data: bytes) -> list[bytes]:
        """Feed ``data`` (one read); the complete replies written meanwhile, one bytes per reply."""
        self.proto.dataReceived(data)
        return self.replies()

    def cmd(self, line: bytes) -> list[bytes]:
        return self.send(line + b"\r\n")

    def hang_up(self) -> None:
        """The client closes the connection."""
        self.transport.loseConnection()
        self.proto.connectionLost(None)

    def replies(self) -> list[bytes]:
        out = self.transport.value()[self.seen:]
        self.seen = len(self.transport.value())
        replies, current = [], []
        for line in out.split(b"\r\n")[:-1]:
            current.append(line)
            if line[3:4] == b" ":
                replies.append(b"\r\n".join(current))
                current = []
        assert not current, out
        return replies

    def ehlo(self) -> set[bytes]:
        """EHLO; the keywords it offered."""
        [reply] = self.cmd(b"EHLO client.test")
        assert reply.startswith(b"250-relay.test Hello"), reply
        return {line[4:].split(b" ")[0] for line in reply.split(b"\r\n")[1:]}


def code(replies: list[bytes]) -> list[bytes]:
    """The code and enhanced status of each reply (its last line)."""
    return [b" ".join(r.split(b"\r\n")[-1].split(b" ")[:2]) for r in replies]
