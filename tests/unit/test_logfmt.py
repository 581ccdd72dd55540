"""Unit tests for relay.logfmt: the Postfix-style delivery log line."""

from __future__ import annotations

import pytest

from relay.logfmt import format_accepted, format_attempt, format_delay, relay_label, status_word
from relay.model import State


def test_format_attempt_matches_spec_example():
    """The SPEC's example line comes out character for character."""
    line = format_attempt(
        queue_id="3F2A",
        recipient="rcpt@example.com",
        relay="mx.example[192.0.2.1]:25",
        delay=1.2,
        attempts=2,
        status=State.DEFERRED,
        reply="451 4.3.0 try later",
    )
    assert line == (
        "3F2A: to=<rcpt@example.com>, relay=mx.example[192.0.2.1]:25, delay=1.2, "
        "attempts=2, status=deferred (451 4.3.0 try later)"
    )


BASE = {"queue_id": "Q1", "recipient": "a@b.example", "relay": "mx.b.example[192.0.2.7]:25", "delay": 3.0,
        "attempts": 1, "status": State.DELIVERED, "reply": "250 2.0.0 ok"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # delivered is logged as "sent"
        ({}, "Q1: to=<a@b.example>, relay=mx.b.example[192.0.2.7]:25, delay=3, attempts=1, "
             "status=sent (250 2.0.0 ok)"),
        # no connection made: relay=none
        ({"relay": None, "status": State.DEFERRED, "reply": "451 4.4.3 DNS lookup failed"},
         "Q1: to=<a@b.example>, relay=none, delay=3, attempts=1, status=deferred (451 4.4.3 DNS lookup failed)"),
        # bounced, with the word given as a plain string
        ({"status": "bounced", "reply": "550 5.1.1 no such user", "attempts": 4},
         "Q1: to=<a@b.example>, relay=mx.b.example[192.0.2.7]:25, delay=3, attempts=4, "
         "status=bounced (550 5.1.1 no such user)"),
        # CR/LF in a peer's reply cannot start a second log line
        ({"status": State.BOUNCED, "reply": "550 5.1.1 no\r\nQ2: to=<forged>, status=sent"},
         "Q1: to=<a@b.example>, relay=mx.b.example[192.0.2.7]:25, delay=3, attempts=1, "
         "status=bounced (550 5.1.1 no Q2: to=<forged>, status=sent)"),
        # control characters in the recipient or relay are replaced, keeping one line
        ({"recipient": "a\nb@c", "relay": "mx\r[1.2.3.4]:25"},
         "Q1: to=<a?b@c>, relay=mx?[1.2.3.4]:25, delay=3, attempts=1, status=sent (250 2.0.0 ok)"),
        # no reply text at all: no empty parentheses
        ({"reply": ""}, "Q1: to=<a@b.example>, relay=mx.b.example[192.0.2.7]:25, delay=3, attempts=1, status=sent"),
        # duplicate window W1: the reason says a duplicate is possible
        ({"status": State.DEFERRED, "reply": "451 4.4.2 connection lost after end of data",
          "possible_duplicate": True},
         "Q1: to=<a@b.example>, relay=mx.b.example[192.0.2.7]:25, delay=3, attempts=1, status=deferred "
         "(451 4.4.2 connection lost after end of data -- possible duplicate: the message may have been delivered)"),
        # W1 whose reason already says the message may have been delivered: said once
        ({"status": State.DEFERRED, "possible_duplicate": True,
          "reply": "451 4.4.2 Connection lost after the final dot; the message may have been delivered"},
         "Q1: to=<a@b.example>, relay=mx.b.example[192.0.2.7]:25, delay=3, attempts=1, status=deferred "
         "(451 4.4.2 Connection lost after the final dot; the message may have been delivered -- possible duplicate)"),
        # W1 without any reply text
        ({"status": State.DEFERRED, "reply": "", "possible_duplicate": True},
         "Q1: to=<a@b.example>, relay=mx.b.example[192.0.2.7]:25, delay=3, attempts=1, status=deferred "
         "(possible duplicate: the message may have been delivered)"),
    ],
)
def test_format_attempt(changes, expected):
    """Each attempt is one line in the Postfix layout whatever its inputs."""
    line = format_attempt(**{**BASE, **changes})
    assert line == expected
    assert "\n" not in line and "\r" not in line


@pytest.mark.parametrize(
    ("status", "word"),
    [
        (State.DELIVERED, "sent"),  # delivered is "sent", as in Postfix
        (State.DEFERRED, "deferred"),  # temporary failure
        (State.BOUNCED, "bounced"),  # permanent failure or expiry
        ("delivered", "sent"),  # the State's value works too
        ("sent", "sent"),  # the word itself passes through
        ("deferred", "deferred"),  # likewise
    ],
)
def test_status_word(status, word):
    """States map to the three SPEC words."""
    assert status_word(status) == word


@pytest.mark.parametrize(
    "status",
    [
        State.QUEUED,  # not an attempt outcome
        State.INFLIGHT,  # not an attempt outcome
        State.HELD,  # not an attempt outcome
        "expired",  # not a state at all
    ],
)
def test_status_word_rejects_non_outcomes(status):
    """Only delivered/deferred/bounced can be logged as an attempt's status."""
    with pytest.raises(ValueError):
        status_word(status)


@pytest.mark.parametrize(
    ("delay", "text"),
    [
        (0.0, "0"),  # nothing
        (0.004, "0"),  # under the 10 ms resolution
        (0.05, "0.05"),  # two decimals under a second
        (0.39, "0.39"),  # two decimals under a second
        (0.1, "0.1"),  # trailing zero dropped
        (0.999, "1"),  # rounds up to a whole second
        (1.0, "1"),  # whole second, no ".0"
        (1.2, "1.2"),  # the SPEC's example
        (9.96, "10"),  # rounds up past 10: whole seconds
        (12.4, "12"),  # whole seconds from 10 s
        (86400.0, "86400"),  # a day
        (5e20, "500000000000000000000"),  # huge: still no scientific notation
        (1e-7, "0"),  # tiny: no scientific notation either
        (-2.0, "0"),  # negative (clock stepped back): 0
        (float("nan"), "0"),  # NaN: 0
    ],
)
def test_format_delay(delay, text):
    """Delays look like Postfix's and never use scientific notation."""
    assert format_delay(delay) == text


@pytest.mark.parametrize(
    ("host", "address", "port", "label"),
    [
        ("mx.example", "192.0.2.1", 25, "mx.example[192.0.2.1]:25"),  # the SPEC's example
        ("mx", "::1", 25, "mx[::1]:25"),  # IPv6 stays inside the brackets
        ("mx.example.", "192.0.2.1", 2525, "mx.example[192.0.2.1]:2525"),  # trailing DNS dot dropped
        ("", "2001:db8::5", 587, "2001:db8::5[2001:db8::5]:587"),  # no host name: the address stands in
    ],
)
def test_relay_label(host, address, port, label):
    """A relay is named host[address]:port."""
    assert relay_label(host, address, port) == label


def test_format_accepted():
    """Postfix's field names; sasl_username only after AUTH; client input kept on one line."""
    assert format_accepted(queue_id="Q1", sender="app@s.test", size=1234, nrcpt=2, client="127.0.0.1") \
        == "Q1: from=<app@s.test>, size=1234, nrcpt=2, client=127.0.0.1"
    assert format_accepted(queue_id="Q1", sender="", size=9, nrcpt=1, client="::1", user="web\napp") \
        == "Q1: from=<>, size=9, nrcpt=1, client=::1, sasl_username=web?app"


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\u2029", "\u202e", "\x1b"])
def test_no_line_break_or_bidi_override_reaches_a_log_line(char):
    """A UTF-8 address may carry NEL, LINE SEPARATOR, bidi overrides...: flattened like ASCII controls."""
    line = format_accepted(queue_id="Q1", sender=f"a{char}b@s.test", size=1, nrcpt=1, client="::1")
    assert line == "Q1: from=<a?b@s.test>, size=1, nrcpt=1, client=::1"
    assert len(line.splitlines()) == 1
