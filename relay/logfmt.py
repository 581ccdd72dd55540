"""The Postfix-style delivery log line, one per recipient per attempt (SPEC "Logging").

``3F2A: to=<rcpt@example.com>, relay=mx.example[192.0.2.1]:25, delay=1.2,
attempts=2, status=deferred (451 4.3.0 try later)`` on a single line.
Pure string formatting; no I/O.
"""

from __future__ import annotations

import math
import re

from relay.model import State
from relay.replies import clean_text

__all__ = ["format_attempt", "format_delay", "relay_label", "status_word"]

_STATUS_WORDS = {
    State.DELIVERED: "sent",
    State.DEFERRED: "deferred",
    State.BOUNCED: "bounced",
}
# C0 and C1 controls, DEL, Unicode line and paragraph separators and the
# bidirectional overrides: none may reach a log line (addresses may be UTF-8).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def status_word(status: State | str) -> str:
    """``sent``, ``deferred`` or ``bounced`` for a final-attempt state.

    Accepts a :class:`State` (DELIVERED, DEFERRED, BOUNCED), its value, or
    one of the three words; anything else raises ``ValueError``.
    """
    if status in ("sent", "deferred", "bounced"):
        return str(status)
    try:
        return _STATUS_WORDS[State(status)]
    except (ValueError, KeyError):
        raise ValueError(f"no log status word for {status!r}") from None


def format_delay(delay: float) -> str:
    """Seconds for ``delay=``, like Postfix: two decimals under 1 s, one
    decimal under 10 s, whole seconds from 10 s; trailing zeros dropped;
    never scientific notation (0.05, 0.39, 1.2, 12, 86400).  Anything not
    positive, or under 5 ms, is ``0``.
    """
    if not delay > 0:  # negative (clock stepped back) or NaN
        return "0"
    if math.isinf(delay):
        return "inf"
    if delay < 1:
        text = f"{delay:.2f}"
    elif delay < 10:
        text = f"{delay:.1f}"
    else:
        return f"{delay:.0f}"
    return text.rstrip("0").rstrip(".") or "0"


def _one_line(text: str) -> str:
    return _CONTROL.sub("?", text)


def relay_label(host: str, address: str, port: int) -> str:
    """``mx.example[192.0.2.1]:25`` (IPv6: ``mx.example[::1]:25``); the
    address stands in for an empty host name; a trailing dot is dropped."""
    name = host.rstrip(".") or address
    return _one_line(f"{name}[{address}]:{port}")


def format_attempt(
    *,
    queue_id: str,
    recipient: str,
    relay: str | None,
    delay: float,
    attempts: int,
    status: State | str,
    reply: str,
    possible_duplicate: bool = False,
) -> str:
    """The log line for one recipient's attempt, without a line ending.

    *relay* is a :func:`relay_label` or None when no connection was made
    (``relay=none``).  *delay* is seconds since the message was queued,
    *attempts* counts this attempt, *status* is a State or word (see
    :func:`status_word`) and *reply* the SMTP reply line such as
    ``"451 4.3.0 try later"`` (CR, LF and other controls are flattened so
    the entry stays on one line).  *possible_duplicate* marks duplicate
    window W1 (no reply to the final dot) in the reason.
    """
    reason = clean_text(reply)
    if possible_duplicate:
        # The client's own reason may already say so ("... after the final
        # dot; the message may have been delivered"): not twice.
        note = ("possible duplicate" if "may have been delivered" in reason
                else "possible duplicate: the message may have been delivered")
        reason = f"{reason} -- {note}" if reason else note
    line = (
        f"{_one_line(queue_id)}: to=<{_one_line(recipient)}>, relay={_one_line(relay) if relay else 'none'}, "
        f"delay={format_delay(delay)}, attempts={attempts}, status={status_word(status)}"
    )
    return f"{line} ({reason})" if reason else line


def format_accepted(*, queue_id: str, sender: str, size: int, nrcpt: int, client: str,
                    user: str | None = None) -> str:
    """The log line for a message the submission listener queued, once it
    is committed: ``ID: from=<sender>, size=N, nrcpt=N, client=IP`` and,
    after AUTH, ``, sasl_username=NAME`` (Postfix's names for these)."""
    line = (f"{_one_line(queue_id)}: from=<{_one_line(sender)}>, size={size}, nrcpt={nrcpt}, "
            f"client={_one_line(client)}")
    return f"{line}, sasl_username={_one_line(user)}" if user else line
