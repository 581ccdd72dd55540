"""Unit tests for relay.backoff: retry delays, jitter, expiry."""

from __future__ import annotations

import math
import random

import pytest

from relay.backoff import (
    JITTER,
    expires_at,
    is_expired,
    next_attempt_at,
    retry_delay,
)

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0


def jitter_of(seed: int) -> float:
    """The jitter factor a fresh ``random.Random(seed)`` yields first."""
    return random.Random(seed).uniform(1 - JITTER, 1 + JITTER)


@pytest.mark.parametrize(
    ("failures", "initial", "maximum", "base"),
    [
        (1, 5 * MINUTE, 4 * HOUR, 5 * MINUTE),  # first failure: initial * 2**0
        (2, 5 * MINUTE, 4 * HOUR, 10 * MINUTE),  # second: doubled
        (3, 5 * MINUTE, 4 * HOUR, 20 * MINUTE),  # third: 2**2
        (6, 5 * MINUTE, 4 * HOUR, 160 * MINUTE),  # 2**5 = 32 -> 160 min, still under 4 h
        (7, 5 * MINUTE, 4 * HOUR, 4 * HOUR),  # 2**6 -> 320 min, capped at maximum
        (1000, 5 * MINUTE, 4 * HOUR, 4 * HOUR),  # 2**999 would still fit a float: capped
        (10**6, 5 * MINUTE, 4 * HOUR, 4 * HOUR),  # 2**999999 overflows a float: guarded, capped
        (1, 5 * MINUTE, 1 * MINUTE, 1 * MINUTE),  # maximum below initial wins even at first
        (4, 0.0, 4 * HOUR, 0.0),  # initial 0: retry at once
        (3, 1.5, 1000.0, 6.0),  # fractional seconds are kept
    ],
)
def test_retry_delay_is_capped_doubling_times_jitter(failures, initial, maximum, base):
    """The delay is min(maximum, initial * 2**(n-1)) times the rng's first uniform(0.9, 1.1) draw."""
    delay = retry_delay(failures, initial=initial, maximum=maximum, rng=random.Random(7))
    assert delay == pytest.approx(base * jitter_of(7), rel=1e-12)


def test_retry_delay_jitter_stays_within_ten_percent_and_spreads():
    """Over many seeds the jitter never leaves [0.9, 1.1] x base and covers most of that range."""
    ratios = [retry_delay(2, initial=100.0, maximum=1e9, rng=random.Random(s)) / 200.0 for s in range(2000)]
    assert min(ratios) >= 0.9 and max(ratios) <= 1.1
    assert min(ratios) < 0.91 and max(ratios) > 1.09


def test_retry_delay_same_seed_same_delay():
    """Two rngs with one seed give identical delays (no hidden global randomness)."""
    first = [retry_delay(n, initial=300.0, maximum=14400.0, rng=random.Random(42)) for n in range(1, 10)]
    second = [retry_delay(n, initial=300.0, maximum=14400.0, rng=random.Random(42)) for n in range(1, 10)]
    assert first == second


def test_retry_delay_is_finite_for_huge_initial():
    """An initial so large that doubling reaches inf still yields maximum x jitter, never inf or an error."""
    delay = retry_delay(2000, initial=1e300, maximum=4 * HOUR, rng=random.Random(1))
    assert math.isfinite(delay) and delay == pytest.approx(4 * HOUR * jitter_of(1))


@pytest.mark.parametrize(
    ("failures", "initial", "maximum"),
    [
        (0, 300.0, 14400.0),  # zero failures: nothing to back off from
        (-3, 300.0, 14400.0),  # negative failure count
        (1, -1.0, 14400.0),  # negative initial delay
        (1, 300.0, float("nan")),  # NaN maximum
        (1, float("inf"), 14400.0),  # infinite initial delay
    ],
)
def test_retry_delay_rejects_bad_arguments(failures, initial, maximum):
    """Impossible counts and durations raise ValueError instead of scheduling nonsense."""
    with pytest.raises(ValueError):
        retry_delay(failures, initial=initial, maximum=maximum, rng=random.Random(0))


@pytest.mark.parametrize(
    ("failures", "now", "queued_at", "max_lifetime", "expected"),
    [
        # far from expiry: now + the jittered delay (300 s base)
        (1, 1000.0, 0.0, 5 * DAY, 1000.0 + 300.0 * jitter_of(3)),
        # 4-hour delay would pass the expiry at 5 d: capped at queued_at + max_lifetime
        (20, 5 * DAY - 60.0, 0.0, 5 * DAY, 5 * DAY),
        # expiry 250 s away, closer than the shortest jittered first delay (270 s): capped
        (1, 1000.0, 1000.0, 250.0, 1250.0),
        # already past expiry: due now (never scheduled in the past)
        (3, 6 * DAY, 0.0, 5 * DAY, 6 * DAY),
    ],
)
def test_next_attempt_at_is_now_plus_delay_capped_at_expiry(failures, now, queued_at, max_lifetime, expected):
    """The next attempt is now + delay, no later than the expiry and no earlier than now."""
    at = next_attempt_at(
        failures, now=now, queued_at=queued_at, initial=300.0, maximum=4 * HOUR,
        max_lifetime=max_lifetime, rng=random.Random(3),
    )
    assert at == pytest.approx(expected, rel=1e-12)


def test_next_attempt_at_expiry_cap_is_seen_as_expired():
    """A recipient scheduled for its expiry is expired at exactly that time, despite float rounding."""
    queued_at, lifetime = 0.1, 0.2  # 0.1 + 0.2 != 0.3 in binary floating point
    at = next_attempt_at(5, now=0.25, queued_at=queued_at, initial=1.0, maximum=10.0,
                         max_lifetime=lifetime, rng=random.Random(0))
    assert at == expires_at(queued_at, lifetime)
    assert is_expired(queued_at, at, lifetime)


@pytest.mark.parametrize(
    ("queued_at", "now", "max_lifetime", "expired"),
    [
        (0.0, 5 * DAY - 1, 5 * DAY, False),  # one second before the end of the lifetime
        (0.0, 5 * DAY, 5 * DAY, True),  # exactly at the end: expired (bounced when claimed then)
        (0.0, 5 * DAY + 1, 5 * DAY, True),  # after the end
        (1000.0, 999.0, 0.0, False),  # clock behind queued_at with zero lifetime: not yet
        (1000.0, 1000.0, 0.0, True),  # zero lifetime: expired as soon as queued
    ],
)
def test_is_expired(queued_at, now, max_lifetime, expired):
    """A recipient expires when now reaches queued_at + max_lifetime."""
    assert is_expired(queued_at, now, max_lifetime) is expired


@pytest.mark.parametrize(
    "settings",
    [
        {"initial": -1.0, "maximum": 14400.0, "max_lifetime": DAY},  # negative initial
        {"initial": 300.0, "maximum": float("inf"), "max_lifetime": DAY},  # infinite maximum
        {"initial": 300.0, "maximum": 14400.0, "max_lifetime": -DAY},  # negative lifetime
    ],
)
def test_next_attempt_at_rejects_bad_settings(settings):
    """Negative or non-finite retry settings are refused, never turned into a schedule."""
    with pytest.raises(ValueError):
        next_attempt_at(1, now=0.0, queued_at=0.0, rng=random.Random(1), **settings)
