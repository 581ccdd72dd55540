"""The submission listener end to end: Python's blocking ``smtplib`` (and raw
sockets) in threads against ``relay.submission`` on a real spool, while the
reactor serves.  Each scenario runs on SQLite (``SubmissionSQLiteTests``) and
PostgreSQL (``SubmissionPostgreSQLTests``); ``SubmissionConfigTests`` needs
no spool.
"""

from __future__ import annotations

import base64
import datetime
import io
import os
import re
import shutil
import smtplib
import socket
import ssl
import sys
import tempfile
import threading
import time

from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from relay.config import Config, Route
from relay.errors import ConfigError, RelayError, SpoolUnavailable
from relay.model import State
from relay.spool import open_spool
from relay.spool.deferred import DeferredSpool
from relay import submission
from relay.submission import OPEN_RELAY, build_submission_service
from relay.tap import build_service
from relay.testing import SMTPPeer, free_port, scratch_pg_url, wait_until

MESSAGE = (b"From: app@sender.test\r\nTo: rcpt@dest.test\r\nSubject: hello\r\n"
           b"Message-ID: <1@sender.test>\r\n\r\nHello.\r\n.leading dot\r\n..two dots\r\n")
QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as (\S+)$")
UTF8_SENDER = "jörg@例え.test"
UTF8_RCPT = "ünïcode@例え.test"
UTF8_MESSAGE = (f"From: Jörg <{UTF8_SENDER}>\r\nTo: {UTF8_RCPT}\r\nSubject: Grüße\r\n"
                f"Message-ID: <2@sender.test>\r\n\r\nHallo, Welt.\r\n").encode()


def scratch_dir(test) -> str:
    """A temporary directory removed after ``test`` (not trial's mktemp, which writes under the cwd)."""
    path = tempfile.mkdtemp(prefix="relay-submission-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def write_self_signed(directory: str, name: str = "relay.test", prefix: str = "") -> tuple[str, str]:
    """A fresh self-signed certificate and its key as PEM files in ``directory``: (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, f"{prefix}cert.pem")
    key_path = os.path.join(directory, f"{prefix}key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def unverified_tls() -> ssl.SSLContext:
    """A client context that does not check the (self-signed) certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


PLAIN_ALICE = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret")


class RawClient:
    """A blocking line-level SMTP client for what smtplib will not send."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: bytes) -> tuple[int, bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class FlakySpool:
    """Wraps a DeferredSpool: counts enqueue transactions, can delay, hold or fail them."""

    def __init__(self, inner: DeferredSpool, delay: float = 0.0):
        self.inner = inner
        self.delay = delay
        self.fail_with: Exception | None = None
        self.calls: list[int] = []
        self.active = 0
        self.peak = 0
        self._held: list[defer.Deferred] | None = None

    def hold(self) -> None:
        """Commits from now on wait for ``release()`` instead of ``delay``."""
        self._held = []

    def release(self) -> None:
        held, self._held = self._held or [], None
        for d in held:
            d.callback(None)

    def enqueue(self, messages, now):
        self.calls.append(len(messages))
        self.active += 1
        self.peak = max(self.peak, self.active)

        def run(_):
            if self.fail_with is not None:
                raise self.fail_with
            return self.inner.enqueue(messages, now)

        def done(result):
            self.active -= 1
            return result

        if self._held is not None:
            wait: defer.Deferred = defer.Deferred()
            self._held.append(wait)
        else:
            wait = task.deferLater(reactor, self.delay, lambda: None)
        return wait.addCallback(run).addBoth(done)


class SubmissionScenarios:
    """The scenarios; subclasses provide ``make_spool_url``."""

    timeout = 30

    def make_spool_url(self) -> str:
        raise NotImplementedError

    def setUp(self):
        self.spool_url = self.make_spool_url()
        self.port = free_port("127.0.0.1")
        self.woken = 0

    def config(self, **overrides) -> Config:
        values = dict(hostname="relay.test", node="node-a", spool_url=self.spool_url,
                      spool_busy_timeout=5.0, submission_listen=f"127.0.0.1:{self.port}",
                      max_message_size=4000, tls="none", poll_interval=0.1, connect_timeout=2.0,
                      command_timeout=5.0, retry_initial=1.0, retry_maximum=4.0)
        values.update(overrides)
        return Config(**values)

    def start_listener(self, wrap=None, **overrides):
        """Open the spool and start the listener alone (stopped at cleanup); returns the service."""
        config = self.config(**overrides)
        self.sync = open_spool(config.spool_url, busy_timeout=5.0, min_free_space=config.min_free_space)
        spool = DeferredSpool(self.sync, reactor, threads=2)
        spool.start()
        self.addCleanup(spool.stop)
        self.wrapped = wrap(spool) if wrap else spool

        def woke():
            self.woken += 1

        svc = build_submission_service(config, self.wrapped, reactor, on_enqueued=woke)
        svc.startService()
        self.addCleanup(svc.stopService)
        self.service = svc
        return svc

    def messages(self) -> int:
        return self.sync.status(time.time()).messages

    def smtp(self) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=10)
        s.ehlo()
        return s

    # -- the SPEC flow -------------------------------------------------

    @defer.inlineCallbacks
    def test_submitted_mail_is_queued_and_delivered(self):
        """smtplib -> listener -> spool (envelope, data, Received) -> relayd -> the peer, byte for byte."""
        peer = SMTPPeer("127.0.0.1").start()
        self.addCleanup(peer.stop)
        # A long poll interval: only the listener's hand-off to the drain gets the mail out quickly.
        config = self.config(poll_interval=60.0, nameservers=(f"127.0.0.1:{free_port()}",),
                             routes={"*": Route(host="127.0.0.1", port=peer.port, tls="none")})
        top = build_service(config, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        yield wait_until(lambda: top.getServiceNamed("submission").running)

        def client():
            s = self.smtp()
            try:
                features = dict(s.esmtp_features)
                s.mail("app@sender.test")
                s.rcpt("rcpt@dest.test")
                return features, s.data(MESSAGE)
            finally:
                s.quit()

        features, (code, text) = yield threads.deferToThread(client)
        self.assertEqual(code, 250, text)
        self.assertEqual(features.get("size"), "4000")
        self.assertIn("8bitmime", features)
        self.assertIn("pipelining", features)
        self.assertNotIn("auth", features)
        qid = QUEUED.match(text).group(1).decode()
        spool = top.drain.spool.spool
        info = spool.show(qid, include_data=True)
        self.assertEqual(info.sender, "app@sender.test")
        self.assertEqual([r.address for r in info.recipients], ["rcpt@dest.test"])
        self.assertTrue(info.data.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test"),
                        info.data[:200])
        self.assertIn(b"\r\n\tfor <rcpt@dest.test>;", info.data)
        self.assertTrue(info.data.endswith(MESSAGE), info.data)   # smtplib stuffed the dots, we unstuffed
        yield wait_until(lambda: peer.log.messages)
        [got] = peer.log.messages
        self.assertEqual((got.sender, got.recipients), ("app@sender.test", ["rcpt@dest.test"]))
        self.assertEqual(got.data, info.data)
        yield wait_until(lambda: spool.show(qid).recipients[0].state == State.DELIVERED)

    # -- SMTPUTF8 (RFC 6531) ---------------------------------------------

    def start_relayd(self, peer: SMTPPeer):
        """relayd (listener and drain) routing every domain to ``peer``; returns its top service."""
        config = self.config(poll_interval=60.0, nameservers=(f"127.0.0.1:{free_port()}",),
                             routes={"*": Route(host="127.0.0.1", port=peer.port, tls="none")})
        top = build_service(config, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        return top

    def send_smtputf8(self, sender: str, recipients: list[str], data: bytes):
        """smtplib's mail(sender, ["SMTPUTF8"]) (what sendmail(..., mail_options=["SMTPUTF8"]) sends; smtplib
        refuses it unless EHLO offered SMTPUTF8), rcpt, data: (EHLO features, RCPT replies, the reply to the dot)."""
        s = self.smtp()
        try:
            features = dict(s.esmtp_features)
            s.mail(sender, ["SMTPUTF8"])
            refused = {r: s.rcpt(r) for r in recipients}
            return features, refused, s.data(data)
        finally:
            s.quit()

    @defer.inlineCallbacks
    def test_smtputf8_submission_queued_and_delivered_intact(self):
        """EHLO offers SMTPUTF8; MAIL FROM:<jörg@例え.test> SMTPUTF8 with a UTF-8 recipient and UTF-8 headers is
        queued with the addresses as sent (no IDNA conversion), and a peer offering SMTPUTF8 gets them intact."""
        peer = SMTPPeer("127.0.0.1").start()          # offers SMTPUTF8
        self.addCleanup(peer.stop)
        top = self.start_relayd(peer)
        yield wait_until(lambda: top.getServiceNamed("submission").running)
        features, rcpts, (code, text) = yield threads.deferToThread(
            self.send_smtputf8, UTF8_SENDER, [UTF8_RCPT], UTF8_MESSAGE)
        self.assertIn("smtputf8", features)
        self.assertIn("8bitmime", features)
        self.assertEqual(rcpts, {UTF8_RCPT: (250, b"2.1.5 Recipient ok")})
        self.assertEqual(code, 250, text)
        qid = QUEUED.match(text).group(1).decode()
        spool = top.drain.spool.spool
        info = spool.show(qid, include_data=True)
        self.assertEqual(info.sender, UTF8_SENDER)
        self.assertEqual([r.address for r in info.recipients], [UTF8_RCPT])
        self.assertEqual(info.subject, "Grüße")
        self.assertIn(f"\tby relay.test (relay) with UTF8SMTP\r\n\tfor <{UTF8_RCPT}>;".encode(), info.data)
        self.assertTrue(info.data.endswith(UTF8_MESSAGE), info.data)
        yield wait_until(lambda: spool.show(qid).recipients[0].state == State.DELIVERED)
        [got] = peer.log.messages
        self.assertEqual((got.sender, got.recipients), (UTF8_SENDER, [UTF8_RCPT]))
        self.assertIn("SMTPUTF8", got.mail_options)
        self.assertEqual(got.data, info.data)

    @defer.inlineCallbacks
    def test_smtputf8_recipient_bounces_5_6_7_at_a_peer_without_smtputf8(self):
        """Submitted with SMTPUTF8, routed to a peer that does not offer it: the ASCII recipient is delivered,
        the UTF-8 one bounces with 553 5.6.7 and the sender gets a DSN saying so."""
        peer = SMTPPeer("127.0.0.1", smtputf8=False).start()
        self.addCleanup(peer.stop)
        top = self.start_relayd(peer)
        yield wait_until(lambda: top.getServiceNamed("submission").running)
        _, rcpts, (code, text) = yield threads.deferToThread(
            self.send_smtputf8, "app@sender.test", [UTF8_RCPT, "rcpt@dest.test"], UTF8_MESSAGE)
        self.assertEqual([c for c, _ in rcpts.values()], [250, 250])
        self.assertEqual(code, 250, text)
        qid = QUEUED.match(text).group(1).decode()
        spool = top.drain.spool.spool
        yield wait_until(lambda: any(m.sender in ("", "<>") for m in peer.log.messages), timeout=15)
        states = {r.address: (r.state, r.history[-1].code) for r in spool.show(qid).recipients}
        self.assertEqual(states, {UTF8_RCPT: (State.BOUNCED, 553), "rcpt@dest.test": (State.DELIVERED, 250)})
        delivered = [m for m in peer.log.messages if m.sender == "app@sender.test"]
        self.assertEqual([m.recipients for m in delivered], [["rcpt@dest.test"]])
        [bounce] = [m for m in peer.log.messages if m.sender in ("", "<>")]
        self.assertEqual(bounce.recipients, ["app@sender.test"])
        self.assertIn(b"Status: 5.6.7", bounce.data)
        self.assertIn(b"Final-Recipient: utf-8; \\x{FC}n\\x{EF}code@\\x{4F8B}\\x{3048}.test", bounce.data)
        self.assertIn(b"does not offer SMTPUTF8", bounce.data)

    # -- AUTH ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_auth_is_required_and_works(self):
        """With users set: no AUTH -> 530 at MAIL, a wrong password -> 535, PLAIN and LOGIN -> 250 and queued."""
        self.start_listener(submission_users={"alice": "s3cret"})

        def client():
            out = {}
            s = self.smtp()
            out["mechanisms"] = s.esmtp_features.get("auth", "").split()
            out["no_auth"] = s.mail("app@sender.test")[0]
            s.quit()
            s = self.smtp()
            try:
                s.login("alice", "wrong")
            except smtplib.SMTPAuthenticationError as e:
                out["wrong"] = e.smtp_code
            out["still_no_mail"] = s.mail("app@sender.test")[0]
            s.quit()
            s = self.smtp()
            out["plain"] = s.auth("PLAIN", lambda challenge=None: "\0alice\0s3cret")[0]
            out["plain_mail"] = s.sendmail("app@sender.test", ["a@dest.test"], MESSAGE)
            s.quit()
            s = self.smtp()
            s.user, s.password = "alice", "s3cret"
            out["login"] = s.auth("LOGIN", s.auth_login)[0]
            out["login_mail"] = s.sendmail("app@sender.test", ["b@dest.test"], MESSAGE)
            s.quit()
            return out

        out = yield threads.deferToThread(client)
        self.assertEqual(sorted(out["mechanisms"]), ["LOGIN", "PLAIN"])
        self.assertEqual(out["no_auth"], 530)
        self.assertEqual(out["wrong"], 535)
        self.assertEqual(out["still_no_mail"], 530)
        self.assertEqual((out["plain"], out["login"]), (235, 235))
        self.assertEqual((out["plain_mail"], out["login_mail"]), ({}, {}))
        self.assertEqual(self.messages(), 2)
        info = self.sync.list_messages()
        self.assertTrue(all(b"with ESMTPA" in self.sync.show(m.id, include_data=True).data for m in info))

    # -- STARTTLS ----------------------------------------------------------

    def start_tls_listener(self, **overrides):
        cert, key = write_self_signed(scratch_dir(self))
        return self.start_listener(submission_users={"alice": "s3cret"}, submission_tls_cert=cert,
                                   submission_tls_key=key, **overrides)

    @defer.inlineCallbacks
    def test_starttls_then_auth_and_send(self):
        """A client not on loopback (simulated): EHLO offers STARTTLS but no AUTH, AUTH/MAIL -> 530;
        after starttls() EHLO offers AUTH, login and send work, and the message is queued "with ESMTPSA"."""
        self.patch(submission, "is_loopback", lambda host: False)
        self.start_tls_listener()

        def client():
            out = {}
            s = self.smtp()
            try:
                out["before"] = dict(s.esmtp_features)
                out["auth_plain"] = s.docmd("AUTH", PLAIN_ALICE[5:].decode())
                out["mail_plain"] = s.mail("app@sender.test")
                out["starttls"] = s.starttls(context=unverified_tls())
                out["tls_version"] = s.sock.version()
                s.ehlo("client.test")
                out["after"] = dict(s.esmtp_features)
                out["login"] = s.login("alice", "s3cret")
                out["refused"] = s.sendmail("app@sender.test", ["rcpt@dest.test"], MESSAGE)
            finally:
                s.quit()
            return out

        out = yield threads.deferToThread(client)
        self.assertIn("starttls", out["before"])
        self.assertNotIn("auth", out["before"])
        self.assertEqual(out["auth_plain"], (530, b"5.7.0 Must issue a STARTTLS command first"))
        self.assertEqual(out["mail_plain"], (530, b"5.7.0 Must issue a STARTTLS command first"))
        self.assertEqual(out["starttls"], (220, b"2.0.0 Ready to start TLS"))
        self.assertIn(out["tls_version"], ("TLSv1.2", "TLSv1.3"))
        self.assertNotIn("starttls", out["after"])
        self.assertEqual(sorted(out["after"]["auth"].split()), ["LOGIN", "PLAIN"])
        self.assertEqual(out["login"][0], 235)
        self.assertEqual(out["refused"], {})
        [m] = self.sync.list_messages()
        info = self.sync.show(m.id, include_data=True)
        self.assertEqual((info.sender, [r.address for r in info.recipients]), ("app@sender.test", ["rcpt@dest.test"]))
        self.assertIn(b"by relay.test (relay) with ESMTPSA", info.data)
        self.assertTrue(info.data.endswith(MESSAGE), info.data)

    @defer.inlineCallbacks
    def test_plaintext_pipelined_after_starttls_is_never_run(self):
        """STARTTLS and MAIL sent in one write (after a plaintext AUTH on loopback): after the handshake the
        first reply is the one to the client's EHLO over TLS; the injected MAIL was never run and the AUTH is forgotten."""
        self.start_tls_listener()

        def client():
            out = {}
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            try:
                plain = sock.makefile("rb")
                out["greeting"] = plain.readline()
                sock.sendall(b"EHLO client.test\r\n" + PLAIN_ALICE + b"\r\n")
                ehlo = [plain.readline()]
                while ehlo[-1][3:4] == b"-":
                    ehlo.append(plain.readline())
                out["plain_ehlo"] = ehlo
                out["auth"] = plain.readline()
                sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@sender.test>\r\n")
                out["220"] = plain.readline()
                tls = unverified_tls().wrap_socket(sock)
                f = tls.makefile("rb")

                def cmd(line: bytes) -> list[bytes]:
                    tls.sendall(line + b"\r\n")
                    reply = [f.readline()]
                    while reply[-1][3:4] == b"-":
                        reply.append(f.readline())
                    return reply

                out["ehlo"] = cmd(b"EHLO client.test")
                out["rcpt"] = cmd(b"RCPT TO:<victim@dest.test>")
                out["mail_unauthenticated"] = cmd(b"MAIL FROM:<app@sender.test>")
                out["auth_tls"] = cmd(PLAIN_ALICE)
                out["mail"] = cmd(b"MAIL FROM:<app@sender.test>")
                out["rcpt_ok"] = cmd(b"RCPT TO:<rcpt@dest.test>")
                out["data"] = cmd(b"DATA")
                out["dot"] = cmd(MESSAGE + b".")
                out["quit"] = cmd(b"QUIT")
                tls.close()
            finally:
                sock.close()
            return out

        out = yield threads.deferToThread(client)
        self.assertTrue(out["greeting"].startswith(b"220 "), out)
        self.assertIn(b"STARTTLS\r\n", [line[4:] for line in out["plain_ehlo"]])
        self.assertTrue(out["auth"].startswith(b"235 "), out)
        self.assertEqual(out["220"], b"220 2.0.0 Ready to start TLS\r\n")
        self.assertTrue(out["ehlo"][0].startswith(b"250-relay.test Hello"), out["ehlo"])
        self.assertNotIn(b"STARTTLS\r\n", [line[4:] for line in out["ehlo"]])
        self.assertEqual(out["rcpt"], [b"503 5.5.1 Need MAIL before RCPT.\r\n"])
        self.assertEqual(out["mail_unauthenticated"], [b"530 5.7.0 Authentication required.\r\n"])
        self.assertTrue(out["auth_tls"][0].startswith(b"235 "), out)
        self.assertEqual([r[0][:3] for r in (out["mail"], out["rcpt_ok"], out["data"], out["dot"], out["quit"])],
                         [b"250", b"250", b"354", b"250", b"221"])
        [m] = self.sync.list_messages()
        self.assertEqual((m.sender, [r.address for r in m.recipients]), ("app@sender.test", ["rcpt@dest.test"]))
        self.assertIn(b"with ESMTPSA", self.sync.show(m.id, include_data=True).data)

    # -- size and content --------------------------------------------------

    @defer.inlineCallbacks
    def test_oversize_refused_with_552(self):
        """SIZE= over the limit -> 552 at MAIL; more data than the limit -> 552 at the dot, nothing queued."""
        self.start_listener(max_message_size=4000)

        def client():
            s = self.smtp()
            try:
                at_mail = s.mail("app@sender.test", ["SIZE=4001"])
                s.rset()
                s.mail("app@sender.test")                  # no SIZE: counted during DATA
                s.rcpt("rcpt@dest.test")
                at_dot = s.data(MESSAGE + b"x" * 70 + b"\r\n" * 50 + (b"y" * 70 + b"\r\n") * 60)
                s.mail("app@sender.test", ["SIZE=3000"])   # the session goes on
                s.rcpt("rcpt@dest.test")
                small = s.data(MESSAGE)
                return at_mail, at_dot, small
            finally:
                s.quit()

        at_mail, at_dot, small = yield threads.deferToThread(client)
        self.assertEqual(at_mail[0], 552, at_mail)
        self.assertTrue(at_mail[1].startswith(b"5.3.4"), at_mail)
        self.assertEqual(at_dot[0], 552, at_dot)
        self.assertEqual(small[0], 250, small)
        self.assertEqual(self.messages(), 1)

    @defer.inlineCallbacks
    def test_bad_content_refused_with_501(self):
        """A line over 998 octets or an empty message -> 501 5.6.0 with the sentence (SPEC "Content":
        SMTP 501 or 553); nothing queued."""
        self.start_listener(max_message_size=100_000)

        def client():
            s = self.smtp()
            try:
                s.mail("app@sender.test")
                s.rcpt("rcpt@dest.test")
                long_line = s.data(b"Subject: x\r\n\r\n" + b"a" * 999 + b"\r\n")
                s.mail("app@sender.test")
                s.rcpt("rcpt@dest.test")
                empty = s.data(b"")
                return long_line, empty
            finally:
                s.quit()

        long_line, empty = yield threads.deferToThread(client)
        self.assertEqual(long_line[0], 501)
        self.assertIn(b"5.6.0 Line 3 of the message is 999 octets long", long_line[1])
        self.assertEqual(empty, (501, b"5.6.0 The message is empty."))
        self.assertEqual(self.messages(), 0)

    @defer.inlineCallbacks
    def test_a_line_too_long_to_read_as_a_line_gets_501_and_the_session_goes_on(self):
        """Data lines of 20 KiB and 2 MiB (over Twisted's 16 KiB line limit, and
        more than the socket buffers hold) -> 501 5.6.0 after the final dot,
        not a dropped connection; the next message on the connection is queued."""
        self.start_listener(max_message_size=10_000_000)

        def client():
            s = self.smtp()
            try:
                replies = []
                for line in (b"b" * 20_000, b"c" * 2_000_000):
                    s.mail("app@sender.test")
                    s.rcpt("rcpt@dest.test")
                    replies.append(s.data(b"Subject: x\r\n\r\nbefore\r\n" + line + b"\r\nafter\r\n"))
                s.mail("app@sender.test")
                s.rcpt("rcpt@dest.test")
                replies.append(s.data(MESSAGE))
                return replies
            finally:
                s.quit()

        twenty_k, two_m, good = yield threads.deferToThread(client)
        for reply in (twenty_k, two_m):
            self.assertEqual(reply, (501, b"5.6.0 A line of the message is longer than 998 octets "
                                          b"(RFC 5322 section 2.1.1); nothing was queued."))
        self.assertEqual(good[0], 250, good)
        self.assertEqual(self.messages(), 1)

    # -- addresses -------------------------------------------------------

    @defer.inlineCallbacks
    def test_bad_addresses_refused_never_repaired(self):
        """Spaces, bare CR/LF, a missing @, <> as recipient -> 553; bad syntax -> 501; only the valid envelope is queued."""
        self.start_listener()

        def client():
            c = RawClient(self.port)
            try:
                r = {"ehlo": c.cmd(b"EHLO client.test")[0]}
                r["from_space"] = c.cmd(b"MAIL FROM:<a b@sender.test>")
                r["from_no_at"] = c.cmd(b"MAIL FROM:<app>")
                r["from_no_brackets"] = c.cmd(b"MAIL FROM:app@sender.test")
                r["from_null"] = c.cmd(b"MAIL FROM:<>")
                r["rcpt_null"] = c.cmd(b"RCPT TO:<>")
                r["rcpt_no_at"] = c.cmd(b"RCPT TO:<postmaster>")
                r["rcpt_space"] = c.cmd(b"RCPT TO:<a b@dest.test>")
                r["rcpt_lf"] = c.cmd(b"RCPT TO:<a@dest.test\nevil@dest.test>")
                r["rcpt_cr"] = c.cmd(b"RCPT TO:<a@dest.test\rDATA>")
                r["rcpt_nul"] = c.cmd(b"RCPT TO:<a\x00@dest.test>")
                r["rcpt_8bit"] = c.cmd("RCPT TO:<jörg@dest.test>".encode())
                # A CRLF inside the argument just ends the command early.
                c.send(b"RCPT TO:<victim@dest.test\r\nRCPT TO:<ok@dest.test>\r\n")
                r["crlf_split"] = [c.reply(), c.reply()]
                r["data"] = c.cmd(b"DATA")
                r["dot"] = c.cmd(b"Subject: ok\r\n\r\nbody\r\n.")
                c.cmd(b"QUIT")
                return r
            finally:
                c.close()

        r = yield threads.deferToThread(client)
        for key in ("from_space", "from_no_at", "rcpt_null", "rcpt_no_at", "rcpt_space",
                    "rcpt_lf", "rcpt_cr", "rcpt_nul", "rcpt_8bit"):
            self.assertEqual(r[key][0], 553, (key, r[key]))
            self.assertRegex(r[key][1].decode(), r"^5\.\d\.\d+ \S.*\.$", key)
        self.assertIn(b"space", r["from_space"][1])
        self.assertEqual(r["from_no_brackets"][0], 501)
        self.assertEqual(r["from_null"][0], 250)
        self.assertEqual([code for code, _ in r["crlf_split"]], [501, 250])
        self.assertEqual(r["data"][0], 354)
        self.assertEqual(r["dot"][0], 250, r["dot"])
        [m] = self.sync.list_messages()
        self.assertEqual(m.sender, "")
        self.assertEqual([x.address for x in m.recipients], ["ok@dest.test"])

    # -- lost connections ------------------------------------------------

    @defer.inlineCallbacks
    def test_disconnect_mid_data_queues_nothing(self):
        """A client that closes in the middle of DATA (or right after its dot, before a commit starts) leaves nothing queued."""
        svc = self.start_listener(wrap=lambda spool: FlakySpool(spool))

        def mid_data():
            c = RawClient(self.port)
            for line in (b"EHLO client.test", b"MAIL FROM:<app@sender.test>", b"RCPT TO:<rcpt@dest.test>",
                         b"DATA"):
                c.cmd(line)
            c.send(b"Subject: cut\r\n\r\nfirst line\r\nsecond line\r\n")
            c.close()

        yield threads.deferToThread(mid_data)
        yield wait_until(lambda: not svc.settings.sessions)
        self.assertEqual(self.wrapped.calls, [])

        # While as many commits as may run are in flight (1 on SQLite, 2 on
        # PostgreSQL), a client ends DATA and hangs up before any reply: its
        # message had not been picked up, so it is dropped.
        limit = self.service.committer.max_in_flight

        def first(n):
            s = self.smtp()
            try:
                return s.sendmail("app@sender.test", [f"one{n}@dest.test"], MESSAGE)
            finally:
                s.quit()

        self.wrapped.hold()
        firsts = []
        for n in range(limit):      # one after the other: each its own commit
            firsts.append(threads.deferToThread(first, n))
            yield wait_until(lambda: self.wrapped.active == n + 1)

        def second():
            c = RawClient(self.port)
            for line in (b"EHLO client.test", b"MAIL FROM:<app@sender.test>", b"RCPT TO:<two@dest.test>",
                         b"DATA"):
                c.cmd(line)
            c.send(MESSAGE + b".\r\n")
            c.close()

        yield threads.deferToThread(second)
        yield wait_until(lambda: len(svc.settings.sessions) == limit)     # second's hang-up handled
        self.wrapped.release()
        refused = yield defer.gatherResults(firsts)
        self.assertEqual(refused, [{}] * limit)
        yield self.service.committer.idle()
        self.assertEqual(self.wrapped.calls, [1] * limit)
        queued = sorted(r.address for m in self.sync.list_messages() for r in m.recipients)
        self.assertEqual(queued, [f"one{n}@dest.test" for n in range(limit)])     # not two@

    # -- pipelining --------------------------------------------------------

    @defer.inlineCallbacks
    def test_pipelined_commands_answered_in_order(self):
        """Commands pipelined after the final dot wait for its reply (250 with the queue id), even while the commit is slow."""
        self.start_listener(wrap=lambda spool: FlakySpool(spool, delay=0.3), max_message_size=100_000)
        body8 = "Subject: 8bit\r\n\r\nGrüße\r\n".encode()

        def client():
            c = RawClient(self.port)
            try:
                c.cmd(b"EHLO client.test")
                c.send(b"MAIL FROM:<app@sender.test> SIZE=200\r\nRCPT TO:<one@dest.test>\r\nDATA\r\n")
                first = [c.reply() for _ in range(3)]
                c.send(MESSAGE + b".\r\nMAIL FROM:<app@sender.test> BODY=8BITMIME\r\n"
                       b"RCPT TO:<two@dest.test>\r\nDATA\r\n")
                second = [c.reply() for _ in range(4)]
                c.send(body8 + b".\r\nQUIT\r\n")
                third = [c.reply() for _ in range(2)]
                return first, second, third
            finally:
                c.close()

        first, second, third = yield threads.deferToThread(client)
        self.assertEqual([code for code, _ in first], [250, 250, 354])
        self.assertEqual([code for code, _ in second], [250, 250, 250, 354])
        self.assertEqual([code for code, _ in third], [250, 221])
        qid1 = QUEUED.match(second[0][1]).group(1).decode()
        qid2 = QUEUED.match(third[0][1]).group(1).decode()
        self.assertEqual(self.sync.show(qid1).recipients[0].address, "one@dest.test")
        data2 = self.sync.show(qid2, include_data=True).data
        self.assertTrue(data2.endswith(body8), data2)

    # -- group commit ------------------------------------------------------

    def send_together(self, n: int, barrier: threading.Barrier) -> tuple[int, bytes]:
        """A client thread: MAIL and RCPT, wait until every client of ``barrier``
        is mid-transaction, then DATA; the reply to the final dot."""
        s = self.smtp()
        try:
            s.mail("app@sender.test")
            s.rcpt(f"r{n}@dest.test")
            barrier.wait()
            return s.data(MESSAGE)
        finally:
            s.quit()

    @defer.inlineCallbacks
    def test_group_commit_shares_transactions(self):
        """20 concurrent clients all get 250 and are queued, in fewer than 20 enqueue transactions,
        never more at a time than the committer allows (1 on SQLite, 2 on PostgreSQL)."""
        self.start_listener(wrap=lambda spool: FlakySpool(spool, delay=0.2))
        pool = ThreadPool(minthreads=20, maxthreads=20, name="smtplib-clients")
        pool.start()
        self.addCleanup(pool.stop)
        barrier = threading.Barrier(20, timeout=15)
        replies = yield defer.gatherResults(
            [threads.deferToThreadPool(reactor, pool, self.send_together, n, barrier) for n in range(20)])
        self.assertEqual([code for code, _ in replies], [250] * 20)
        qids = {QUEUED.match(text).group(1) for _, text in replies}
        self.assertEqual(len(qids), 20)
        self.assertEqual(self.messages(), 20)
        self.assertEqual(sum(self.wrapped.calls), 20)
        self.assertLess(len(self.wrapped.calls), 20)
        self.assertLessEqual(self.wrapped.peak, self.service.committer.max_in_flight)
        self.assertEqual(self.woken, len(self.wrapped.calls))

    @defer.inlineCallbacks
    def test_commit_waits_for_a_session_mid_transaction(self):
        """Two clients with MAIL and RCPT accepted send DATA together: the first final dot's commit
        waits (commit_delay) for the other session's message, and one transaction queues both."""
        # Far above the 1 ms default (Config is built directly: no 100 ms cap), so that a slow
        # machine cannot split the two; the commit starts as soon as the second message is in.
        self.start_listener(wrap=lambda spool: FlakySpool(spool), commit_delay=30.0)
        barrier = threading.Barrier(2, timeout=15)
        started = time.monotonic()
        replies = yield defer.gatherResults(
            [threads.deferToThread(self.send_together, n, barrier) for n in range(2)])
        self.assertLess(time.monotonic() - started, 15.0, "the commit waited out commit_delay")
        self.assertEqual([code for code, _ in replies], [250, 250])
        self.assertEqual(self.wrapped.calls, [2])
        self.assertEqual(self.messages(), 2)

    # -- spool trouble -----------------------------------------------------

    @defer.inlineCallbacks
    def test_spool_unavailable_answers_4xx_and_loses_nothing(self):
        """A locked spool -> 451 4.3.0, a full one -> 452 4.3.1; nothing queued, and a retry once it is back gets 250."""
        self.start_listener(wrap=FlakySpool)
        where = self.sync.url

        def attempt():
            s = self.smtp()
            try:
                s.mail("app@sender.test")
                s.rcpt("rcpt@dest.test")
                return s.data(MESSAGE)
            finally:
                s.quit()

        self.wrapped.fail_with = SpoolUnavailable(f"The spool {where} is locked by another process; try again.")
        locked = yield threads.deferToThread(attempt)
        self.wrapped.fail_with = SpoolUnavailable(f"The spool {where} is full (no space left); nothing was written.")
        full = yield threads.deferToThread(attempt)
        self.assertEqual(locked[0], 451)
        self.assertTrue(locked[1].startswith(b"4.3.0"), locked)
        self.assertEqual(full[0], 452)
        self.assertTrue(full[1].startswith(b"4.3.1"), full)
        self.assertEqual(self.messages(), 0)
        self.assertEqual(self.woken, 0)
        self.wrapped.fail_with = None
        ok = yield threads.deferToThread(attempt)
        self.assertEqual(ok[0], 250)
        self.assertEqual(self.messages(), 1)

    @defer.inlineCallbacks
    def test_spool_short_of_space_refuses_new_mail_with_452(self):
        """SQLite, below spool.min_free_space: MAIL gets 452 4.3.1, and so does the final dot of a
        transaction that began with room; nothing is queued, and with room again mail gets 250.
        PostgreSQL: the floor is not checked (the server's disk is not visible)."""
        self.start_listener(spool_min_free_space=10 ** 18)      # more than any disk has free
        floor = self.sync.free_space
        if self.sync.dialect != "sqlite":
            self.assertIsNone(floor)
            s = yield threads.deferToThread(self.smtp)
            self.addCleanup(s.close)
            reply = yield threads.deferToThread(s.mail, "app@sender.test")
            self.assertEqual(reply[0], 250, reply)
            return

        def transaction(s: smtplib.SMTP, before_data=lambda: None):
            mail = s.mail("app@sender.test")
            if mail[0] != 250:
                return mail
            s.rcpt("rcpt@dest.test")
            before_data()
            try:
                return s.data(MESSAGE)
            except smtplib.SMTPDataError as e:
                return e.smtp_code, e.smtp_error

        s = yield threads.deferToThread(self.smtp)
        self.addCleanup(s.close)
        refused = yield threads.deferToThread(transaction, s)
        self.assertEqual(refused, (452, b"4.3.1 Insufficient system storage; try again later."))
        floor.floor = 1
        ran_out = yield threads.deferToThread(transaction, s, lambda: setattr(floor, "floor", 10 ** 18))
        self.assertEqual(ran_out[0], 452, ran_out)
        self.assertTrue(ran_out[1].startswith(b"4.3.1"), ran_out)
        self.assertEqual(self.messages(), 0)
        floor.floor = 1
        ok = yield threads.deferToThread(transaction, s)
        self.assertEqual(ok[0], 250, ok)
        self.assertEqual(self.messages(), 1)


class SubmissionSQLiteTests(SubmissionScenarios, unittest.TestCase):
    """The submission scenarios on the SQLite spool."""

    def make_spool_url(self) -> str:
        return f"sqlite:///{scratch_dir(self)}/spool.db"


class SubmissionPostgreSQLTests(SubmissionScenarios, unittest.TestCase):
    """The submission scenarios on the PostgreSQL spool."""

    def make_spool_url(self) -> str:
        return scratch_pg_url(self)


class SubmissionConfigTests(unittest.TestCase):
    """Open-relay refusal and the loopback-only rule (no spool needed)."""

    def config(self, listen: str, users=None) -> Config:
        return Config(hostname="relay.test", node="n", spool_url="sqlite:///unused.db",
                      submission_listen=listen, submission_users=users or {})

    def test_open_relay_refused_at_build(self):
        """A non-loopback listen address (0.0.0.0 and :: included) without users raises ConfigError; loopback or users build."""
        for listen in ("0.0.0.0:2525", "[::]:2525", "192.0.2.1:2525", "mail.example.com:2525"):
            with self.assertRaises(ConfigError) as caught:
                build_submission_service(self.config(listen), None, reactor)
            self.assertEqual(str(caught.exception), OPEN_RELAY, listen)
        for listen in ("127.0.0.1:2525", "127.0.0.2:2525", "[::1]:2525", "localhost:2525"):
            self.assertIsNotNone(build_submission_service(self.config(listen), None, reactor), listen)
        self.assertIsNotNone(build_submission_service(self.config("0.0.0.0:2525", {"u": "p"}), None, reactor))
        self.assertIsNone(build_submission_service(self.config(""), None, reactor))

    def tls_config(self, cert: str, key: str) -> Config:
        return Config(hostname="relay.test", node="n", spool_url="sqlite:///unused.db",
                      submission_listen="127.0.0.1:2525", submission_users={"u": "p"},
                      submission_tls_cert=cert, submission_tls_key=key)

    def test_tls_files_are_loaded_at_build(self):
        """A matching certificate and key build a listener whose sessions can STARTTLS (with those options)."""
        cert, key = write_self_signed(scratch_dir(self))
        svc = build_submission_service(self.tls_config(cert, key), None, reactor)
        self.assertIsNotNone(svc.settings.tls)
        proto = svc.factory.buildProtocol(None)
        self.assertIs(proto.ctx, svc.settings.tls)
        from cryptography import x509
        with open(cert, "rb") as f:
            self.assertEqual(svc.settings.tls.certificate, x509.load_pem_x509_certificate(f.read()))

    def test_relayd_reads_the_tls_files_once(self):
        """build_service checks them before opening the spool and hands the loaded options to the listener."""
        cert, key = write_self_signed(scratch_dir(self))
        config = self.tls_config(cert, key).with_overrides(
            spool_url=f"sqlite:///{os.path.join(scratch_dir(self), 'spool.db')}",
            submission_listen=f"127.0.0.1:{free_port()}", nameservers=(f"127.0.0.1:{free_port()}",))
        reads = []
        real = submission._read_tls_file
        self.patch(submission, "_read_tls_file", lambda path, key: reads.append(path) or real(path, key))
        top = build_service(config, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(reads, [cert, key])
        self.assertIsNotNone(top.getServiceNamed("submission").settings.tls)

    def test_unusable_tls_files_are_one_sentence_config_errors(self):
        """One of the pair, an unreadable file, a file that is not PEM, an encrypted key or a key of
        another certificate -> ConfigError with one sentence naming the file(s)."""
        from cryptography.hazmat.primitives import serialization
        base = scratch_dir(self)
        cert, key = write_self_signed(base)
        other_cert, other_key = write_self_signed(base, prefix="other-")
        missing = os.path.join(base, "missing.pem")
        garbage = os.path.join(base, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("not a PEM file\n")
        encrypted = os.path.join(base, "encrypted.pem")
        with open(key, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), password=None)
        with open(encrypted, "wb") as f:
            f.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"passphrase")))
        cases = [
            ((cert, ""), "submission.tls_cert and submission.tls_key must be set together, or neither."),
            (("", key), "submission.tls_cert and submission.tls_key must be set together, or neither."),
            ((missing, key), f"submission.tls_cert {missing} cannot be read (no such file or directory)."),
            ((cert, base), f"submission.tls_key {base} cannot be read (is a directory)."),
            ((garbage, key), f"submission.tls_cert {garbage} holds no valid PEM certificate."),
            ((cert, garbage), f"submission.tls_key {garbage} holds no valid PEM private key."),
            ((key, key), f"submission.tls_cert {key} holds no valid PEM certificate."),
            ((cert, cert), f"submission.tls_key {cert} holds no valid PEM private key."),
            ((cert, encrypted), f"submission.tls_key {encrypted} is encrypted; relayd needs an unencrypted "
                                f"key (readable by relayd only)."),
            ((cert, other_key), f"submission.tls_key {other_key} does not match the certificate in "
                                f"submission.tls_cert {cert}."),
        ]
        for (cert_path, key_path), sentence in cases:
            with self.assertRaises(ConfigError) as caught:
                build_submission_service(self.tls_config(cert_path, key_path), None, reactor)
            self.assertEqual(str(caught.exception), sentence)
            with self.assertRaises(ConfigError) as caught:
                submission.check_submission_config(self.tls_config(cert_path, key_path))
            self.assertEqual(str(caught.exception), sentence)

    def assert_relayd_refuses(self, base: str, submission_toml: str, sentence: str) -> None:
        """relayd (in process) on a config with ``submission_toml``: exit 64, ``sentence``, no spool created."""
        from relay import daemon
        spool_path = os.path.join(base, "spool.db")
        path = os.path.join(base, "relay.toml")
        with open(path, "w") as f:
            f.write(f'[spool]\nurl = "sqlite:///{spool_path}"\n[submission]\n{submission_toml}')
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(daemon.main(["--config", path]), 64)
        self.assertEqual(err.getvalue().strip(), f"relayd: {sentence}")
        self.assertFalse(os.path.exists(spool_path))

    def test_relayd_exits_64_on_a_key_that_does_not_match(self):
        """relayd prints the mismatch sentence and exits 64, without creating the spool."""
        base = scratch_dir(self)
        cert, _ = write_self_signed(base)
        _, other_key = write_self_signed(base, prefix="other-")
        self.assert_relayd_refuses(
            base, f'listen = "127.0.0.1:{free_port()}"\ntls_cert = "{cert}"\ntls_key = "{other_key}"\n',
            f"submission.tls_key {other_key} does not match the certificate in submission.tls_cert {cert}.")

    def test_relayd_exits_64_on_an_open_relay_config(self):
        """relayd prints the open-relay sentence and exits 64, without creating the spool."""
        self.assert_relayd_refuses(scratch_dir(self), 'listen = "0.0.0.0:2525"\n', OPEN_RELAY)

    def test_busy_port_fails_start_in_one_sentence(self):
        """Starting on a port that is already taken raises RelayError naming submission.listen."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = build_submission_service(self.config(f"127.0.0.1:{port}"), None, reactor)
        with self.assertRaises(RelayError) as caught:
            svc.startService()
        self.assertTrue(str(caught.exception).startswith(f"submission.listen 127.0.0.1:{port}: cannot listen"))
        self.assertFalse(svc.running)

    def test_only_loopback_peers_served_without_users(self):
        """Without users a non-loopback peer gets 554 and is disconnected; 127.x, ::1 and ::ffff:127.x get 220."""
        svc = build_submission_service(self.config("127.0.0.1:2525"), None, reactor)
        peers = [IPv4Address("TCP", "192.0.2.7", 4000), IPv6Address("TCP", "2001:db8::1", 4000),
                 IPv6Address("TCP", "::ffff:192.0.2.7", 4000), IPv4Address("TCP", "127.0.0.5", 4000),
                 IPv6Address("TCP", "::1", 4000), IPv6Address("TCP", "::ffff:127.0.0.1", 4000)]
        for peer, served in zip(peers, [False] * 3 + [True] * 3):
            proto = svc.factory.buildProtocol(peer)
            transport = StringTransport(peerAddress=peer)
            proto.makeConnection(transport)
            self.assertEqual(transport.value()[:3], b"220" if served else b"554", peer)
            self.assertEqual(transport.disconnecting, not served, peer)
            proto.connectionLost(None)
