"""SMTPUTF8 (RFC 6531) on the submission listener, with Twisted fakes (no
sockets): EHLO offers it, ``MAIL ... SMTPUTF8`` allows UTF-8 addresses for
that transaction only, the reply codes around it, UTF-8 header fields
(RFC 6532), and the ``with`` of the ``Received:`` field (RFC 6531 §3.7.3)."""

from __future__ import annotations

import pytest

from relay.message import parse_message
from tests.unit.submission_fakes import PLAIN_OK, Session, code

SENDER = "jörg@例え.test"
RCPT = "ünïcode@例え.test"
NEEDS_PARAMETER = b"553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL."
UTF8_MESSAGE = (f"From: Jörg <{SENDER}>\r\nTo: {RCPT}\r\nSubject: Grüße\r\n\r\nHallo, Welt.\r\n").encode()


def test_ehlo_lists_smtputf8_with_8bitmime():
    """EHLO offers SMTPUTF8 (and 8BITMIME, which RFC 6531 requires with it)."""
    assert {b"SMTPUTF8", b"8BITMIME"} <= Session().ehlo()


@pytest.mark.parametrize("commands, refused", [
    ([f"MAIL FROM:<{SENDER}>".encode()], 0),
    ([b"MAIL FROM:<a@s.test>", f"RCPT TO:<{RCPT}>".encode()], 1),
    ([b"MAIL FROM:<a@s.test> BODY=8BITMIME SIZE=100", f"RCPT TO:<{RCPT}>".encode()], 1),
])
def test_non_ascii_address_without_the_parameter_is_553_5_6_7(commands, refused):
    """Without SMTPUTF8 on MAIL a non-ASCII sender or recipient gets 553 5.6.7 saying what to do."""
    s = Session()
    s.cmd(b"EHLO client.test")
    replies = [s.cmd(c)[0] for c in commands]
    assert replies[refused] == NEEDS_PARAMETER
    assert all(r.startswith(b"250 ") for r in replies[:refused])


@pytest.mark.parametrize("mail", [b"MAIL FROM:<a@s.test> SMTPUTF8=yes", b"MAIL FROM:<a@s.test> SMTPUTF8=",
                                  f"MAIL FROM:<{SENDER}> SMTPUTF8=YES".encode()])
def test_smtputf8_with_a_value_is_501(mail):
    """SMTPUTF8 takes no value: SMTPUTF8=yes (or an empty value) -> 501 5.5.4, and no transaction starts."""
    s = Session()
    s.cmd(b"EHLO client.test")
    assert code(s.cmd(mail)) == [b"501 5.5.4"]
    assert code(s.cmd(b"RCPT TO:<r@d.test>")) == [b"503 5.5.1"]


def test_utf8_envelope_and_headers_accepted_under_smtputf8():
    """MAIL FROM:<jörg@例え.test> SMTPUTF8 (lower case too, with SIZE and BODY): UTF-8 sender and recipients,
    UTF-8 header fields; the spool gets the addresses as sent and a UTF-8 Received field "with UTF8SMTP"."""
    s = Session()
    s.cmd(b"EHLO client.test")
    assert code(s.cmd(f"MAIL FROM:<{SENDER}> SIZE=200 BODY=8BITMIME smtputf8".encode())) == [b"250 2.1.0"]
    assert code(s.cmd(f"RCPT TO:<{RCPT}>".encode())) == [b"250 2.1.5"]
    assert code(s.cmd(b"DATA")) == [b"354 Continue"]
    assert code(s.send(UTF8_MESSAGE + b".\r\n")) == [b"250 2.0.0"]
    [m] = s.spool.messages
    assert (m.sender, m.recipients, m.subject) == (SENDER, (RCPT,), "Grüße")
    received, _, rest = m.data.partition(b";\r\n\t")
    assert received == f"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (relay) with UTF8SMTP\r\n" \
                       f"\tfor <{RCPT}>".encode()
    assert rest.split(b"\r\n", 1)[1] == UTF8_MESSAGE


def test_ascii_addresses_and_null_sender_under_smtputf8():
    """SMTPUTF8 with only ASCII addresses (and the null sender) is fine; the Received field still says UTF8SMTP."""
    s = Session()
    s.cmd(b"EHLO client.test")
    assert code(s.cmd(b"MAIL FROM:<> SMTPUTF8")) == [b"250 2.1.0"]
    assert code(s.cmd(b"RCPT TO:<r@d.test>")) == [b"250 2.1.5"]
    assert code(s.cmd(f"RCPT TO:<{RCPT}>".encode())) == [b"250 2.1.5"]
    s.cmd(b"DATA")
    assert code(s.send(b"Subject: x\r\n\r\nx\r\n.\r\n")) == [b"250 2.0.0"]
    [m] = s.spool.messages
    assert (m.sender, m.recipients) == ("", ("r@d.test", RCPT))
    assert b"(relay) with UTF8SMTP;\r\n" in m.data


def test_smtputf8_holds_for_one_transaction_only():
    """After an SMTPUTF8 transaction (or RSET), a MAIL without the parameter is plain ESMTP again."""
    s = Session()
    s.cmd(b"EHLO client.test")
    s.cmd(b"MAIL FROM:<a@s.test> SMTPUTF8")
    s.cmd(f"RCPT TO:<{RCPT}>".encode())
    s.cmd(b"DATA")
    assert code(s.send(b"Subject: one\r\n\r\none\r\n.\r\n")) == [b"250 2.0.0"]
    assert code(s.cmd(b"MAIL FROM:<a@s.test>")) == [b"250 2.1.0"]
    assert s.cmd(f"RCPT TO:<{RCPT}>".encode()) == [NEEDS_PARAMETER]
    assert code(s.cmd(b"RCPT TO:<r@d.test>")) == [b"250 2.1.5"]
    s.cmd(b"DATA")
    assert code(s.send(b"Subject: two\r\n\r\ntwo\r\n.\r\n")) == [b"250 2.0.0"]
    s.cmd(b"MAIL FROM:<a@s.test> SMTPUTF8")
    s.cmd(b"RSET")
    s.cmd(b"MAIL FROM:<a@s.test>")
    assert s.cmd(f"RCPT TO:<{RCPT}>".encode()) == [NEEDS_PARAMETER]
    first, second = s.spool.messages
    assert first.recipients == (RCPT,) and b"with UTF8SMTP\r\n" in first.data
    assert second.recipients == ("r@d.test",) and b"with ESMTP\r\n" in second.data


def test_invalid_utf8_is_501_5_5_2():
    """Under SMTPUTF8, address octets that are not UTF-8 -> 501 5.5.2 (sender and recipient)."""
    s = Session()
    s.cmd(b"EHLO client.test")
    assert s.cmd(b"MAIL FROM:<j\xf6rg@s.test> SMTPUTF8") == [b"501 5.5.2 The sender address is not valid UTF-8."]
    assert code(s.cmd(b"MAIL FROM:<a@s.test> SMTPUTF8")) == [b"250 2.1.0"]
    assert s.cmd(b"RCPT TO:<\xc3(@d.test>") == [b"501 5.5.2 The recipient address is not valid UTF-8."]


def test_utf8_addresses_still_follow_the_address_rules():
    """UTF-8 does not loosen the address rules: a space or a missing domain is still 553."""
    s = Session()
    s.cmd(b"EHLO client.test")
    assert code(s.cmd("MAIL FROM:<jö rg@s.test> SMTPUTF8".encode())) == [b"553 5.1.7"]
    assert code(s.cmd(b"MAIL FROM:<a@s.test> SMTPUTF8")) == [b"250 2.1.0"]
    assert code(s.cmd("RCPT TO:<ünïcode@>".encode())) == [b"553 5.1.3"]
    assert code(s.cmd(("RCPT TO:<" + "ü" * 33 + "@d.test>").encode())) == [b"553 5.1.3"]   # 66 octets


def test_utf8_headers_without_smtputf8_accepted_as_relayctl_enqueue_does():
    """Content rules do not depend on SMTPUTF8: UTF-8 header fields with ASCII addresses are queued,
    as parse_message (relayctl enqueue, the API) accepts them."""
    message = "From: Jörg <a@s.test>\r\nTo: r@d.test\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    assert parse_message(message).subject == "Grüße"
    s = Session()
    s.cmd(b"EHLO client.test")
    s.cmd(b"MAIL FROM:<a@s.test> BODY=8BITMIME")
    s.cmd(b"RCPT TO:<r@d.test>")
    s.cmd(b"DATA")
    assert code(s.send(message + b".\r\n")) == [b"250 2.0.0"]
    [m] = s.spool.messages
    assert m.subject == "Grüße" and m.data.endswith(message) and b"with ESMTP\r\n" in m.data


@pytest.mark.parametrize("tls, auth, smtputf8, with_", [
    (False, False, True, b"UTF8SMTP"),
    (True, False, True, b"UTF8SMTPS"),
    (False, True, True, b"UTF8SMTPA"),
    (True, True, True, b"UTF8SMTPSA"),
    (False, False, False, b"ESMTP"),
    (True, False, False, b"ESMTPS"),
    (False, True, False, b"ESMTPA"),
    (True, True, False, b"ESMTPSA"),
])
def test_received_with_type(tls, auth, smtputf8, with_):
    """The Received field's "with": UTF8SMTP[S][A] for SMTPUTF8 transactions, ESMTP[S][A] otherwise."""
    s = Session(tls=tls, users=auth)
    s.cmd(b"EHLO client.test")
    if tls:
        assert code(s.cmd(b"STARTTLS")) == [b"220 2.0.0"]
        s.cmd(b"EHLO client.test")
    if auth:
        assert code(s.cmd(PLAIN_OK)) == [b"235 Authentication"]
    assert code(s.cmd(b"MAIL FROM:<a@s.test>" + (b" SMTPUTF8" if smtputf8 else b""))) == [b"250 2.1.0"]
    s.cmd(b"RCPT TO:<r@d.test>")
    s.cmd(b"DATA")
    assert code(s.send(b"Subject: x\r\n\r\nx\r\n.\r\n")) == [b"250 2.0.0"]
    [m] = s.spool.messages
    assert b"\tby relay.test (relay) with " + with_ + b"\r\n\tfor <r@d.test>;\r\n" in m.data


def test_helo_session_received_says_smtp():
    """After HELO (no extensions) the Received field says "with SMTP", as before."""
    s = Session()
    s.cmd(b"HELO client.test")
    s.cmd(b"MAIL FROM:<a@s.test>")
    s.cmd(b"RCPT TO:<r@d.test>")
    s.cmd(b"DATA")
    assert code(s.send(b"Subject: x\r\n\r\nx\r\n.\r\n")) == [b"250 2.0.0"]
    assert b"(relay) with SMTP\r\n" in s.spool.messages[0].data
