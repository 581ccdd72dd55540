"""SMTP replies to per-recipient outcomes: classification, enhanced status codes,
and the per-recipient reading of ``ESMTPClient.sentMail`` arguments.

Pure functions; no I/O.  SPEC ("Delivery semantics"): 2xx delivered, 4xx
deferred, 5xx bounced; a DSN's ``Status`` is the reply's enhanced code when
it has one, else ``X.0.0`` of the reply's class.
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from collections.abc import Sequence

from relay.model import State

__all__ = [
    "NO_FINAL_REPLY",
    "NO_RCPT_REPLY",
    "classify",
    "clean_text",
    "enhanced_status",
    "recipient_replies",
    "reply_class",
    "reply_line",
]

#: Given to a recipient whose RCPT TO has no recorded reply (should not happen).
NO_RCPT_REPLY = (451, "4.3.0 no reply to RCPT TO was recorded for this recipient")
#: Given to an accepted recipient when no reply to the message body arrived.
NO_FINAL_REPLY = (451, "4.3.0 no reply to the end of data was recorded")

# RFC 3463: class "." subject "." detail, at the start of the text.
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def reply_class(code: int) -> int:
    """The class digit of *code* (2, 4 or 5); anything else counts as 4 (temporary)."""
    klass = code // 100 if 200 <= code < 600 else 0
    return klass if klass in (2, 4, 5) else 4


def classify(code: int) -> State:
    """DELIVERED for 2xx, BOUNCED for 5xx, DEFERRED for 4xx and anything unexpected.

    A protocol oddity (-1, 0, 1xx, 3xx at a final stage, 6xx...) never
    delivers or bounces mail: it defers.
    """
    return {2: State.DELIVERED, 5: State.BOUNCED}.get(reply_class(code), State.DEFERRED)


def enhanced_status(code: int, text: str) -> str:
    """The RFC 3463 status of a reply, e.g. ``"5.1.1"``.

    The enhanced code at the start of *text* when there is one whose class
    matches the reply's class, written without leading zeros; otherwise
    ``"X.0.0"`` with X the reply's class (see :func:`reply_class`).
    """
    klass = reply_class(code)
    match = _ENHANCED.match(text)
    if match and int(match[1]) == klass:
        return f"{klass}.{int(match[2])}.{int(match[3])}"
    return f"{klass}.0.0"


def clean_text(text: str | bytes) -> str:
    """Reply text on one line: bytes decoded as UTF-8 (errors replaced), the
    lines of a multi-line reply joined with a space, control characters
    dropped and runs of white space collapsed."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return " ".join(_CONTROL.sub(" ", text).split())


def reply_line(code: int, text: str) -> str:
    """The reply as one line, ``"451 4.3.0 try later"`` (just the code when there is no text)."""
    text = clean_text(text)
    return f"{code} {text}" if text else str(code)


def _key(address: object) -> object:
    # Twisted hands back the very object getMailTo() gave it; normalise
    # str/bytes anyway so the two spellings of one address match.
    return address.decode("utf-8", errors="surrogateescape") if isinstance(address, bytes) else address


def recipient_replies(
    code: int,
    resp: bytes | str,
    addresses: Sequence[tuple[object, int, bytes]],
    recipients: Sequence[object],
    *,
    body_sent: bool = True,
) -> list[tuple[int, str]]:
    """One ``(code, text)`` per recipient from ``ESMTPClient.sentMail`` arguments.

    *addresses* is sentMail's list of ``(address, rcpt_code, rcpt_resp)`` in
    RCPT order; *recipients* are the objects given to ``getMailTo``.  The
    result is aligned with *recipients*:

    - *addresses* empty (MAIL FROM refused): every recipient gets
      ``(code, resp)``;
    - RCPT refused: the recipient keeps its RCPT reply;
    - RCPT accepted: the recipient gets the final reply ``(code, resp)``
      (to DATA or to the final dot).

    Never reports a delivery that cannot have happened: a 2xx with empty
    *addresses* (MAIL FROM answered with an unexpected 2xx), a 2xx final reply
    when *body_sent* is False (DATA answered 2xx instead of 354), or an
    accepted recipient with no final reply (*resp* is Twisted's str
    ``'No recipients accepted'``) all become a 4xx deferral.
    """
    text = clean_text(resp)
    if not addresses:
        if classify(code) is State.DELIVERED:
            return [(451, f"4.5.0 unexpected reply to MAIL FROM: {reply_line(code, text)}")] * len(recipients)
        return [(code, text)] * len(recipients)

    final: tuple[int, str]
    if isinstance(resp, str):  # Twisted's 'No recipients accepted': no DATA was sent
        final = NO_FINAL_REPLY
    elif not body_sent and classify(code) is State.DELIVERED:
        final = (451, f"4.5.0 unexpected reply to DATA: {reply_line(code, text)}")
    else:
        final = (code, text)

    rcpt_replies: defaultdict[object, deque[tuple[int, str]]] = defaultdict(deque)
    for address, rcpt_code, rcpt_resp in addresses:
        accepted = classify(rcpt_code) is State.DELIVERED
        rcpt_replies[_key(address)].append(final if accepted else (rcpt_code, clean_text(rcpt_resp)))

    result = []
    for recipient in recipients:
        pending = rcpt_replies.get(_key(recipient))
        result.append(pending.popleft() if pending else NO_RCPT_REPLY)
    return result
