"""relay.smtpclient against real peers on 127.0.0.1.

Peers: an aiosmtpd ``Controller`` (its own thread and asyncio loop) with a
scripted handler, Twisted's own ESMTP server with a cred portal (AUTH), and
tiny raw Twisted servers for greeting-421, tarpit and STARTTLS injection.
TLS certificates (a test CA and a leaf for mx.example.test) are generated at
import time with ``cryptography``.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl as stdlib_ssl
import tempfile
import time

from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.mail import smtp
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.protocols import basic, policies
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from relay.model import ClaimedMessage, ClaimedRecipient, Envelope
from relay.smtpclient import open_session

MX = "mx.example.test"


# -- certificates ------------------------------------------------------------


def _make_certificates() -> dict[str, bytes]:
    """A test CA and a leaf certificate for MX signed by it (PEM)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MX)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(MX)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca": ca.public_bytes(pem),
        "cert": leaf.public_bytes(pem),
        "key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }


CERTS = _make_certificates()


def server_ssl_context() -> stdlib_ssl.SSLContext:
    """A stdlib server context (for aiosmtpd) with the MX leaf certificate."""
    ctx = stdlib_ssl.create_default_context(stdlib_ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert, "wb") as f:
            f.write(CERTS["cert"])
        with open(key, "wb") as f:
            f.write(CERTS["key"])
        ctx.load_cert_chain(cert, key)
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Twisted server TLS with the MX leaf certificate (built from
    cryptography objects: pyOpenSSL X509/PKey objects are deprecated)."""

    def __init__(self):
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate(x509.load_pem_x509_certificate(CERTS["cert"]))
        context.use_privatekey(serialization.load_pem_private_key(CERTS["key"], None))
        self._context = context

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self._context, None)


def ca_trust_root():
    return ssl.Certificate.loadPEM(CERTS["ca"])


# -- envelopes and sessions ----------------------------------------------------


def envelope(rcpts=("a@b.test",), *, sender="s@a.test", data=b"Subject: t\r\n\r\nhello\r\n", mid="m1"):
    """An envelope as the drain builds it from a claim."""
    recipients = tuple(
        ClaimedRecipient(id=i, message_id=mid, address=a, domain=a.rsplit("@", 1)[1], attempts=0, queued_at=0.0)
        for i, a in enumerate(rcpts, 1)
    )
    message = ClaimedMessage(id=mid, sender=sender, data=data, size=len(data), eight_bit=not data.isascii(),
                             created_at=0.0, recipients=recipients)
    return Envelope(message=message, recipients=recipients)


def body_with_dot_lines(offsets, total):
    """CRLF data of short lines (≤ 80 octets) with a '.'-leading line at each offset."""
    out = bytearray()
    for n, offset in enumerate(offsets):
        while offset - len(out) > 82:
            out += b"x" * 78 + b"\r\n"
        gap = offset - len(out)
        if gap:
            assert gap >= 2
            out += b"y" * (gap - 2) + b"\r\n"
        out += b".\r\n" if n % 2 else b".dot line %d\r\n" % n
    while len(out) < total:
        out += b"z" * 78 + b"\r\n"
    data = bytes(out)
    assert all(data[o:o + 1] == b"." and (o == 0 or data[o - 2:o] == b"\r\n") for o in offsets)
    return data


class Run:
    """The drain's side of one session: a queue of envelopes and the results."""

    def __init__(self, envelopes):
        self.queue = list(envelopes)
        self.results = []
        self.pulls = 0

    def next_envelope(self):
        self.pulls += 1
        return self.queue.pop(0) if self.queue else None

    def on_result(self, env, results):
        self.results.append((env, results))


def session(port, envelopes=(), **overrides):
    """Run one session to 127.0.0.1:port; fires with (SessionEnd, Run)."""
    run = Run(envelopes)
    kwargs = dict(address="127.0.0.1", port=port, host_name=MX, ehlo="relay.test", tls="none",
                  connect_timeout=5.0, command_timeout=5.0)
    kwargs.update(overrides)
    d = open_session(reactor, next_envelope=run.next_envelope, on_result=run.on_result, **kwargs)
    return d.addCallback(lambda end: (end, run))


def first_difference(got: list[bytes], want: list[bytes]) -> str | None:
    """Where two lists of large byte strings first differ (None if equal);
    cheaper and clearer than assertEqual's diff of 100 KiB values."""
    if len(got) != len(want):
        return f"{len(got)} items instead of {len(want)}"
    for n, (a, b) in enumerate(zip(got, want)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"item {n} differs at offset {at}: {a[at - 20:at + 20]!r} != {b[at - 20:at + 20]!r}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- peers -----------------------------------------------------------------------


class ScriptedHandler:
    """aiosmtpd handler: recipients decide their fate by their local part."""

    def __init__(self):
        self.peers = set()
        self.mail_options = []
        self.messages = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.peers.add(session.peer)
        self.mail_options.append(mail_options)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("temp"):
            return "450 4.2.0 temp"
        if address.startswith("perm"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if any(r.startswith("drop") for r in envelope.rcpt_tos):
            server.transport.close()  # closes after the final dot, before any reply
            return "250 never seen"
        self.messages.append({
            "from": envelope.mail_from, "to": list(envelope.rcpt_tos),
            "data": envelope.original_content, "tls": session.ssl is not None,
        })
        return "250 2.0.0 queued"


class TrackedServer:
    """A Twisted listening port whose connections are all closed at cleanup."""

    def __init__(self, test: TestCase, factory: protocol.Factory):
        self.wrapper = policies.WrappingFactory(factory)
        self.port = reactor.listenTCP(0, self.wrapper, interface="127.0.0.1")
        self.number = self.port.getHost().port
        test.addCleanup(self.close)

    @defer.inlineCallbacks
    def close(self):
        yield self.port.stopListening()
        for proto in list(self.wrapper.protocols):
            proto.transport.abortConnection()
        for _ in range(200):
            if not self.wrapper.protocols:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)


class Greet421(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"421 4.3.2 mx.example.test busy, go away\r\n")
        self.transport.loseConnection()


class Tarpit(protocol.Protocol):
    """Accepts TCP and never says a word."""


class InjectingServer(basic.LineReceiver):
    """Answers STARTTLS with '220 go ahead' and a forged '250 fake' in one write."""

    def connectionMade(self):
        self.tls = False
        self.in_data = False
        self.sendLine(b"220 raw.test ESMTP")

    def lineReceived(self, line):
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.sendLine(b"250 2.0.0 queued")
            return
        self.factory.log.append((self.tls, line))
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            self.transport.write(b"250-raw.test\r\n250 SIZE 100000\r\n" if self.tls
                                 else b"250-raw.test\r\n250 STARTTLS\r\n")
        elif verb == b"STARTTLS":
            self.transport.write(b"220 go ahead\r\n250 fake\r\n")
            self.transport.startTLS(ServerTLS())
            self.tls = True
        elif verb == b"DATA":
            self.in_data = True
            self.sendLine(b"354 go")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 ok")


@implementer(smtp.IMessage)
class InboxMessage:
    def __init__(self, inbox):
        self.inbox = inbox
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        self.inbox.append(b"\n".join(self.lines))
        return defer.succeed(None)

    def connectionLost(self):
        self.lines = []


@implementer(smtp.IMessageDelivery)
class InboxDelivery:
    def __init__(self, inbox):
        self.inbox = inbox

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return lambda: InboxMessage(self.inbox)


@implementer(IRealm)
class InboxRealm:
    def __init__(self, inbox):
        self.inbox = inbox

    def requestAvatar(self, avatarId, mind, *interfaces):
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, InboxDelivery(self.inbox), lambda: None
        raise NotImplementedError()


class AuthSMTPFactory(smtp.SMTPFactory):
    """Twisted's ESMTP server with AUTH PLAIN/LOGIN through a cred portal."""

    protocol = smtp.ESMTP
    domain = b"auth.test"

    def buildProtocol(self, addr):
        p = smtp.SMTPFactory.buildProtocol(self, addr)
        p.challengers = {b"LOGIN": LOGINCredentials, b"PLAIN": PLAINCredentials}
        return p


# -- tests -------------------------------------------------------------------------


class AiosmtpdPeerTests(TestCase):
    """Delivery to an aiosmtpd peer."""

    def start_peer(self, **kwargs) -> ScriptedHandler:
        handler = ScriptedHandler()
        controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **kwargs)
        controller.start()
        self.addCleanup(controller.stop)
        self.port = controller.port
        return handler

    @defer.inlineCallbacks
    def test_two_messages_over_one_connection(self):
        """Two envelopes travel over a single connection, each with its own transaction."""
        handler = self.start_peer()
        end, run = yield session(self.port, [envelope(mid="m1"), envelope(("b@b.test",), mid="m2")])
        self.assertEqual(len(handler.peers), 1)
        self.assertEqual([m["to"] for m in handler.messages], [["a@b.test"], ["b@b.test"]])
        self.assertEqual((end.host_failure, end.envelopes, end.transactions), (None, 2, 2))
        self.assertEqual([[r.code for r in res] for _, res in run.results], [[250], [250]])

    @defer.inlineCallbacks
    def test_three_recipients_in_one_transaction(self):
        """Three accepted recipients share one DATA; refused ones keep their RCPT replies."""
        handler = self.start_peer()
        rcpts = ("a@b.test", "temp@b.test", "c@b.test", "perm@b.test", "d@b.test")
        end, run = yield session(self.port, [envelope(rcpts)])
        self.assertEqual(len(handler.messages), 1)
        self.assertEqual(handler.messages[0]["to"], ["a@b.test", "c@b.test", "d@b.test"])
        results = run.results[0][1]
        self.assertEqual([r.code for r in results], [250, 450, 250, 550, 250])
        self.assertEqual(results[0].text, "2.0.0 queued")
        self.assertEqual(results[3].text, "5.1.1 no such user")

    @defer.inlineCallbacks
    def test_dot_lines_arrive_byte_identical(self):
        """Bodies with '.' lines at 0 and at 16 KiB boundaries (one write and chunked) arrive unchanged."""
        handler = self.start_peer()
        small = body_with_dot_lines([0, 16384, 32768], 40000)
        large = body_with_dot_lines([0, 16384, 32768, 65536, 81920, 98304], 120000)
        end, run = yield session(self.port, [envelope(data=small, mid="m1"), envelope(data=large, mid="m2")])
        self.assertIsNone(first_difference([m["data"] for m in handler.messages], [small, large]))
        self.assertEqual(end.transactions, 2)

    @defer.inlineCallbacks
    def test_8bitmime_and_smtputf8_parameters(self):
        """The peer sees SIZE, BODY=8BITMIME and SMTPUTF8, and gets the UTF-8 recipient."""
        handler = self.start_peer()
        data = "Subject: café\r\n\r\nnaïve\r\n".encode()
        end, run = yield session(self.port, [envelope(("ü@b.test",), data=data)])
        self.assertEqual(handler.mail_options, [[f"SIZE={len(data)}", "BODY=8BITMIME", "SMTPUTF8"]])
        self.assertEqual(handler.messages[0]["to"], ["ü@b.test"])
        self.assertEqual(handler.messages[0]["data"], data)
        self.assertEqual(run.results[0][1][0].code, 250)

    @defer.inlineCallbacks
    def test_peer_closing_after_the_dot_is_a_possible_duplicate(self):
        """A peer that closes after the final dot leaves the recipients deferred as possible duplicates."""
        self.start_peer()
        end, run = yield session(self.port, [envelope(("drop@b.test", "perm@b.test")), envelope(mid="m2")])
        results = run.results[0][1]
        self.assertEqual([(r.code, r.possible_duplicate) for r in results], [(451, True), (550, False)])
        self.assertTrue(results[0].text.startswith("4.4.2 "))
        self.assertEqual(run.pulls, 1)
        self.assertIsNone(end.host_failure)

    @defer.inlineCallbacks
    def test_opportunistic_starttls(self):
        """Opportunistic mode upgrades to TLS without checking the certificate and delivers."""
        handler = self.start_peer(tls_context=server_ssl_context())
        end, run = yield session(self.port, [envelope()], tls="opportunistic", host_name="other.name.test")
        self.assertTrue(end.tls)
        self.assertEqual([m["tls"] for m in handler.messages], [True])

    @defer.inlineCallbacks
    def test_required_tls_with_the_right_trust_root(self):
        """Required mode verifies the certificate for the MX name against the given trust root and delivers."""
        handler = self.start_peer(tls_context=server_ssl_context())
        end, run = yield session(self.port, [envelope()], tls="required", trust_root=ca_trust_root())
        self.assertTrue(end.tls)
        self.assertEqual(len(handler.messages), 1)
        self.assertEqual(run.results[0][1][0].code, 250)

    @defer.inlineCallbacks
    def test_required_tls_with_platform_trust_honours_ssl_cert_file(self):
        """Without a trust_root, required mode uses the platform store, which SSL_CERT_FILE points at."""
        handler = self.start_peer(tls_context=server_ssl_context())
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        ca_file = os.path.join(tmp.name, "ca.pem")
        with open(ca_file, "wb") as f:
            f.write(CERTS["ca"])
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = ca_file
        self.addCleanup(lambda: os.environ.pop("SSL_CERT_FILE") if old is None
                        else os.environ.__setitem__("SSL_CERT_FILE", old))
        end, run = yield session(self.port, [envelope()], tls="required")
        self.assertIsNone(end.host_failure)
        self.assertTrue(end.tls)
        self.assertEqual(len(handler.messages), 1)

    @defer.inlineCallbacks
    def test_required_tls_with_the_wrong_name(self):
        """A certificate that does not match the MX name is a 4.7.5 host failure and nothing is sent."""
        handler = self.start_peer(tls_context=server_ssl_context())
        end, run = yield session(self.port, [envelope()], tls="required", trust_root=ca_trust_root(),
                                 host_name="wrong.example.test")
        self.assertEqual((end.host_failure.code, end.host_failure.try_next_host), (454, True))
        self.assertTrue(end.host_failure.text.startswith("4.7.5 TLS with wrong.example.test"))
        self.assertEqual((run.pulls, handler.mail_options, handler.messages), (0, [], []))

    @defer.inlineCallbacks
    def test_required_tls_without_starttls(self):
        """A peer that does not offer STARTTLS is a 4.7.5 host failure in required mode."""
        handler = self.start_peer()
        end, run = yield session(self.port, [envelope()], tls="required", trust_root=ca_trust_root())
        self.assertTrue(end.host_failure.text.startswith("4.7.5 "))
        self.assertEqual((run.pulls, handler.mail_options), (0, []))


class RawPeerTests(TestCase):
    """Misbehaving peers built from a few lines of Twisted."""

    @defer.inlineCallbacks
    def test_connection_refused(self):
        """Nothing listening is a 4.4.1 host failure that tries the next host."""
        end, run = yield session(free_port(), [envelope()])
        self.assertEqual((end.host_failure.code, end.host_failure.try_next_host), (421, True))
        self.assertTrue(end.host_failure.text.startswith("4.4.1 Connection refused"))
        self.assertEqual(run.pulls, 0)

    @defer.inlineCallbacks
    def test_greeting_421(self):
        """A 421 greeting is a host failure carrying the greeting, and nothing is pulled."""
        server = TrackedServer(self, protocol.Factory.forProtocol(Greet421))
        end, run = yield session(server.number, [envelope()])
        self.assertEqual((end.host_failure.code, end.host_failure.try_next_host), (421, True))
        self.assertIn("busy, go away", end.host_failure.text)
        self.assertEqual(run.pulls, 0)

    @defer.inlineCallbacks
    def test_tarpit(self):
        """A peer that accepts TCP and never greets fails within connect_timeout."""
        server = TrackedServer(self, protocol.Factory.forProtocol(Tarpit))
        started = time.monotonic()
        end, run = yield session(server.number, [envelope()], connect_timeout=0.5)
        elapsed = time.monotonic() - started
        self.assertTrue(end.host_failure.text.startswith("4.4.1 No greeting"))
        self.assertTrue(end.host_failure.try_next_host)
        self.assertTrue(0.4 < elapsed < 3.0, elapsed)
        self.assertEqual(run.pulls, 0)

    @defer.inlineCallbacks
    def test_starttls_response_injection(self):
        """A '250 fake' sent with the STARTTLS '220' is discarded; the EHLO answer comes over TLS."""
        factory = protocol.Factory.forProtocol(InjectingServer)
        factory.log = []
        server = TrackedServer(self, factory)
        data = b"Subject: t\r\n\r\nhi\r\n"
        end, run = yield session(server.number, [envelope(data=data)], tls="opportunistic")
        self.assertTrue(end.tls)
        self.assertEqual(end.extensions, {"SIZE": "100000"})
        self.assertEqual(factory.log, [
            (False, b"EHLO relay.test"),
            (False, b"STARTTLS"),
            (True, b"EHLO relay.test"),
            (True, b"MAIL FROM:<s@a.test> SIZE=%d" % len(data)),
            (True, b"RCPT TO:<a@b.test>"),
            (True, b"DATA"),
            (True, b"QUIT"),
        ])
        self.assertEqual(run.results[0][1][0].code, 250)


class AuthPeerTests(TestCase):
    """AUTH against Twisted's ESMTP server with a cred portal."""

    def start_peer(self) -> list:
        inbox: list = []
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"guest", b"password")
        portal = Portal(InboxRealm(inbox), [checker])
        self.server = TrackedServer(self, AuthSMTPFactory(portal))
        return inbox

    @defer.inlineCallbacks
    def test_auth_succeeds(self):
        """With the right credentials the session authenticates (plaintext, tls=none) and delivers."""
        inbox = self.start_peer()
        end, run = yield session(self.server.number, [envelope()], credentials=("guest", "password"))
        self.assertIsNone(end.host_failure)
        self.assertTrue(end.authenticated)
        self.assertEqual(run.results[0][1][0].code, 250)
        self.assertEqual(len(inbox), 1)
        self.assertIn(b"hello", inbox[0])

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong password is a temporary host failure and nothing is pulled."""
        inbox = self.start_peer()
        end, run = yield session(self.server.number, [envelope()], credentials=("guest", "nope"))
        self.assertEqual((end.host_failure.code, end.host_failure.try_next_host), (454, False))
        self.assertTrue(end.host_failure.text.startswith("4.7.0 Authentication"))
        self.assertNotIn("nope", end.host_failure.text)
        self.assertEqual((run.pulls, inbox), (0, []))

