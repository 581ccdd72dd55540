"""Failure delivery status notifications (bounces): RFC 3464 inside an RFC 6522
``multipart/report``, built with the stdlib ``email`` package.

Pure: the caller passes the clock readings; the Message-ID and MIME boundary
are derived from the inputs, so equal inputs give equal bytes.  The result
has CRLF line endings, ends with CRLF, has no line over 998 octets and is
7-bit, except that a non-ASCII envelope sender is written as UTF-8 in the
``To`` header (RFC 6532; such a DSN can only travel over SMTPUTF8 anyway).
"""

from __future__ import annotations

import email.policy
import hashlib
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime

from relay.replies import clean_text

__all__ = ["FailedRecipient", "build_dsn", "status_description"]

_STATUS = re.compile(r"[45]\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})")
_ODD_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # not allowed in 7bit text
_MAX_LINE = 998         # RFC 5322 §2.1.1, without the CRLF
_FOLD_AT = 78           # preferred line length for folded fields
_MAX_DIAGNOSTIC = 900   # longer diagnostics are cut; the field then still fits in 998 octets

#: Readable explanations of the statuses relay produces itself (and a few common ones).
_DESCRIPTIONS = {
    "4.4.7": "delivery time expired",
    "4.7.5": "no secure connection could be made",
    "5.1.1": "the mailbox does not exist",
    "5.1.2": "the recipient domain does not exist",
    "5.1.10": "the recipient domain accepts no mail (null MX)",
    "5.3.4": "the message is too big",
    "5.6.3": "the receiving server does not accept 8-bit messages",
    "5.6.7": "the receiving server does not accept non-ASCII addresses",
    "5.7.1": "delivery not authorized",
}


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient listed in a DSN.

    ``diagnostic`` is the full SMTP reply line (``"550 5.1.1 no such
    user"``) or None; ``remote_mta`` the host name that gave it, or None.
    """

    address: str
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None


def status_description(status: str) -> str | None:
    """A short English explanation of an enhanced status code, when one is known."""
    return _DESCRIPTIONS.get(status)


def _ascii(text: str) -> str:
    """*text* on one line, 7-bit: controls flattened, non-ASCII replaced by '?'."""
    return clean_text(text).encode("ascii", errors="replace").decode("ascii")


def _address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533 ``utf-8; ...`` with \\x{HEX} escapes when not ASCII."""
    if address.isascii() and not re.search(r"[\x00-\x20\x7f]", address):
        return f"rfc822; {address}"
    quoted = "".join(
        c if "\x21" <= c <= "\x7e" and c not in "+=\\" else f"\\x{{{ord(c):02X}}}" for c in address
    )
    return f"utf-8; {quoted}"


def _fold(name: str, value: str) -> str:
    """*value* folded at spaces so lines stay near 78 octets; never over 998."""
    words = value.split(" ")
    lines = [f"{name}: {words[0]}"]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) <= _FOLD_AT:
            lines[-1] += " " + word
        else:
            lines.append(" " + word)
    lines = [line[:_MAX_LINE] for line in lines]
    lines[0] = lines[0][len(name) + 2 :]
    return "\n".join(lines)


def _fields(*pairs: tuple[str, str | None]) -> Message:
    """One header block of a ``message/delivery-status`` body (None values left out)."""
    block = Message()  # compat32: values are written exactly as folded here
    for name, value in pairs:
        if value is not None:
            block[name] = _fold(name, value)
    return block


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))


def _header_block(original: bytes) -> bytes:
    """The original message's header section, up to (not including) the first empty line."""
    end = re.search(rb"(?:\A|\n)\r?\n", original)
    if end is None:
        return original
    return original[: end.start() + 1] if end.group().startswith(b"\n") else b""


def _text_part(policy: email.policy.EmailPolicy, text: str, subtype: str, description: str) -> MIMEPart:
    """A text part: 7bit when plain ASCII with short lines, else UTF-8 quoted-printable."""
    part = MIMEPart(policy=policy)
    plain = text.isascii() and not _ODD_CONTROL.search(text)
    if plain and all(len(line) <= _MAX_LINE for line in text.splitlines()):
        part.set_content(text, subtype=subtype, charset="us-ascii", cte="7bit")
    else:
        part.set_content(text, subtype=subtype, charset="utf-8", cte="quoted-printable")
    part["Content-Description"] = description
    return part


def _diagnostic(recipient: FailedRecipient) -> str | None:
    """The reply line, 7-bit, cut to _MAX_DIAGNOSTIC characters; None when unknown."""
    diagnostic = _ascii(recipient.diagnostic or "")
    if len(diagnostic) > _MAX_DIAGNOSTIC:
        diagnostic = diagnostic[: _MAX_DIAGNOSTIC - 3] + "..."
    return diagnostic or None


def _remote_mta(recipient: FailedRecipient) -> str | None:
    return _ascii(recipient.remote_mta or "").rstrip(".") or None


def _reason(recipient: FailedRecipient) -> str:
    said = _diagnostic(recipient)
    if said:
        remote = _remote_mta(recipient)
        return f"host {remote} said: {said}" if remote else said
    described = status_description(recipient.status) or "delivery failed"
    return f"{described} (status {recipient.status})"


def _explanation(reporting_mta: str, queue_id: str, failed: Sequence[FailedRecipient]) -> str:
    paragraphs = [
        f"This is the mail delivery system at {reporting_mta}.",
        "Your message could not be delivered to one or more of its recipients. "
        "They are listed below with the reason. The delivery report and the "
        "headers of your message are attached.",
        f"Queue ID: {queue_id}",
    ]
    listing = [
        textwrap.fill(
            f"<{clean_text(recipient.address)}>: {_reason(recipient)}",
            width=76,
            subsequent_indent="    ",
            break_long_words=True,
            break_on_hyphens=False,
        )
        for recipient in failed
    ]
    return "\n\n".join([*(textwrap.fill(p, width=76) for p in paragraphs), "\n".join(listing)]) + "\n"


def build_dsn(
    *,
    original: bytes,
    queue_id: str,
    envelope_sender: str,
    failed: Sequence[FailedRecipient],
    reporting_mta: str,
    arrival_date: float,
    now: float,
) -> bytes:
    """The bounce for *failed* recipients of the message *original*, as bytes.

    Addressed to *envelope_sender* from ``MAILER-DAEMON@<reporting_mta>``;
    queue it with the null sender.  Raises ``ValueError`` for the null sender
    (a bounce never causes a bounce), no recipients, or a status that is not
    a 4.x.x / 5.x.x code.
    """
    if not envelope_sender:
        raise ValueError("a message with the null sender <> never causes a DSN")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    for recipient in failed:
        if not _STATUS.fullmatch(recipient.status):
            raise ValueError(f"bad DSN status {recipient.status!r} for {recipient.address!r}")

    host = _ascii(reporting_mta).rstrip(".")
    if not host:
        raise ValueError("a DSN needs the reporting MTA's host name")
    seed = "\0".join([queue_id, repr(now), host] + [f"{r.address}\0{r.status}" for r in failed])
    digest = hashlib.sha256(seed.encode("utf-8", errors="surrogateescape")).hexdigest()
    policy = email.policy.SMTP.clone(refold_source="none", utf8=not envelope_sender.isascii())

    report = EmailMessage(policy=policy)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{host}>"
    report["To"] = envelope_sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = _date(now)
    local_part = ".".join(filter(None, [re.sub(r"[^A-Za-z0-9]", "", queue_id), str(int(now)), digest[:20]]))
    report["Message-ID"] = f"<{local_part}@{host}>"
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report"
    report.set_param("report-type", "delivery-status")

    status = MIMEPart(policy=policy)
    status["Content-Type"] = "message/delivery-status"
    status["Content-Description"] = "Delivery report"
    blocks = [_fields(("Reporting-MTA", f"dns; {host}"), ("X-Relay-Queue-ID", _ascii(queue_id)),
                      ("Arrival-Date", _date(arrival_date)))]
    for recipient in failed:
        remote, diagnostic = _remote_mta(recipient), _diagnostic(recipient)
        blocks.append(_fields(
            ("Final-Recipient", _address_field(recipient.address)),
            ("Action", "failed"),
            ("Status", recipient.status),
            ("Remote-MTA", f"dns; {remote}" if remote else None),
            ("Diagnostic-Code", f"smtp; {diagnostic}" if diagnostic else None),
        ))
    status.set_payload(blocks)

    explanation = _explanation(host, _ascii(queue_id), failed)
    headers = _header_block(original).decode("utf-8", errors="replace")
    report.set_payload([
        _text_part(policy, explanation, "plain", "Notification"),
        status,
        _text_part(policy, headers, "rfc822-headers", "Undelivered message headers"),
    ])
    report.preamble = "This is a MIME-encapsulated message."

    # "=_" never occurs in quoted-printable text; the 7bit parts are checked.
    boundary = f"=_{digest[20:44]}"
    while f"--{boundary}" in explanation or f"--{boundary}" in headers:
        boundary = "=_" + hashlib.sha256(boundary.encode()).hexdigest()[:24]
    report.set_boundary(boundary)
    return report.as_bytes()
