"""STARTTLS on the submission listener, with Twisted fakes (no sockets, no
handshake): what is offered to whom, what AUTH and MAIL answer before TLS,
the reply codes of STARTTLS, that TLS starts a new session, and that
plaintext pipelined after STARTTLS is discarded (RFC 3207 section 4.2,
CVE-2011-0411)."""

from __future__ import annotations

from tests.unit.submission_fakes import CONTEXT, LOOPBACK, PLAIN_OK, REMOTE, Spool, code
from tests.unit.submission_fakes import Session as _Session


def Session(peer=REMOTE, *, tls=True, users=True, spool=None) -> _Session:
    """This module's sessions: TLS configured and users, unless told otherwise."""
    return _Session(peer, tls=tls, users=users, spool=spool)


def test_remote_client_must_start_tls_before_auth_and_mail():
    """Not on loopback, with users and TLS: EHLO offers STARTTLS and no AUTH; AUTH and MAIL -> 530 5.7.0; after STARTTLS AUTH is offered and works."""
    s = Session(REMOTE)
    features = s.ehlo()
    assert b"STARTTLS" in features and b"AUTH" not in features
    assert s.cmd(PLAIN_OK) == [b"530 5.7.0 Must issue a STARTTLS command first"]
    assert s.cmd(b"AUTH LOGIN") == [b"530 5.7.0 Must issue a STARTTLS command first"]
    assert s.cmd(b"MAIL FROM:<app@sender.test>") == [b"530 5.7.0 Must issue a STARTTLS command first"]
    assert s.transport.tls_at is None
    assert s.cmd(b"STARTTLS") == [b"220 2.0.0 Ready to start TLS"]
    assert s.transport.tls_at == s.seen and s.transport.tls_context is CONTEXT
    features = s.ehlo()
    assert b"STARTTLS" not in features and b"AUTH" in features
    [auth] = [line for line in s.transport.value().split(b"\r\n") if line[4:9] == b"AUTH "]
    assert sorted(auth[9:].split()) == [b"LOGIN", b"PLAIN"]
    assert code(s.cmd(PLAIN_OK)) == [b"235 Authentication"]
    assert code(s.cmd(b"MAIL FROM:<app@sender.test>")) == [b"250 2.1.0"]
    assert code(s.cmd(b"RCPT TO:<rcpt@dest.test>")) == [b"250 2.1.5"]
    assert code(s.cmd(b"DATA")) == [b"354 Continue"]
    assert code(s.send(b"Subject: hi\r\n\r\nover TLS\r\n.\r\n")) == [b"250 2.0.0"]
    [message] = s.spool.messages
    assert b"with ESMTPSA" in message.data and message.data.endswith(b"over TLS\r\n")


def test_loopback_client_keeps_plaintext_auth():
    """On loopback, with TLS configured, AUTH is offered and works without TLS (today's behaviour); STARTTLS is offered too."""
    s = Session(LOOPBACK)
    features = s.ehlo()
    assert {b"STARTTLS", b"AUTH"} <= features
    assert code(s.cmd(PLAIN_OK)) == [b"235 Authentication"]
    assert code(s.cmd(b"MAIL FROM:<app@sender.test>")) == [b"250 2.1.0"]


def test_without_tls_configured_nothing_changes():
    """No TLS files: EHLO has no STARTTLS, a remote client is offered AUTH in plaintext, STARTTLS -> 502 (not offered)."""
    s = Session(REMOTE, tls=False)
    features = s.ehlo()
    assert b"STARTTLS" not in features and b"AUTH" in features
    assert s.cmd(b"STARTTLS") == [b"502 5.5.1 STARTTLS is not offered here."]
    assert code(s.cmd(PLAIN_OK)) == [b"235 Authentication"]
    assert code(s.cmd(b"MAIL FROM:<app@sender.test>")) == [b"250 2.1.0"]
    assert s.transport.tls_at is None


def test_starttls_reply_codes():
    """STARTTLS with an argument -> 501 5.5.4; a second STARTTLS once TLS is on -> 503 5.5.1."""
    s = Session(REMOTE)
    s.ehlo()
    assert s.cmd(b"STARTTLS now") == [b"501 5.5.4 Syntax: STARTTLS"]
    assert s.transport.tls_at is None
    assert s.cmd(b"STARTTLS") == [b"220 2.0.0 Ready to start TLS"]
    s.ehlo()
    assert s.cmd(b"STARTTLS") == [b"503 5.5.1 TLS is already active."]


def test_tls_forgets_helo_transaction_and_auth():
    """After STARTTLS the session starts over: the AUTH done in plaintext (loopback) and the open transaction are gone."""
    s = Session(LOOPBACK)
    s.ehlo()
    assert code(s.cmd(PLAIN_OK)) == [b"235 Authentication"]
    assert code(s.cmd(b"MAIL FROM:<app@sender.test>")) == [b"250 2.1.0"]
    assert s.cmd(b"STARTTLS") == [b"220 2.0.0 Ready to start TLS"]     # inside a transaction, as Postfix allows
    assert not s.proto.authenticated and not s.proto.esmtp and s.proto._helo[0] is None
    assert code(s.cmd(b"RCPT TO:<rcpt@dest.test>")) == [b"503 5.5.1"]
    assert code(s.cmd(b"MAIL FROM:<app@sender.test>")) == [b"530 5.7.0"]   # AUTH again, please
    assert s.cmd(b"MAIL FROM:<app@sender.test>") == [b"530 5.7.0 Authentication required."]
    assert s.cmd(PLAIN_OK) == [b"503 5.5.1 Send EHLO first."]           # RFC 3207: EHLO again after TLS
    s.ehlo()
    assert code(s.cmd(PLAIN_OK)) == [b"235 Authentication"]
    assert code(s.cmd(b"MAIL FROM:<app@sender.test>")) == [b"250 2.1.0"]


def test_plaintext_pipelined_after_starttls_is_discarded():
    """STARTTLS and more commands in one read: only 220, TLS starts right after it, and the rest is never run."""
    s = Session(LOOPBACK)
    s.ehlo()
    assert code(s.cmd(PLAIN_OK)) == [b"235 Authentication"]
    replies = s.send(b"STARTTLS\r\nMAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
                     b"Subject: injected\r\n\r\nx\r\n.\r\nQUIT\r\nRSET")
    assert replies == [b"220 2.0.0 Ready to start TLS"]
    assert s.transport.tls_at == len(s.transport.value())          # nothing written after the switch
    assert not s.transport.disconnecting                            # QUIT was not run either
    assert s.proto._buffer == b"" and s.proto._from is None
    # Under TLS: a fresh session; the injected MAIL left no sender behind.
    s.ehlo()
    assert code(s.cmd(b"RCPT TO:<rcpt@dest.test>")) == [b"503 5.5.1"]
    assert s.spool.messages == []


def test_starttls_held_after_the_final_dot_discards_what_follows():
    """STARTTLS pipelined after a final dot waits for the commit's 250; the plaintext after it is dropped, not replayed."""
    spool = Spool(hold=True)
    s = Session(LOOPBACK, spool=spool)
    s.ehlo()
    s.cmd(PLAIN_OK)
    assert code(s.send(b"MAIL FROM:<app@sender.test>\r\nRCPT TO:<rcpt@dest.test>\r\nDATA\r\n")) == [
        b"250 2.1.0", b"250 2.1.5", b"354 Continue"]
    assert s.send(b"Subject: one\r\n\r\nfirst\r\n.\r\nSTARTTLS\r\nMAIL FROM:<evil@sender.test>\r\nNOOP\r\nRS") == []
    assert s.proto.holding
    spool.release()
    assert code(s.replies()) == [b"250 2.0.0", b"220 2.0.0"]
    assert s.transport.tls_at == len(s.transport.value())
    assert s.proto._from is None and not s.proto._held and s.proto._buffer == b""
    assert not s.proto.authenticated
    assert len(spool.messages) == 1
