"""Retry timing for deferred recipients: exponential backoff with jitter, and expiry.

Pure functions: the caller passes the clock reading (``now``) and the
``random.Random`` used for jitter.  Times are POSIX timestamps in seconds.

SPEC ("Delivery semantics"): after the n-th failure the next try is
``min(maximum, initial * 2**(n-1))`` seconds later, with ±10 % jitter; a
recipient still undelivered ``max_lifetime`` after it was queued is bounced
(4.4.7).
"""

from __future__ import annotations

import math
import random

__all__ = ["JITTER", "expires_at", "is_expired", "next_attempt_at", "retry_delay"]

#: Relative jitter: the delay is multiplied by a uniform factor in [1 - JITTER, 1 + JITTER].
JITTER = 0.1

# 2.0 ** 1023 is the largest power of two a float holds; any larger exponent
# is capped by ``maximum`` anyway, so it is clamped here instead of overflowing.
_MAX_EXPONENT = 1023


def _check_duration(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")


def retry_delay(failures: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait after the *failures*-th failed attempt (1 for the first).

    ``min(maximum, initial * 2**(failures-1))`` times a jitter factor drawn
    uniformly from [0.9, 1.1] with *rng*, so the result may exceed *maximum*
    by up to 10 %.  Raises ``ValueError`` for ``failures < 1`` or a negative
    or non-finite duration.
    """
    if failures < 1:
        raise ValueError(f"failures counts the failed attempts so far and must be >= 1, not {failures!r}")
    _check_duration("initial", initial)
    _check_duration("maximum", maximum)
    exponent = min(failures - 1, _MAX_EXPONENT)
    base = min(maximum, initial * 2.0**exponent)  # inf only if initial is huge; min() caps it
    return base * rng.uniform(1.0 - JITTER, 1.0 + JITTER)


def expires_at(queued_at: float, max_lifetime: float) -> float:
    """The moment a recipient queued at *queued_at* expires (is bounced with 4.4.7)."""
    return queued_at + max_lifetime


def is_expired(queued_at: float, now: float, max_lifetime: float) -> bool:
    """True when *now* is at or past the expiry of a recipient queued at *queued_at*."""
    # Same expression as expires_at(), so a recipient scheduled for exactly its
    # expiry by next_attempt_at() is seen as expired when it is claimed then.
    return now >= expires_at(queued_at, max_lifetime)


def next_attempt_at(
    failures: int,
    *,
    now: float,
    queued_at: float,
    initial: float,
    maximum: float,
    max_lifetime: float,
    rng: random.Random,
) -> float:
    """When to try again after the *failures*-th failure at *now*.

    ``now + retry_delay(...)``, but never later than the recipient's expiry
    (``queued_at + max_lifetime``), so it is claimed again when it expires and
    bounced then; and never earlier than *now* (an already expired recipient
    is due at once).
    """
    _check_duration("max_lifetime", max_lifetime)
    delay = retry_delay(failures, initial=initial, maximum=maximum, rng=rng)
    return max(now, min(now + delay, expires_at(queued_at, max_lifetime)))
