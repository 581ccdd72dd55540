"""Unit tests for relay.replies: classification, enhanced status, sentMail decoding."""

from __future__ import annotations

import pytest

from relay.model import State
from relay.replies import (
    NO_FINAL_REPLY,
    NO_RCPT_REPLY,
    classify,
    clean_text,
    enhanced_status,
    recipient_replies,
    reply_line,
)


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (250, State.DELIVERED),  # plain success
        (251, State.DELIVERED),  # "user not local; will forward" is still success
        (421, State.DEFERRED),  # service closing: temporary
        (450, State.DEFERRED),  # mailbox busy
        (452, State.DEFERRED),  # insufficient storage / too many recipients
        (550, State.BOUNCED),  # no such user
        (554, State.BOUNCED),  # transaction failed
        (354, State.DEFERRED),  # intermediate reply at a final stage: oddity, defer
        (199, State.DEFERRED),  # 1xx: never valid in SMTP, defer
        (0, State.DEFERRED),  # Twisted's placeholder code
        (-1, State.DEFERRED),  # Twisted's "no code" (timeouts, protocol errors)
        (600, State.DEFERRED),  # out of range: defer rather than bounce
        (999, State.DEFERRED),  # out of range
    ],
)
def test_classify(code, state):
    """2xx delivers, 5xx bounces, and 4xx or anything odd defers."""
    assert classify(code) is state


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        (550, "5.1.1 no such user", "5.1.1"),  # the usual form
        (451, "4.3.0 try later", "4.3.0"),  # temporary
        (250, "2.0.0 queued as ABC", "2.0.0"),  # success
        (550, "5.1.10 null MX", "5.1.10"),  # two-digit detail (RFC 7505)
        (554, "5.123.456 odd but legal", "5.123.456"),  # three digits each
        (550, "  5.7.1 relay denied", "5.7.1"),  # leading blanks tolerated
        (550, "5.01.001 leading zeros", "5.1.1"),  # leading zeros are dropped (RFC 3464 Status syntax)
        (550, "5.1.1. user unknown", "5.1.1"),  # sentence dot after the code
        (550, "5.1.1", "5.1.1"),  # nothing after the code
        (550, "no such user", "5.0.0"),  # no enhanced code: X.0.0 of the class
        (550, "", "5.0.0"),  # empty text
        (550, "4.2.2 mailbox full", "5.0.0"),  # class mismatch: the reply code wins
        (451, "5.1.1 wrong class", "4.0.0"),  # class mismatch the other way
        (550, "user 5.1.1 in the middle", "5.0.0"),  # only at the start counts
        (550, "5.1.1234 too many digits", "5.0.0"),  # detail over three digits: not a code
        (550, "5.1 too short", "5.0.0"),  # missing detail
        (550, "3.1.1 no such class", "5.0.0"),  # class 3 does not exist
        (-1, "4.4.2 connection lost", "4.4.2"),  # non-SMTP failure code counts as class 4
        (0, "", "4.0.0"),  # placeholder code, no text: 4.0.0, never -1.0.0
        (354, "5.0.0 odd", "4.0.0"),  # 3xx at a final stage counts as class 4
    ],
)
def test_enhanced_status(code, text, status):
    """The enhanced code at the start of the text when its class matches, else X.0.0."""
    assert enhanced_status(code, text) == status


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"4.3.0 try later", "4.3.0 try later"),  # bytes decoded
        ("4.3.0 try later", "4.3.0 try later"),  # str passed through
        (b"first\nsecond\nthird", "first second third"),  # multi-line reply joined with spaces
        (b"a\r\nb", "a b"),  # stray CR removed with the line break
        (b"caf\xc3\xa9 ok", "caf\u00e9 ok"),  # UTF-8 decoded
        (b"bad \xff byte", "bad \ufffd byte"),  # invalid UTF-8 replaced, never an error
        (b"tab\there  and   spaces ", "tab here and spaces"),  # white space collapsed and trimmed
        (b"nul\x00esc\x1b[31m", "nul esc [31m"),  # control characters dropped
        (b"", ""),  # nothing
    ],
)
def test_clean_text(raw, text):
    """Reply text becomes one clean line of str."""
    assert clean_text(raw) == text


@pytest.mark.parametrize(
    ("code", "text", "line"),
    [
        (451, "4.3.0 try later", "451 4.3.0 try later"),  # the SPEC's example
        (250, "", "250"),  # no text: just the code
        (550, "5.1.1 no\r\nsuch user", "550 5.1.1 no such user"),  # CR/LF flattened
        (-1, "4.4.1 timeout", "-1 4.4.1 timeout"),  # odd codes are shown as they are
    ],
)
def test_reply_line(code, text, line):
    """A reply is written as 'code text' on one line."""
    assert reply_line(code, text) == line


OK, TEMP, PERM = "ok1@b.test", "temp1@b.test", "perm1@b.test"


@pytest.mark.parametrize(
    ("sent_mail", "recipients", "replies"),
    [
        # RCPTs ok / 450 / 550, final reply 250 (twisted.md section 1, row 1)
        (
            (250, b"2.0.0 queued", [(OK, 250, b"OK"), (TEMP, 450, b"4.2.0 temp"), (PERM, 550, b"5.1.1 no such user")]),
            [OK, TEMP, PERM],
            [(250, "2.0.0 queued"), (450, "4.2.0 temp"), (550, "5.1.1 no such user")],
        ),
        # every RCPT refused: code is the last RCPT's, resp the str 'No recipients accepted'
        (
            (550, "No recipients accepted", [(TEMP, 450, b"4.2.0 temp"), (PERM, 550, b"5.1.1 no such user")]),
            [TEMP, PERM],
            [(450, "4.2.0 temp"), (550, "5.1.1 no such user")],
        ),
        # final reply 451 to the dot: the accepted recipient is deferred with it
        (
            (451, b"4.3.0 try later", [(OK, 250, b"OK")]),
            [OK],
            [(451, "4.3.0 try later")],
        ),
        # final 554 plus one RCPT 550: each keeps the reply that decided it
        (
            (554, b"5.6.0 rejected", [(OK, 250, b"OK"), (PERM, 550, b"5.1.1 no such user")]),
            [OK, PERM],
            [(554, "5.6.0 rejected"), (550, "5.1.1 no such user")],
        ),
        # MAIL FROM 553: addresses empty, the code applies to everyone (numOk is stale, ignored)
        (
            (553, b"5.7.1 sender rejected", []),
            [OK, TEMP],
            [(553, "5.7.1 sender rejected"), (553, "5.7.1 sender rejected")],
        ),
        # MAIL FROM 421: everyone deferred with it
        (
            (421, b"4.7.0 closing", []),
            [OK],
            [(421, "4.7.0 closing")],
        ),
        # RCPT 421 is recorded per recipient like any other code
        (
            (250, b"2.0.0 ok", [(OK, 250, b"OK"), (TEMP, 421, b"4.7.0 shutting down")]),
            [OK, TEMP],
            [(250, "2.0.0 ok"), (421, "4.7.0 shutting down")],
        ),
        # multi-line final reply joined with spaces
        (
            (250, b"2.0.0 first\nsecond", [(OK, 250, b"OK")]),
            [OK],
            [(250, "2.0.0 first second")],
        ),
        # bytes addresses (as getMailTo may return them) match str recipients too
        (
            (250, b"2.0.0 ok", [(OK.encode(), 250, b"OK"), (PERM.encode(), 550, b"5.1.1 nope")]),
            [OK, PERM],
            [(250, "2.0.0 ok"), (550, "5.1.1 nope")],
        ),
        # result follows the order of `recipients`, not of `addresses`
        (
            (250, b"2.0.0 ok", [(OK, 250, b"OK"), (PERM, 550, b"5.1.1 nope")]),
            [PERM, OK],
            [(550, "5.1.1 nope"), (250, "2.0.0 ok")],
        ),
        # a recipient with no RCPT result recorded is deferred, never delivered or bounced
        (
            (250, b"2.0.0 ok", [(OK, 250, b"OK")]),
            [OK, TEMP],
            [(250, "2.0.0 ok"), NO_RCPT_REPLY],
        ),
        # MAIL FROM answered with an unexpected 2xx (Twisted expects exactly 250): nothing was sent
        (
            (251, b"odd", []),
            [OK],
            [(451, "4.5.0 unexpected reply to MAIL FROM: 251 odd")],
        ),
        # str resp (no final reply) with an accepted RCPT must not deliver it
        (
            (250, "No recipients accepted", [(OK, 250, b"OK")]),
            [OK],
            [NO_FINAL_REPLY],
        ),
        # undecodable bytes in a reply are replaced, not fatal
        (
            (550, b"5.1.1 \xff", [(OK, 250, b"OK")]),
            [OK],
            [(550, "5.1.1 \ufffd")],
        ),
    ],
)
def test_recipient_replies(sent_mail, recipients, replies):
    """Each recipient gets the reply that decided its fate in the transaction."""
    code, resp, addresses = sent_mail
    assert recipient_replies(code, resp, addresses, recipients) == replies


def test_recipient_replies_two_xx_without_body_is_deferred():
    """A 2xx final reply when the body was never sent (DATA answered 250, not 354) defers instead of delivering."""
    replies = recipient_replies(250, b"2.0.0 ok", [(OK, 250, b"OK"), (PERM, 550, b"5.1.1 nope")], [OK, PERM],
                                body_sent=False)
    assert replies == [(451, "4.5.0 unexpected reply to DATA: 250 2.0.0 ok"), (550, "5.1.1 nope")]
    assert classify(replies[0][0]) is State.DEFERRED


def test_recipient_replies_failure_with_body_not_sent_is_kept():
    """A 5xx to the DATA command (no body sent) still bounces the accepted recipients."""
    assert recipient_replies(554, b"5.0.0 no", [(OK, 250, b"OK")], [OK], body_sent=False) == [(554, "5.0.0 no")]


def test_recipient_replies_duplicate_addresses_are_matched_in_order():
    """If one address were sent twice, its two RCPT results are used in RCPT order."""
    replies = recipient_replies(250, b"2.0.0 ok", [(OK, 550, b"5.1.1 first"), (OK, 250, b"OK")], [OK, OK])
    assert replies == [(550, "5.1.1 first"), (250, "2.0.0 ok")]


def test_recipient_replies_default_deferrals_are_deferred():
    """The stand-in replies for missing results classify as DEFERRED."""
    assert classify(NO_RCPT_REPLY[0]) is State.DEFERRED and classify(NO_FINAL_REPLY[0]) is State.DEFERRED
    assert enhanced_status(*NO_RCPT_REPLY).startswith("4.") and enhanced_status(*NO_FINAL_REPLY).startswith("4.")
