"""Claimed recipients to SMTP transactions: grouping by destination, and expiry.

Pure functions; no I/O.  SPEC ("Grouping"): recipients of one message that
share a destination go in one SMTP transaction, up to 100 RCPTs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from relay.backoff import is_expired
from relay.model import ClaimedMessage, ClaimedRecipient, Envelope

__all__ = ["MAX_RCPTS", "group_envelopes", "split_expired"]

#: Most RCPT TO per transaction (RFC 5321 §4.5.3.1.8: servers take at least 100).
MAX_RCPTS = 100


def group_envelopes(
    messages: Sequence[ClaimedMessage],
    destination_of: Callable[[str], str],
    max_rcpts: int = MAX_RCPTS,
) -> dict[str, list[Envelope]]:
    """Envelopes per destination key.

    Each message's recipients are partitioned by ``destination_of(domain)``
    (a route name or the domain itself; several domains may share a key),
    keeping recipient order, and cut into envelopes of at most *max_rcpts*.
    Keys appear in order of first use, and each key's envelopes in message
    order.  *destination_of* is called once per distinct domain.
    """
    if max_rcpts < 1:
        raise ValueError(f"max_rcpts must be >= 1, not {max_rcpts!r}")
    keys: dict[str, str] = {}
    grouped: dict[str, list[Envelope]] = {}
    for message in messages:
        by_key: dict[str, list[ClaimedRecipient]] = {}
        for recipient in message.recipients:
            if recipient.domain not in keys:
                keys[recipient.domain] = destination_of(recipient.domain)
            by_key.setdefault(keys[recipient.domain], []).append(recipient)
        for key, recipients in by_key.items():
            envelopes = grouped.setdefault(key, [])
            for start in range(0, len(recipients), max_rcpts):
                envelopes.append(Envelope(message, tuple(recipients[start : start + max_rcpts])))
    return grouped


def split_expired(
    messages: Sequence[ClaimedMessage], *, now: float, max_lifetime: float
) -> tuple[list[ClaimedMessage], list[ClaimedMessage]]:
    """``(live, expired)``: the messages restricted to their live recipients,
    and to their expired ones (see :func:`relay.backoff.is_expired`).

    A message appears in a list only when it has recipients there, so each
    message in *expired* is one DSN (status 4.4.7) for the recipients it holds.
    """
    live: list[ClaimedMessage] = []
    expired: list[ClaimedMessage] = []
    for message in messages:
        expiry = [is_expired(r.queued_at, now, max_lifetime) for r in message.recipients]
        if not any(expiry):
            live.append(message)
            continue
        old = tuple(r for r, gone in zip(message.recipients, expiry) if gone)
        young = tuple(r for r, gone in zip(message.recipients, expiry) if not gone)
        if young:
            live.append(dataclasses.replace(message, recipients=young))
        expired.append(dataclasses.replace(message, recipients=old))
    return live, expired
