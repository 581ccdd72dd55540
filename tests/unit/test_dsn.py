"""Unit tests for relay.dsn: RFC 3464 / RFC 6522 failure notifications."""

from __future__ import annotations

import email
import email.policy
import re
from email.utils import parsedate_to_datetime

import pytest

from relay.dsn import FailedRecipient, build_dsn, status_description

ORIGINAL = (
    b"From: Alice <alice@app.example>\r\n"
    b"To: bob@remote.example, carol@other.example\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <m1@app.example>\r\n"
    b"\r\n"
    b"SECRET BODY LINE\r\n"
    b"From: not-a-header@body.example\r\n"
)
ARRIVAL, NOW = 1_700_000_000.0, 1_700_003_600.0
FAILED = [
    FailedRecipient("bob@remote.example", "5.1.1", "550 5.1.1 no such user", "mx.remote.example"),
    FailedRecipient("Carol@Other.example", "4.4.7", None, None),  # expired; case kept
]


def build(**changes) -> bytes:
    """build_dsn with sensible defaults, overridden by *changes*."""
    arguments = {"original": ORIGINAL, "queue_id": "3F2A", "envelope_sender": "alice@app.example",
                 "failed": FAILED, "reporting_mta": "relay.example", "arrival_date": ARRIVAL, "now": NOW}
    return build_dsn(**{**arguments, **changes})


def parse(raw: bytes):
    """The DSN parsed the way a mail client would."""
    return email.message_from_bytes(raw, policy=email.policy.default)


def parts(raw: bytes):
    """The three parts of the report."""
    return list(parse(raw).iter_parts())


def test_top_level_headers():
    """The report is multipart/report; report-type=delivery-status, from MAILER-DAEMON to the sender."""
    msg = parse(build())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.example"
    assert msg["To"].addresses[0].addr_spec == "alice@app.example"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert "Undelivered" in msg["Subject"]
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["Date"].endswith("+0000")
    assert re.fullmatch(r"<[^<>@\s]+@relay\.example>", msg["Message-ID"])
    assert [p.get_content_type() for p in parts(build())] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_delivery_status_fields():
    """The message/delivery-status part round-trips: per-message fields, then one group per recipient."""
    status = parts(build())[1]
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.example"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert [dict(group.items()) for group in per_recipient] == [
        {
            "Final-Recipient": "rfc822; bob@remote.example",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; mx.remote.example",
            "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
        },
        {
            "Final-Recipient": "rfc822; Carol@Other.example",  # exact address, case kept
            "Action": "failed",
            "Status": "4.4.7",  # no Remote-MTA or Diagnostic-Code when unknown
        },
    ]


def test_original_headers_part_has_headers_only():
    """text/rfc822-headers holds the original header block and never the body."""
    raw = build()
    headers = parts(raw)[2]
    content = headers.get_content()
    assert content.replace("\r\n", "\n") == ORIGINAL.split(b"\r\n\r\n")[0].decode().replace("\r\n", "\n") + "\n"
    assert b"SECRET BODY LINE" not in raw
    assert b"not-a-header@body.example" not in raw


def test_readable_part_names_each_recipient_and_reason():
    """The human-readable part lists every failed recipient with its reason."""
    text = parts(build())[0].get_content()
    assert "<bob@remote.example>: host mx.remote.example said: 550 5.1.1 no such user" in text
    assert "<Carol@Other.example>: delivery time expired (status 4.4.7)" in text
    assert "3F2A" in text


LONG_WORD = "x" * 3000


@pytest.mark.parametrize(
    "changes",
    [
        {},  # the ordinary case
        # a very long diagnostic with spaces: folded
        {"failed": [FailedRecipient("b@r.example", "5.0.0", "550 " + "word " * 600, "mx.r.example")]},
        # a very long diagnostic without spaces: cut short
        {"failed": [FailedRecipient("b@r.example", "5.0.0", "550 5.0.0 " + LONG_WORD, "mx.r.example")]},
        # CR/LF and non-ASCII in the peer's reply
        {"failed": [FailedRecipient("b@r.example", "5.7.1", "550 5.7.1 d\u00e9sol\u00e9\r\nInjected: yes", "mx")]},
        # 8-bit original headers (RFC 6532 UTF-8 and invalid bytes)
        {"original": b"Subject: \xc3\xbcber\r\nX-Raw: \xff\r\n\r\nbody\r\n"},
        # NUL and ESC in ASCII original headers (not allowed in 7bit text)
        {"original": b"Subject: a\x00b\x1b[0m\r\n\r\nbody\r\n"},
        # an original header line far over 998 octets
        {"original": b"X-Long: " + b"y" * 5000 + b"\r\n\r\nbody\r\n"},
        # an original with no body at all (no empty line)
        {"original": b"Subject: only headers\r\n"},
        # an original with no headers (starts with the empty line)
        {"original": b"\r\nbody only\r\n"},
        # bare LF line endings in the original
        {"original": b"Subject: lf\nTo: x@y\n\nbody\n"},
        # a non-ASCII recipient (SMTPUTF8)
        {"failed": [FailedRecipient("j\u00f6rg@r.example", "5.6.7", None, None)]},
        # a long host name with a trailing dot
        {"failed": [FailedRecipient("b@r.example", "5.1.1", "550 5.1.1 no", "a" * 60 + ".example.")]},
    ],
)
def test_wire_format_is_valid(changes):
    """Whatever the inputs: CRLF only, ends with CRLF, every line <= 998 octets, 7-bit, and it parses."""
    raw = build(**changes)
    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert raw.isascii() and not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", raw)
    msg = parse(raw)
    assert not [d for part in msg.walk() for d in part.defects]
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    groups = list(msg.iter_parts())[1].get_payload()
    assert len(groups) == 1 + len(changes.get("failed", FAILED))


def test_long_diagnostic_is_folded_and_unfolds_to_the_reply():
    """A long reply with spaces is folded over several lines and reads back unchanged."""
    reply = "550 5.0.0 " + " ".join(f"w{i}" for i in range(100))
    raw = build(failed=[FailedRecipient("b@r.example", "5.0.0", reply, None)])
    group = parts(raw)[1].get_payload()[1]
    assert group["Diagnostic-Code"] == f"smtp; {reply}"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


def test_overlong_diagnostic_is_cut():
    """A reply too long for one field is truncated with a marker, keeping its start."""
    raw = build(failed=[FailedRecipient("b@r.example", "5.0.0", "550 5.0.0 " + LONG_WORD, None)])
    value = parts(raw)[1].get_payload()[1]["Diagnostic-Code"]
    assert value.startswith("smtp; 550 5.0.0 xxx") and value.endswith("...")
    assert len(value) < 998


def test_non_ascii_reply_is_made_ascii_in_the_report():
    """Non-ASCII reply text becomes '?' in Diagnostic-Code and CR/LF cannot add fields."""
    raw = build(failed=[FailedRecipient("b@r.example", "5.7.1", "550 5.7.1 d\u00e9j\u00e0\r\nInjected: yes", None)])
    group = parts(raw)[1].get_payload()[1]
    assert group["Diagnostic-Code"] == "smtp; 550 5.7.1 d?j? Injected: yes"
    assert group["Injected"] is None


def test_non_ascii_recipient_uses_utf8_address_type():
    """A non-ASCII recipient is written as an RFC 6533 utf-8 address with \\x{HEX} escapes."""
    raw = build(failed=[FailedRecipient("j\u00f6rg+tag@r.example", "5.6.7", None, None)])
    group = parts(raw)[1].get_payload()[1]
    assert group["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}tag@r.example"


def test_non_ascii_original_headers_are_encoded():
    """8-bit original headers are carried quoted-printable and decode to the original text."""
    original = "Subject: \u00fcber alles\r\nFrom: J\u00f6rg <j@a.example>\r\n\r\nbody\r\n".encode()
    headers = parts(build(original=original))[2]
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers.get_content().replace("\r\n", "\n") == "Subject: \u00fcber alles\nFrom: J\u00f6rg <j@a.example>\n"


def test_non_ascii_sender_gets_utf8_to_header():
    """A non-ASCII envelope sender appears in To as UTF-8 (RFC 6532); nothing else is 8-bit."""
    raw = build(envelope_sender="j\u00f6rg@app.example")
    assert not parse(raw).defects
    assert [line for line in raw.split(b"\r\n") if not line.isascii()] == ["To: j\u00f6rg@app.example".encode()]


def test_same_inputs_same_bytes_and_new_ids_over_time():
    """Output is a pure function of the inputs; a later DSN gets another Message-ID."""
    assert build() == build()
    assert parse(build())["Message-ID"] != parse(build(now=NOW + 1))["Message-ID"]
    other = [FailedRecipient("bob@remote.example", "5.1.1", None, None)]
    assert parse(build())["Message-ID"] != parse(build(failed=other))["Message-ID"]


def test_boundary_never_occurs_in_content():
    """If the original headers contain the chosen boundary, another boundary is used."""
    first = parse(build())
    boundary = first.get_boundary()
    original = f"Subject: trap\r\nX-Trap: --{boundary}\r\n\r\nbody\r\n".encode()
    msg = parse(build(original=original))
    assert msg.get_boundary() != boundary
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert f"--{boundary}" in list(msg.iter_parts())[2].get_content()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"envelope_sender": ""}, "null sender"),  # a bounce never bounces
        ({"failed": []}, "at least one"),  # nothing to report
        ({"failed": [FailedRecipient("b@r.example", "2.0.0", None, None)]}, "status"),  # success is not a failure
        ({"failed": [FailedRecipient("b@r.example", "5.01.1", None, None)]}, "status"),  # leading zero
        ({"failed": [FailedRecipient("b@r.example", "550", None, None)]}, "status"),  # a reply code, not a status
        ({"reporting_mta": ""}, "host name"),  # no MAILER-DAEMON domain
    ],
)
def test_build_dsn_rejects_bad_input(changes, message):
    """Inputs that cannot make a valid DSN raise ValueError."""
    with pytest.raises(ValueError, match=message):
        build(**changes)


@pytest.mark.parametrize(
    ("status", "has_description"),
    [
        ("4.4.7", True),  # expiry, which relay produces itself
        ("5.1.10", True),  # null MX
        ("5.9.9", False),  # unknown: no description
    ],
)
def test_status_description(status, has_description):
    """Known statuses have a short English explanation; others have none."""
    assert (status_description(status) is not None) is has_description
