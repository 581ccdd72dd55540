"""The listener's MAIL and RCPT replies for malformed commands (no sockets)."""

from __future__ import annotations

import pytest

from tests.unit.submission_fakes import Session, code

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
