"""Unit tests for relay.grouping: envelopes per destination, and expiry split."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from relay.grouping import MAX_RCPTS, group_envelopes, split_expired
from relay.model import ClaimedMessage, ClaimedRecipient

_ids = itertools.count(1)


def message(msg_id: str, *addresses: str, queued_at: float = 0.0) -> ClaimedMessage:
    """A claimed message with one claimed recipient per address."""
    recipients = tuple(
        ClaimedRecipient(id=next(_ids), message_id=msg_id, address=a, domain=a.rpartition("@")[2],
                         attempts=0, queued_at=queued_at)
        for a in addresses
    )
    return ClaimedMessage(id=msg_id, sender="s@example.org", data=b"Subject: x\r\n\r\nbody\r\n", size=20,
                          eight_bit=False, created_at=queued_at, recipients=recipients)


def same_domain(domain: str) -> str:
    """Each domain is its own destination (no routes)."""
    return domain


def summary(grouped):
    """{key: [(message id, [addresses]), ...]} for readable comparisons."""
    return {key: [(e.message.id, [r.address for r in e.recipients]) for e in envelopes]
            for key, envelopes in grouped.items()}


@pytest.mark.parametrize(
    ("messages", "destination_of", "expected"),
    [
        # one message, two domains: one envelope per domain, recipient order kept
        (
            [message("M1", "a@x.test", "b@y.test", "c@x.test")],
            same_domain,
            {"x.test": [("M1", ["a@x.test", "c@x.test"])], "y.test": [("M1", ["b@y.test"])]},
        ),
        # two messages to one domain: two envelopes (one transaction each) in message order
        (
            [message("M1", "a@x.test"), message("M2", "b@x.test", "c@x.test")],
            same_domain,
            {"x.test": [("M1", ["a@x.test"]), ("M2", ["b@x.test", "c@x.test"])]},
        ),
        # a "*" route covers every domain: one key, one envelope for the whole message
        (
            [message("M1", "a@x.test", "b@y.test", "c@z.test")],
            lambda domain: "*",
            {"*": [("M1", ["a@x.test", "b@y.test", "c@z.test"])]},
        ),
        # a route for one domain, MX (the domain itself) for the others
        (
            [message("M1", "a@x.test", "b@routed.test"), message("M2", "c@routed.test")],
            lambda domain: "smarthost" if domain == "routed.test" else domain,
            {"x.test": [("M1", ["a@x.test"])], "smarthost": [("M1", ["b@routed.test"]), ("M2", ["c@routed.test"])]},
        ),
        # keys appear in order of first use across messages
        (
            [message("M1", "a@y.test"), message("M2", "b@x.test", "c@y.test")],
            same_domain,
            {"y.test": [("M1", ["a@y.test"]), ("M2", ["c@y.test"])], "x.test": [("M2", ["b@x.test"])]},
        ),
        # a message with no claimed recipients yields nothing
        ([message("M1")], same_domain, {}),
        # no messages at all
        ([], same_domain, {}),
    ],
)
def test_group_envelopes(messages, destination_of, expected):
    """Recipients are partitioned per message by destination key, in a deterministic order."""
    grouped = group_envelopes(messages, destination_of)
    assert summary(grouped) == expected
    assert list(grouped) == list(expected)


@pytest.mark.parametrize(
    ("count", "max_rcpts", "sizes"),
    [
        (100, MAX_RCPTS, [100]),  # exactly the limit: one transaction
        (101, MAX_RCPTS, [100, 1]),  # one over: a second transaction
        (250, MAX_RCPTS, [100, 100, 50]),  # several chunks
        (5, 2, [2, 2, 1]),  # a smaller limit
        (3, 1, [1, 1, 1]),  # one recipient per transaction
    ],
)
def test_group_envelopes_splits_at_max_rcpts(count, max_rcpts, sizes):
    """No envelope carries more than max_rcpts recipients, and none is lost or reordered."""
    addresses = [f"u{i}@x.test" for i in range(count)]
    grouped = group_envelopes([message("M1", *addresses)], same_domain, max_rcpts)
    envelopes = grouped["x.test"]
    assert [len(e.recipients) for e in envelopes] == sizes
    assert [r.address for e in envelopes for r in e.recipients] == addresses
    assert all(e.message.id == "M1" for e in envelopes)


def test_group_envelopes_calls_destination_of_once_per_domain():
    """Routing is looked up once per distinct domain, however many recipients share it."""
    calls = []

    def destination_of(domain):
        calls.append(domain)
        return domain

    group_envelopes([message("M1", "a@x.test", "b@x.test", "c@y.test"), message("M2", "d@x.test")], destination_of)
    assert calls == ["x.test", "y.test"]


@pytest.mark.parametrize("max_rcpts", [0, -1])  # zero and negative limits are meaningless
def test_group_envelopes_rejects_bad_limit(max_rcpts):
    """A limit below one recipient raises ValueError."""
    with pytest.raises(ValueError):
        group_envelopes([message("M1", "a@x.test")], same_domain, max_rcpts)


def test_group_envelopes_keeps_claimed_recipient_objects():
    """Envelopes carry the very ClaimedRecipient values and message that were claimed."""
    msg = message("M1", "a@x.test")
    (envelope,) = group_envelopes([msg], same_domain)["x.test"]
    assert envelope.message is msg and envelope.recipients == msg.recipients
    assert envelope.sender == "s@example.org" and envelope.data == msg.data


DAY = 86400.0


def mixed_message():
    """M1 with one recipient queued at 0 (old) and one queued at 4 days (young)."""
    old = message("M1", "old@x.test", queued_at=0.0)
    young = message("M1", "young@y.test", queued_at=4 * DAY)
    return dataclasses.replace(old, recipients=old.recipients + young.recipients)


@pytest.mark.parametrize(
    ("now", "live", "expired"),
    [
        (1 * DAY, {"M1": ["old@x.test", "young@y.test"]}, {}),  # nothing expired yet
        (5 * DAY, {"M1": ["young@y.test"]}, {"M1": ["old@x.test"]}),  # exactly 5 days: the old one expires
        (9 * DAY, {}, {"M1": ["old@x.test", "young@y.test"]}),  # both expired: one message, one DSN
    ],
)
def test_split_expired(now, live, expired):
    """Expired recipients are split off per message, keeping order; live ones stay."""
    live_msgs, expired_msgs = split_expired([mixed_message()], now=now, max_lifetime=5 * DAY)
    assert {m.id: [r.address for r in m.recipients] for m in live_msgs} == live
    assert {m.id: [r.address for r in m.recipients] for m in expired_msgs} == expired


def test_split_expired_returns_untouched_messages_as_is():
    """A message with nothing expired is passed through unchanged, in input order."""
    first, second = message("M1", "a@x.test", queued_at=100.0), message("M2", "b@x.test", queued_at=50.0)
    live, expired = split_expired([first, second], now=120.0, max_lifetime=1000.0)
    assert live == [first, second] and live[0] is first and expired == []
