"""Plain values that cross the spool boundary.

Nothing here touches the database, the network or the clock.  Times are
POSIX timestamps (float seconds) chosen by the caller.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class State(str, enum.Enum):
    """A recipient's place in the queue (SPEC "Recipient states")."""

    QUEUED = "queued"        # waiting for its first try
    DEFERRED = "deferred"    # a temporary failure; waiting for its next try
    INFLIGHT = "inflight"    # claimed by a relayd (lease_owner, lease_expires_at)
    DELIVERED = "delivered"
    BOUNCED = "bounced"      # permanent failure or expired
    HELD = "held"            # kept out of delivery by an operator

    def __str__(self) -> str:
        return self.value


#: States in which a recipient still has to be delivered.
PENDING_STATES = (State.QUEUED, State.DEFERRED, State.INFLIGHT)
#: States that never change again.
FINAL_STATES = (State.DELIVERED, State.BOUNCED)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A validated message ready to be written to the spool.

    ``data`` is the message in RFC 5322 form with CRLF line endings, no line
    over 998 octets, ending in CRLF, *not* dot-stuffed.  Build it with
    :func:`relay.message.parse_message`, which validates everything.
    """

    sender: str                       # "" for the null sender <>
    recipients: tuple[str, ...]       # validated envelope addresses, in order, no duplicates
    data: bytes
    subject: str | None = None
    message_id: str | None = None     # the Message-ID header, if any
    idempotency_key: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def eight_bit(self) -> bool:
        """True when the content has octets above 127 (needs BODY=8BITMIME)."""
        return not self.data.isascii()


@dataclass(frozen=True, slots=True)
class ClaimedRecipient:
    """A recipient claimed for delivery by one relayd node."""

    id: int
    message_id: str
    address: str
    domain: str
    attempts: int          # failed or completed attempts so far (not counting this one)
    queued_at: float       # when its message was queued (for max_lifetime)


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    """A message with the recipients of it that one claim returned."""

    id: str
    sender: str
    data: bytes
    size: int
    eight_bit: bool
    created_at: float
    recipients: tuple[ClaimedRecipient, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one claimed recipient in one attempt.

    ``state`` is DELIVERED, DEFERRED or BOUNCED.  ``next_attempt_at`` is
    required for DEFERRED.  ``attempted`` is False when nothing was tried
    (e.g. expired before the attempt): no history row is written then and
    ``attempts`` is not incremented.
    """

    recipient_id: int
    state: State
    code: int | None = None
    response: str | None = None
    host: str | None = None
    next_attempt_at: float | None = None
    attempted: bool = True


@dataclass(frozen=True, slots=True)
class Attempt:
    """One row of a recipient's delivery history."""

    at: float
    host: str | None
    code: int | None
    response: str | None


@dataclass(frozen=True, slots=True)
class RecipientInfo:
    """A recipient as ``relayctl show`` presents it."""

    address: str
    domain: str
    state: State
    attempts: int
    next_attempt_at: float | None
    last_code: int | None
    last_response: str | None
    history: tuple[Attempt, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """A message as ``relayctl show`` / ``list`` present it."""

    id: str
    sender: str
    size: int
    created_at: float
    subject: str | None
    message_id: str | None
    recipients: tuple[RecipientInfo, ...]
    data: bytes | None = None   # only when asked for


@dataclass(frozen=True, slots=True)
class DomainCounts:
    domain: str
    queued: int = 0
    deferred: int = 0
    inflight: int = 0


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    """The numbers behind ``relayctl status``."""

    messages: int
    recipients: dict[str, int]
    oldest_pending_at: float | None
    next_attempt_at: float | None
    domains: tuple[DomainCounts, ...] = field(default=())


# -- delivery values (relayd) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """One SMTP transaction: a message and up to 100 of its recipients that
    share a destination.  ``recipients`` keeps the order in which RCPT TO is
    sent."""

    message: ClaimedMessage
    recipients: tuple[ClaimedRecipient, ...]

    @property
    def sender(self) -> str:
        return self.message.sender

    @property
    def data(self) -> bytes:
        return self.message.data


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The reply that decided one recipient's fate in one transaction.

    ``code`` is the SMTP reply code (2xx delivered, 4xx deferred, 5xx
    bounced); failures that are not SMTP replies (connection lost, timeout,
    TLS or extension problems) use the code an RFC 5321 client would assume
    (451, 421, 454, 554 ...) and a ``text`` that starts with an enhanced
    status code.  ``text`` is the reply text after the code, multi-line
    replies joined with a space.  ``possible_duplicate`` marks duplicate
    window W1: the final dot was sent but no reply arrived.
    """

    recipient: ClaimedRecipient
    code: int
    text: str
    possible_duplicate: bool = False


@dataclass(frozen=True, slots=True)
class HostFailure:
    """A mail host that could not take mail at all (refused, timed out,
    greeted 421/5xx, failed EHLO/HELO, TLS or AUTH): nothing was sent to it.

    ``try_next_host`` is True when SPEC says to fail over to the next MX
    (refusal, timeout, 421 or 5xx greeting).
    """

    code: int
    text: str
    try_next_host: bool = True
