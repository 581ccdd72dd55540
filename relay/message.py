"""Message intake: turn submitted bytes into a validated :class:`NewMessage`.

Pure functions, no I/O beyond reading an mbox file.  Policy (SPEC "Content"):
line endings are normalised to CRLF; a line over 998 octets or a malformed
address is refused with :class:`relay.errors.BadMessage` -- refused, never
repaired into something else.  Without explicit recipients they come from
To/Cc/Bcc (``sendmail -t``); Bcc header fields are always removed from what
is stored for delivery, and everything else is kept byte for byte.
"""

from __future__ import annotations

import mailbox
import re
from email.errors import InvalidHeaderDefect
from email.header import decode_header, make_header
from email.parser import HeaderParser
from email.policy import compat32
from email.policy import default as _STRICT
from email.utils import getaddresses
from typing import Iterable, Iterator, Sequence

from relay.errors import BadMessage, InputNotFound
from relay.model import NewMessage

MAX_LINE = 998          # octets, without CRLF (RFC 5321 §4.5.3.1.6, RFC 5322 §2.1.1)
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 254          # 256 including the angle brackets
MAX_RECIPIENTS = 10_000

# RFC 5321 Mailbox, with RFC 6531 UTF-8 allowed in atoms and domain labels.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010FFFF]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010FFFF]|\\[\x20-\x7e])*"'
_LABEL = r"(?:[A-Za-z0-9\u0080-\U0010FFFF](?:[A-Za-z0-9\-\u0080-\U0010FFFF]*[A-Za-z0-9\u0080-\U0010FFFF])?)"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]"
_MAILBOX = re.compile(rf"(?:{_DOT_ATOM}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})")
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f<> ]")


def validate_address(address: str, *, what: str = "address") -> str:
    """Return ``address`` unchanged if it is a valid RFC 5321 mailbox, else raise BadMessage.

    Surrounding angle brackets (``<a@b>``) are accepted and removed; nothing
    else is ever changed.
    """
    if not isinstance(address, str):
        raise BadMessage(f"The {what} {address!r} is not a string.")
    text = address
    if len(text) >= 2 and text[0] == "<" and text[-1] == ">":
        text = text[1:-1]
    if not text:
        raise BadMessage(f"The {what} is empty.")
    if _FORBIDDEN.search(text):
        raise BadMessage(f"The {what} {address!r} contains a control character, space or angle bracket.")
    if not _MAILBOX.fullmatch(text):
        raise BadMessage(f"The {what} {address!r} is not a valid email address.")
    local, _, domain = text.rpartition("@")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise BadMessage(f"The {what} {address!r} has a local part over {MAX_LOCAL_PART} octets.")
    if len(domain.encode()) > MAX_DOMAIN:
        raise BadMessage(f"The {what} {address!r} has a domain over {MAX_DOMAIN} octets.")
    if len(text.encode()) > MAX_PATH:
        raise BadMessage(f"The {what} {address!r} is longer than {MAX_PATH} octets.")
    return text


def validate_sender(sender: str) -> str:
    """An envelope sender: a valid mailbox, or ``"<>"``/``""`` for the null sender (returns ``""``)."""
    if sender in ("<>", ""):
        return ""
    return validate_address(sender, what="sender address")


def domain_of(address: str) -> str:
    """The lower-cased domain of a validated address."""
    return address.rpartition("@")[2].lower()


def normalise_line_endings(raw: bytes) -> bytes:
    """CRLF everywhere (bare LF and bare CR become CRLF), ending in CRLF; refuse long lines."""
    crlf = raw.count(b"\r\n")
    if crlf and raw.endswith(b"\r\n") and raw.count(b"\r") == crlf and raw.count(b"\n") == crlf:
        # Already CRLF throughout (SMTP submission): only the line lengths to check.
        if len(raw) > MAX_LINE + 2 and max(map(len, raw.split(b"\r\n"))) > MAX_LINE:
            return normalise_line_endings(raw.replace(b"\r\n", b"\n"))   # for the message naming the line
        return raw
    if b"\r" in raw:
        text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    else:
        text = raw
    if not text.endswith(b"\n"):
        text += b"\n"
    if len(text) > MAX_LINE + 1:   # cheap pre-check: a short message cannot have a long line
        lines = text.split(b"\n")
        if max(map(len, lines)) > MAX_LINE:
            for line_no, line in enumerate(lines, 1):
                if len(line) > MAX_LINE:
                    raise BadMessage(f"Line {line_no} of the message is {len(line)} octets long; "
                                     f"the limit is {MAX_LINE} (RFC 5322 section 2.1.1).")
    return text.replace(b"\n", b"\r\n")


def _split_header(data: bytes) -> tuple[bytes, bytes]:
    """Split CRLF data into (header block incl. its CRLFs, rest from the empty line on)."""
    if data.startswith(b"\r\n"):
        return b"", data
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 2], data[end + 2:]


def _strip_bcc(header: bytes) -> bytes:
    """Remove every Bcc field (with its continuation lines) from a CRLF header block."""
    if b"bcc" not in header.lower():
        return header
    out: list[bytes] = []
    skipping = False
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):          # continuation of the previous field
            if not skipping:
                out.append(line)
            continue
        skipping = re.match(rb"(?i)bcc[ \t]*:", line) is not None
        if not skipping:
            out.append(line)
    return b"\r\n".join(out)


def _decode(value: str | None) -> str | None:
    """Decode RFC 2047 encoded words; keep the raw value if that fails."""
    if value is None:
        return None
    try:
        return str(make_header(decode_header(value))).strip()
    except Exception:
        return value.strip()


def _check_address_list(value: str, field: str) -> None:
    """Refuse a header that is not a valid RFC 5322 address list.

    ``getaddresses`` (before Python 3.11.10/3.12.5, CVE-2023-27043) quietly
    repairs malformed fields, e.g. ``bob@example.org<eve@example.net>`` into
    two recipients; the strict header parser flags those as invalid.
    """
    unfolded = re.sub(r"\r\n|\r|\n", "", value)
    try:
        header = _STRICT.header_factory(field, unfolded)
        invalid = any(isinstance(d, InvalidHeaderDefect) for d in header.defects)
    except Exception:  # noqa: BLE001 - anything the parser cannot take is invalid
        invalid = True
    if invalid:
        raise BadMessage(f"The {field} header {unfolded.strip()!r} is not a valid address list.")


# The address lists nearly every message has, recognised without the email
# package's parsers (which cost ~70 us a header): items separated by commas,
# each a bare addr-spec or "[display name] <addr-spec>", where the addr-spec is
# a dot-atom @ a dot-atom and a display name is atoms separated by blanks or a
# quoted string without backslash, "@" or angle brackets.  "=" and "?" are left
# out so that no encoded word is involved.  For such a value the strict parser
# finds no defect and getaddresses returns exactly these addr-specs, in order
# (tests/unit/test_message_fastpath.py checks both against the parsers); any
# other value takes the full path.
_SIMPLE_ATEXT = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]"
_SIMPLE_ADDR = rf"{_SIMPLE_ATEXT}+(?:\.{_SIMPLE_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_NAME = rf'(?:{_SIMPLE_ATEXT}+(?:[ \t]+{_SIMPLE_ATEXT}+)*|"[\x20\x21\x23-\x3b\x41-\x5b\x5d-\x7e]*")'
_SIMPLE_ITEM = re.compile(
    rf"[ \t]*(?:(?P<bare>{_SIMPLE_ADDR})|(?:{_SIMPLE_NAME}[ \t]*)?<(?P<angle>{_SIMPLE_ADDR})>)[ \t]*(?:,(?=.)|\Z)")


def _simple_addresses(values: Sequence[object]) -> list[str] | None:
    """The addr-specs of header values that are all simple address lists, else None."""
    out: list[str] = []
    for value in values:
        if not isinstance(value, str):
            return None
        if "\r" in value:
            if '"' in value:      # getaddresses misreads a line fold inside a quoted string
                return None
            text = value.replace("\r\n ", " ").replace("\r\n\t", "\t")
        else:
            text = value
        if "\r" in text or "\n" in text or not text.strip():
            return None
        pos, end = 0, len(text)
        while pos < end:
            m = _SIMPLE_ITEM.match(text, pos)
            if m is None:
                return None
            out.append(m["bare"] or m["angle"])
            pos = m.end()
    return out


def _header_addresses(values: Iterable[str], field: str) -> list[str]:
    values = list(values)
    simple = _simple_addresses(values)
    if simple is not None:
        return [validate_address(addr, what=f"{field} address") for addr in simple]
    out: list[str] = []
    for value in values:
        _check_address_list(value, field)
    for _name, addr in getaddresses(values):
        if not addr:
            continue  # an empty group such as "undisclosed-recipients:;"
        out.append(validate_address(addr, what=f"{field} address"))
    return out


# The header blocks nearly every message has, parsed without the email
# package (HeaderParser costs ~30-40 us a message): printable ASCII, every
# line a field "name: value" (name: printable ASCII but ":", at least one
# octet) or a continuation line (starting with a blank), the first a field,
# no line starting with "From ".  For such a block compat32's HeaderParser
# finds exactly these fields with these values (see header_source_parse);
# anything else takes HeaderParser (tests/unit/test_message_fastpath.py
# compares the two).
_FAST_HEADER_OCTETS = b"\t\r\n" + bytes(range(0x20, 0x7f))
_FAST_FIELD = re.compile(r"[\x21-\x39\x3b-\x7e]+:")


class _Fields:
    """What parse_message asks of a parsed header: ``get``, ``get_all``, ``in`` (names case-insensitive)."""

    __slots__ = ("_fields", "_by_name")

    def __init__(self, fields: list[tuple[str, str]]):
        self._fields = fields
        by_name: dict[str, list[str]] = {}
        for k, v in fields:
            by_name.setdefault(k.lower(), []).append(v)
        self._by_name = by_name

    def get(self, name: str, failobj=None):
        values = self._by_name.get(name.lower())
        return values[0] if values else failobj

    def get_all(self, name: str, failobj=None):
        values = self._by_name.get(name.lower())
        return list(values) if values else failobj

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._by_name


def _fast_fields(header: bytes) -> _Fields | None:
    """The fields of a simple CRLF header block (see above), else None."""
    if not header or not header.endswith(b"\r\n") or header.translate(None, _FAST_HEADER_OCTETS):
        return None
    crlf = header.count(b"\r\n")
    if header.count(b"\r") != crlf or header.count(b"\n") != crlf:
        return None
    fields: list[tuple[str, str]] = []
    match = _FAST_FIELD.match
    name = None
    parts: list[str] = []
    for line in header[:-2].decode("ascii").split("\r\n"):
        first = line[:1]
        if first == " " or first == "\t":
            if name is None:
                return None
            parts.append(line)
            continue
        if not match(line) or line.startswith("From "):
            return None
        if name is not None:
            fields.append((name, "\r\n".join(parts).rstrip("\r\n")))
        name, _, value = line.partition(":")
        parts = [value.lstrip(" \t")]
    if name is not None:
        fields.append((name, "\r\n".join(parts).rstrip("\r\n")))
    return _Fields(fields)


def _parse_header(raw: bytes):
    """The message with CRLF line endings, its header fields and its header block."""
    if not raw.strip():
        raise BadMessage("The message is empty.")
    data = normalise_line_endings(raw)
    header, body = _split_header(data)
    parsed = _fast_fields(header)
    if parsed is None:
        parsed = HeaderParser(policy=compat32).parsestr(header.decode("utf-8", "surrogateescape"))
    if not header and parsed.defects:
        raise BadMessage("The message has no header.")
    return data, parsed, header, body


def _unique(rcpts: Sequence[str]) -> tuple[str, ...]:
    """Recipients without repeats (domains compared case-insensitively), within the limit."""
    unique: list[str] = []
    seen: set[str] = set()
    for r in rcpts:
        local, _, dom = r.rpartition("@")
        k = f"{local}@{dom.lower()}"
        if k not in seen:
            seen.add(k)
            unique.append(r)
    if not unique:
        raise BadMessage("The message has no recipient (no --to and no To, Cc or Bcc header).")
    if len(unique) > MAX_RECIPIENTS:
        raise BadMessage(f"The message has {len(unique)} recipients; the limit is {MAX_RECIPIENTS}.")
    return tuple(unique)


def _new_message(sender: str, recipients: tuple[str, ...], data: bytes, parsed, header: bytes, body: bytes,
                 idempotency_key: str | None) -> NewMessage:
    stored = _strip_bcc(header) + body if "Bcc" in parsed or "bcc" in parsed else data
    subject = _decode(parsed.get("Subject"))
    message_id = parsed.get("Message-ID")
    return NewMessage(
        sender=sender,
        recipients=recipients,
        data=stored,
        subject=subject[:998] if subject else subject,
        message_id=message_id.strip()[:998] if message_id else None,
        idempotency_key=idempotency_key,
    )


def parse_message(raw: bytes, *, sender: str | None = None,
                  recipients: Sequence[str] | None = None,
                  idempotency_key: str | None = None) -> NewMessage:
    """Validate one RFC 5322 message for the spool.

    ``sender``: the envelope sender (``"<>"`` for the null sender); None takes
    it from the From header.  ``recipients``: the envelope recipients; None or
    empty takes them from To/Cc/Bcc.  Raises BadMessage for anything invalid.
    """
    data, parsed, header, body = _parse_header(raw)

    if sender is None:
        froms = parsed.get_all("From") or []
        addrs = _simple_addresses(froms) if froms else None
        if addrs is None:
            for value in froms:
                _check_address_list(value, "From")
            addrs = [a for _n, a in getaddresses(froms) if a]
        if not addrs:
            raise BadMessage("The message has no From header and no --from was given.")
        env_sender = validate_address(addrs[0], what="From address")
    else:
        env_sender = validate_sender(sender)

    if recipients:
        rcpts = [validate_address(r, what="recipient address") for r in recipients]
    else:
        rcpts = (_header_addresses(parsed.get_all("To") or [], "To")
                 + _header_addresses(parsed.get_all("Cc") or [], "Cc")
                 + _header_addresses(parsed.get_all("Bcc") or [], "Bcc"))
    unique = _unique(rcpts)

    if idempotency_key is not None and (not idempotency_key or len(idempotency_key) > 255):
        raise BadMessage("The idempotency key must be 1 to 255 characters long.")
    return _new_message(env_sender, unique, data, parsed, header, body, idempotency_key)


def parse_submitted(raw: bytes, *, sender: str, recipients: Sequence[str]) -> NewMessage:
    """``parse_message`` for an SMTP transaction whose envelope was already
    validated command by command (``sender`` from ``validate_sender``, each
    recipient from ``validate_address``): only the content is checked."""
    data, parsed, header, body = _parse_header(raw)
    return _new_message(sender, _unique(recipients), data, parsed, header, body, None)


def read_mbox(path: str) -> Iterator[bytes]:
    """Yield the raw bytes of each message of an mbox file, in order."""
    import os
    if not os.path.exists(path):
        raise InputNotFound(f"The mbox file {path} does not exist.")
    if os.path.isdir(path):
        raise InputNotFound(f"The mbox file {path} is a directory.")
    box = mailbox.mbox(path, factory=None, create=False)
    try:
        for key in box.iterkeys():
            yield box.get_bytes(key)
    finally:
        box.close()
