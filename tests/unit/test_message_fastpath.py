"""The fast path for simple address lists in relay.message agrees with the full path.

``_simple_addresses`` skips the strict header parser and ``getaddresses`` for
the address lists nearly every message has.  It may only do so where both
would have said the same: no defect, and exactly the same addresses in the
same order.  These tests hold it to that on a table of cases, on random
values (seeded; no extra dependency) and end to end through parse_message.
"""

from __future__ import annotations

import random

import pytest
from email.utils import getaddresses

from relay import message
from relay.errors import BadMessage


def full_path(values: list[str]) -> list[str] | None:
    """What the strict parser and getaddresses decide: None (refused) or the addresses."""
    try:
        for value in values:
            message._check_address_list(value, "To")
    except BadMessage:
        return None
    return [addr for _name, addr in getaddresses(values) if addr]


SIMPLE = [
    "a@b.example",
    "Customer 0 <user74606.0@example.net>",
    '"Doe, John" <john.doe@example.com>, jane@example.org',
    "<a@b.example>",
    "  a@b.example  ,  B C <c@d.example>  ",
    "x+tag@sub.example.co.uk",
    "o'brien@example.ie",
    "a@b.example,\r\n c@d.example",                  # folded
    "Name\r\n\t<a@b.example>",                       # folded before the angle bracket
    "Name\t<a@b.example>",
    '"" <a@b.example>',
    '"a;b:c" <x@y.example>',
    '"Support (EU)" <help@example.eu>',
    "a@-bad-.example",                               # valid list syntax; validate_address refuses it
    "a@b",
    "a@1.2.3.4",
    "{x}|~`#$%&*/^_-!@example.org",
    "A B C D <a@b.example>,E <e@f.example>",
]

NOT_SIMPLE = [
    "bob@example.org<eve@example.net>",             # CVE-2023-27043: must reach the strict parser
    "bob@example.org <eve@example.net>",
    "undisclosed-recipients:;",
    "Friends: a@b.example, c@d.example;",
    "a@b.example (comment)",
    "=?utf-8?q?J=C3=B6rg?= <j@b.example>",
    '"=?utf-8?q?J=C3=B6rg?=" <j@b.example>',
    "a=b@c.example",
    "John Q. Public <j@b.example>",
    '"a\\"b" <x@y.example>',
    '"a@b" <x@y.example>',
    '"<x@y.example>" <x@z.example>',
    "a@b.example,",
    "a@b.example, ",
    "a@b.example,,c@d.example",
    ", a@b.example",
    "a@[192.0.2.1]",
    '"quoted local"@example.com',
    "jö@b.example",
    "Jörg <j@b.example>",
    "",
    "   ",
    "a@b.example c@d.example",
    "<a@b.example",
    "a@b.example>",
    "< a@b.example >",
    "a.@b.example",
    ".a@b.example",
    "a..b@c.example",
    "a@b..example",
    "a@.b",
    "a@b.",
    "Name <a@b.example> extra",
    "a@b.example\r\nc@d.example",                   # a line break not followed by a blank
    "a@b.exa\r\n mple",
    "a\r@b.example",
    '"Doe,\r\n John" <j@b.example>',              # getaddresses misreads a fold inside quotes
]


@pytest.mark.parametrize("value", SIMPLE)
def test_simple_values_take_the_fast_path(value):
    """A simple address list is recognised, with the addresses the full path finds."""
    fast = message._simple_addresses([value])
    assert fast is not None
    assert fast == full_path([value])


@pytest.mark.parametrize("value", NOT_SIMPLE)
def test_other_values_take_the_full_path(value):
    """Anything outside the simple grammar is left to the strict parser."""
    assert message._simple_addresses([value]) is None


def test_several_header_fields():
    """Several To fields are one list, as getaddresses joins them; one odd field sends all to the full path."""
    assert message._simple_addresses(SIMPLE[:3]) == full_path(SIMPLE[:3])
    assert message._simple_addresses([SIMPLE[0], NOT_SIMPLE[0]]) is None
    assert message._simple_addresses([]) == []


_PIECES = ["a", "bc", "x.y", "@", "example", ".org", ".", "<", ">", ",", " ", "\t", "\r\n ", "\r\n",
           '"', "Doe", "=?", "?=", "=", "?", "(", ")", ":", ";", "\\", "[", "]", "-", "'", "é", "+", "0"]


def _simple_value(rng: random.Random) -> str:
    atext = "abcXYZ019!#$%&'*+/^_`{|}~-"

    def atom() -> str:
        return "".join(rng.choice(atext) for _ in range(rng.randint(1, 6)))

    def addr() -> str:
        local = ".".join(atom() for _ in range(rng.randint(1, 3)))
        domain = ".".join("".join(rng.choice("abz09-") for _ in range(rng.randint(1, 5)))
                          for _ in range(rng.randint(1, 3)))
        return f"{local}@{domain}"

    def blank() -> str:
        return rng.choice(["", "", " ", "  ", "\t", "\r\n "])

    items = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(3)
        if kind == 0:
            items.append(addr())
        elif kind == 1:
            name = rng.choice([" ".join(atom() for _ in range(rng.randint(1, 3))),
                               '"' + "".join(rng.choice('abc ,;:()[].#0') for _ in range(rng.randint(0, 8))) + '"',
                               ""])
            items.append(f"{name}{blank() if name else ''}<{addr()}>")
        else:
            items.append(f"{blank()}{addr()}{blank()}")
    value = ("," + blank()).join(items)
    return value.replace("\r\n ", " ") if '"' in value else value   # see NOT_SIMPLE


def test_random_simple_values_agree():
    """Values generated from the simple grammar take the fast path and agree with the full path."""
    rng = random.Random(20261121)
    for _ in range(1500):
        value = _simple_value(rng)
        fast = message._simple_addresses([value])
        assert fast is not None, value
        assert fast == full_path([value]), value


def test_random_values_never_disagree():
    """On random strings of address-like pieces the fast path answers only where the full path agrees."""
    rng = random.Random(5322)
    answered = 0
    for _ in range(6000):
        value = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 14)))
        if rng.random() < 0.3:   # splice a piece into a simple list
            base = _simple_value(rng)
            cut = rng.randrange(len(base) + 1)
            value = base[:cut] + rng.choice(_PIECES) + base[cut:]
        fast = message._simple_addresses([value])
        if fast is not None:
            answered += 1
            assert fast == full_path([value]), value
    assert answered > 100   # the check above was not vacuous


def _outcome(raw: bytes):
    try:
        return message.parse_message(raw)
    except BadMessage as e:
        return ("BadMessage", str(e))


@pytest.mark.parametrize("to", SIMPLE + NOT_SIMPLE)
@pytest.mark.parametrize("sender", ["App <app@example.com>", "app@example.com", "bob@example.org<eve@example.net>"])
def test_parse_message_unchanged(monkeypatch, to, sender):
    """parse_message returns (or refuses with) exactly the same with and without the fast path."""
    raw = (f"From: {sender}\r\nTo: {to}\r\nCc: {SIMPLE[2]}\r\nSubject: x\r\n\r\nbody\r\n").encode()
    fast = _outcome(raw)
    monkeypatch.setattr(message, "_simple_addresses", lambda values: None)
    assert fast == _outcome(raw)


# -- the header fast path: _fast_fields agrees with compat32's HeaderParser --

def _parser_fields(header: bytes):
    from email.parser import HeaderParser
    from email.policy import compat32
    parsed = HeaderParser(policy=compat32).parsestr(header.decode("utf-8", "surrogateescape"))
    return parsed


HEADERS = [
    b"From: a@b.example\r\nTo: c@d.example\r\nSubject: hello\r\n",
    b"Subject:\r\n folded\r\n\tagain\r\nMessage-ID: <x@y>\r\n",
    b"Subject: \t  lead\r\nBcc: hidden@x.example\r\nbcc: two@x.example\r\n",
    b"Subject: trailing  \r\n \r\nX: y\r\n",
    b"X-Empty:\r\nSubject:  \r\n",
    b"A:b:c\r\nsubject: lower\r\nSUBJECT: upper\r\n",
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n",
    b"From sender Sat Jan  1\r\nSubject: x\r\n",             # unix-from: full path
    b" leading continuation\r\nSubject: x\r\n",              # full path
    b"Subject: x\r\nnot a field\r\nTo: a@b\r\n",             # full path
    b":no name\r\nSubject: x\r\n",                           # full path
    b"Subject : spaced name\r\n",                            # full path
    b"Subject: caf\xc3\xa9\r\n",                             # full path
    b"Subject: x\x0cy\r\n",                                  # full path
    b"Subject: x\r\nFrom a@b\r\n",                           # full path
]


def _check_same(header: bytes) -> None:
    fast = message._fast_fields(header)
    full = _parser_fields(header)
    if fast is None:
        return
    assert not full.defects, header
    assert fast._fields == list(full.items()), header
    for name in ("Subject", "subject", "Message-ID", "To", "From", "Bcc", "X", "missing"):
        assert fast.get(name) == full.get(name), (header, name)
        assert fast.get_all(name) == full.get_all(name), (header, name)
        assert (name in fast) == (name in full), (header, name)


@pytest.mark.parametrize("index", range(len(HEADERS)))
def test_fast_fields_table(index):
    """The first seven take the fast path and agree with HeaderParser; the rest take the full path."""
    header = HEADERS[index]
    assert (message._fast_fields(header) is None) == (index >= 7), header
    _check_same(header)


def test_fast_fields_random():
    rng = random.Random(20261121)
    pieces = ["Subject", "To", "bcc", "X-A", "From", "From ", ":", " ", "\t", "a", "b c", "=?x?=",
              "\r\n", "\r\n ", "\r\n\t", ":", "  ", "\xe9", "\x0b", "<m@id>", "Message-ID"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        header = (text.replace("\r\n\r\n", "\r\n") + "\r\n").encode("utf-8")
        if header.startswith(b"\r\n") or b"\r\n\r\n" in header:
            continue
        _check_same(header)
    # Mostly well-formed blocks, so that the fast path is taken often.
    lines = ["Subject: a", "subject:b", "To: x@y", "Bcc:", "X-A:  v ", "Message-ID: <m@id>",
             " cont", "\tcont ", "  ", "From: f@g", "A:b:c", "Subject: =?utf-8?q?a?=", "From x",
             "bad line", ":x", "X: \xe9"]
    taken = 0
    for _ in range(3000):
        block = "\r\n".join(rng.choice(lines) for _ in range(rng.randint(1, 8))) + "\r\n"
        header = block.encode("utf-8")
        taken += message._fast_fields(header) is not None
        _check_same(header)
    assert taken > 300


def test_parse_message_same_with_and_without_fast_fields(monkeypatch):
    raws = [b"From: a@b.example\r\nTo: c@d.example\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
            b"Message-ID:  <id@x> \r\nBcc: e@f.example\r\n\r\nbody\r\n",
            b"Subject: x\r\n folded\r\n\r\n",
            b"To: c@d.example\r\n"]
    for raw in raws:
        fast = message.parse_message(raw, sender="s@x.example", recipients=["r@y.example"])
        monkeypatch.setattr(message, "_fast_fields", lambda header: None)
        slow = message.parse_message(raw, sender="s@x.example", recipients=["r@y.example"])
        monkeypatch.undo()
        assert fast == slow


def _reference_normalise(raw: bytes) -> bytes:
    """normalise_line_endings as it was before the split-based long-line check."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in raw else raw
    if not text.endswith(b"\n"):
        text += b"\n"
    start = 0
    while start < len(text):
        end = text.find(b"\n", start)
        if end - start > message.MAX_LINE:
            line_no = text.count(b"\n", 0, start) + 1
            raise BadMessage(f"Line {line_no} of the message is "
                             f"{end - start} octets long; the limit is {message.MAX_LINE} (RFC 5322 section 2.1.1).")
        start = end + 1
    return text.replace(b"\n", b"\r\n")


def test_long_line_check_same_as_before():
    """normalise_line_endings refuses the first line over 998 octets, with its number and length."""
    rng = random.Random(998)
    for _ in range(500):
        lines = [b"x" * rng.choice([0, 1, 70, 997, 998, 999, 1500]) for _ in range(rng.randint(1, 6))]
        raw = rng.choice([b"\r\n", b"\n", b"\r"]).join(lines) + rng.choice([b"", b"\r\n"])
        try:
            want = _reference_normalise(raw)
        except BadMessage as e:
            with pytest.raises(BadMessage) as got:
                message.normalise_line_endings(raw)
            assert str(got.value) == str(e)
        else:
            assert message.normalise_line_endings(raw) == want


# -- parse_submitted: the listener's intake (envelope already validated) -----

SUBMITTED = [
    b"From: a@s.test\r\nTo: x@y.test\r\nSubject: hi\r\nMessage-ID: <1@s.test>\r\n\r\nbody\r\n",
    b"Subject: bcc\r\nBcc: hidden@y.test\r\n\r\nbody\r\n",
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nbare\nLF\n",
    b"no header at all\r\n",
]


@pytest.mark.parametrize("raw", SUBMITTED)
def test_parse_submitted_stores_what_parse_message_stores(raw):
    """Same data, subject and Message-ID as parse_message with the same envelope."""
    from relay.message import parse_message, parse_submitted
    envelope = dict(sender="a@s.test", recipients=["r@d.test", "r@D.TEST", "s@d.test"])
    assert parse_submitted(raw, **envelope) == parse_message(raw, **envelope)
    assert parse_submitted(raw, **envelope).recipients == ("r@d.test", "s@d.test")


def test_parse_submitted_null_sender_and_bad_content():
    from relay.errors import BadMessage
    from relay.message import parse_submitted
    assert parse_submitted(b"Subject: x\r\n\r\nhi\r\n", sender="", recipients=["r@d.test"]).sender == ""
    with pytest.raises(BadMessage):
        parse_submitted(b"Subject: x\r\n\r\n" + b"y" * 1000 + b"\r\n", sender="", recipients=["r@d.test"])
    with pytest.raises(BadMessage):
        parse_submitted(b"\r\n", sender="", recipients=["r@d.test"])
