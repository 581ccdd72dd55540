"""The ISpool contract (relay/interfaces.py), run on SQLite and on PostgreSQL.

Every test takes the ``spool`` (or ``spool_url``) fixture, which is
parametrized over both dialects, so one suite holds every provider to the same
contract.  Time is always injected: the spool never reads the clock, so a
lease expires or a retry falls due because a later ``now`` is passed, never
because a test sleeps.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from zope.interface.verify import verifyObject

from relay.errors import MessageInFlight, SpoolUnavailable, UnknownMessage
from relay.interfaces import ISpool
from relay.message import parse_message
from relay.model import Attempt, ClaimedMessage, NewMessage, Outcome, State
from relay.spool import open_spool
from relay.spool import sql as spool_sql
from relay.spool.schema import attempts as attempts_table
from relay.spool.schema import messages as messages_table
from relay.spool.schema import recipients as recipients_table

T0 = 1000.0     # the queue time of most tests
LEASE = 60.0    # the lease most claims take


# -- helpers --------------------------------------------------------------


def new_message(*recipients: str, subject: str = "Hello", key: str | None = None,
                sender: str = "app@example.com", body: bytes = b"Hi there.\r\n") -> NewMessage:
    """A validated message to ``recipients`` (from its To header), built by parse_message."""
    raw = (f"From: Application <{sender}>\r\n"
           f"To: {', '.join(recipients)}\r\n"
           f"Subject: {subject}\r\n"
           f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n"
           f"\r\n").encode() + body
    return parse_message(raw, idempotency_key=key)


def enqueue_one(spool, *recipients: str, now: float = T0, **kwargs) -> str:
    """Queue one message and return its id."""
    return spool.enqueue([new_message(*recipients, **kwargs)], now)[0]


def recipient_ids(claimed: list[ClaimedMessage]) -> list[int]:
    """Every recipient id of a claim, in the order returned."""
    return [r.id for m in claimed for r in m.recipients]


def claim_one(spool, node: str = "node-a", now: float = T0, lease: float = LEASE) -> int:
    """Claim exactly one due recipient and return its id."""
    ids = recipient_ids(spool.claim(node, now, lease, limit=100))
    assert len(ids) == 1, ids
    return ids[0]


def states(spool, queue_id: str) -> list[State]:
    """The state of each recipient of a message, in recipient order."""
    return [r.state for r in spool.show(queue_id).recipients]


def row_count(spool, table) -> int:
    """Rows in one spool table (only for checking that nothing was left behind)."""
    with spool.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def assert_empty(spool) -> None:
    """The spool holds no message, recipient or attempt row at all."""
    status = spool.status(T0)
    assert status.messages == 0
    assert set(status.recipients.values()) == {0}
    assert [row_count(spool, t) for t in (messages_table, recipients_table, attempts_table)] == [0, 0, 0]


def deferred_once(spool, *recipients: str, now: float = T0, retry_at: float = T0 + 300) -> str:
    """Queue a message and record one deferred attempt for each recipient; return its id."""
    qid = enqueue_one(spool, *recipients, now=now)
    claimed = spool.claim("setup", now, LEASE, limit=100)
    spool.record("setup", now + 1, [
        Outcome(recipient_id=rid, state=State.DEFERRED, code=451, response="4.3.0 try later",
                host="mx.example.net", next_attempt_at=retry_at)
        for rid in recipient_ids(claimed)])
    return qid


# -- the interface --------------------------------------------------------


def test_provides_ispool(spool):
    """The spool declares and fully implements ISpool."""
    assert verifyObject(ISpool, spool)


def test_ping(spool):
    """A reachable spool answers ping."""
    assert spool.ping() is None


# -- enqueue --------------------------------------------------------------


def test_enqueue_returns_ids_in_input_order(spool):
    """A batch queues many messages in one call and returns their ids in input order."""
    batch = [new_message(f"user{n}@example.org", subject=f"message {n}") for n in range(25)]
    ids = spool.enqueue(batch, T0)
    assert len(ids) == len(set(ids)) == 25
    assert [spool.show(qid).subject for qid in ids] == [f"message {n}" for n in range(25)]
    assert spool.status(T0).messages == 25


def test_enqueue_empty_batch(spool):
    """Enqueueing no message returns no id and writes nothing."""
    assert spool.enqueue([], T0) == []
    assert_empty(spool)


def test_enqueued_message_and_recipients(spool):
    """A new message keeps its envelope and summary; its recipients start queued, untried, due now."""
    msg = new_message("a@example.org", "B@Example.NET", subject="Invoice 42")
    qid = spool.enqueue([msg], T0)[0]
    info = spool.show(qid)
    assert (info.id, info.sender, info.size, info.created_at) == (qid, "app@example.com", len(msg.data), T0)
    assert (info.subject, info.message_id) == ("Invoice 42", "<Invoice.42@example.com>")
    assert [(r.address, r.domain) for r in info.recipients] == [("a@example.org", "example.org"),
                                                                ("B@Example.NET", "example.net")]
    for r in info.recipients:
        assert (r.state, r.attempts, r.history, r.next_attempt_at) == (State.QUEUED, 0, (), T0)
        assert (r.last_code, r.last_response) == (None, None)


def test_idempotency_key_returns_first_id(spool):
    """A repeated idempotency key returns the first id and queues nothing new."""
    first = enqueue_one(spool, "a@example.org", key="order-1234", subject="first")
    again = spool.enqueue([new_message("b@example.org", key="order-1234", subject="second")], T0 + 5)
    assert again == [first]
    status = spool.status(T0 + 5)
    assert (status.messages, status.recipients["queued"]) == (1, 1)
    assert spool.show(first).subject == "first"


def test_idempotency_key_within_one_batch(spool):
    """Two messages of one batch with the same key are queued once and get the same id."""
    ids = spool.enqueue([new_message("a@example.org", key="k1"),
                         new_message("b@example.org", key="k1"),
                         new_message("c@example.org")], T0)
    assert ids[0] == ids[1] != ids[2]
    assert spool.status(T0).messages == 2
    assert [r.address for r in spool.show(ids[0]).recipients] == ["a@example.org"]


def _data_not_bytes(msg: NewMessage, monkeypatch) -> NewMessage:
    return replace(msg, data="text, not bytes")  # type: ignore[arg-type]


def _null_sender(msg: NewMessage, monkeypatch) -> NewMessage:
    return replace(msg, sender=None)  # type: ignore[arg-type]


def _null_domain(msg: NewMessage, monkeypatch) -> NewMessage:
    real = spool_sql.domain_of
    monkeypatch.setattr(spool_sql, "domain_of", lambda a: None if a.startswith("fail@") else real(a))
    return replace(msg, recipients=("fail@example.org",))


@pytest.mark.parametrize("spoil", [
    # rejected while binding parameters, before the INSERT of the messages runs
    _data_not_bytes,
    # a NOT NULL violation in the messages INSERT, after the good rows of the batch
    _null_sender,
    # an IntegrityError in the recipients INSERT, after every messages row was written
    _null_domain,
], ids=lambda spoil: spoil.__name__.strip("_"))
def test_enqueue_is_atomic(spool, spoil, monkeypatch):
    """A batch with one bad row fails as a whole and leaves nothing behind."""
    good = [new_message(f"user{n}@example.org", key=f"key-{n}") for n in range(5)]
    bad = spoil(new_message("last@example.org"), monkeypatch)
    with pytest.raises(Exception):   # the contract only promises "nothing was queued"
        spool.enqueue(good + [bad], T0)
    assert_empty(spool)
    # The idempotency keys of the failed batch were not consumed either.
    monkeypatch.undo()
    ids = spool.enqueue(good, T0 + 1)
    assert len(set(ids)) == 5 and spool.status(T0 + 1).messages == 5


# -- enqueue_claimed (relayd's listener hands its mail to its own drain) ----


def test_enqueue_claimed_queues_and_claims_in_one_step(spool):
    """The new recipients are in flight for the node, with the ids show() and record() know."""
    msgs = [new_message("a@example.org", "b@example.net", subject="one"), new_message("c@example.org", subject="two")]
    ids, claimed = spool.enqueue_claimed(msgs, T0, "node-a", LEASE)
    assert len(set(ids)) == 2 and [m.id for m in claimed] == ids
    assert [[r.address for r in m.recipients] for m in claimed] == [["a@example.org", "b@example.net"],
                                                                    ["c@example.org"]]
    assert [r.domain for r in claimed[0].recipients] == ["example.org", "example.net"]
    assert all(r.attempts == 0 and r.queued_at == T0 and r.message_id == m.id
               for m in claimed for r in m.recipients)
    assert claimed[0].data == msgs[0].data and claimed[0].sender == msgs[0].sender
    assert claimed[0].size == msgs[0].size and claimed[0].created_at == T0
    assert states(spool, ids[0]) == [State.INFLIGHT, State.INFLIGHT]
    assert spool.status(T0).recipients["inflight"] == 3
    # Nobody else gets them while the lease lives; the owner renews and records them.
    assert spool.claim("node-b", T0 + LEASE - 1, LEASE, limit=10) == []
    assert spool.renew("node-a", T0 + 1, LEASE) == 3
    first = claimed[0].recipients[0].id
    spool.record("node-a", T0 + 2, [Outcome(recipient_id=first, state=State.DELIVERED, code=250, response="ok")])
    assert states(spool, ids[0]) == [State.DELIVERED, State.INFLIGHT]


def test_enqueue_claimed_lease_expires_like_a_claim(spool):
    """If the node never records them (it died), they are claimed again after the lease."""
    ids, claimed = spool.enqueue_claimed([new_message("a@example.org")], T0, "node-a", LEASE)
    again = spool.claim("node-b", T0 + LEASE + 1, LEASE, limit=10)
    assert recipient_ids(again) == recipient_ids(claimed) and again[0].id == ids[0]
    assert spool.recover("node-a", T0 + LEASE + 2) == 0


def test_enqueue_claimed_recovered_by_its_node(spool):
    """A restarted node takes back what it queued claimed, as it does its claims."""
    ids, _ = spool.enqueue_claimed([new_message("a@example.org")], T0, "node-a", LEASE)
    assert spool.recover("node-a", T0 + 1) == 1
    assert states(spool, ids[0]) == [State.QUEUED]


def test_enqueue_claimed_known_idempotency_key_is_not_claimed(spool):
    """A message already in the spool (same idempotency key) keeps its id and is not claimed again."""
    first = enqueue_one(spool, "a@example.org", key="k-1")
    ids, claimed = spool.enqueue_claimed([new_message("a@example.org", key="k-1"),
                                          new_message("b@example.org", subject="new")], T0, "node-a", LEASE)
    assert ids[0] == first and [m.id for m in claimed] == [ids[1]]
    assert states(spool, first) == [State.QUEUED]


def test_enqueue_claimed_empty_batch(spool):
    assert spool.enqueue_claimed([], T0, "node-a", LEASE) == ([], [])


@pytest.mark.parametrize("spoil", [_data_not_bytes, _null_sender, _null_domain],
                         ids=lambda spoil: spoil.__name__.strip("_"))
def test_enqueue_claimed_is_atomic(spool, spoil, monkeypatch):
    """A batch with one bad row fails as a whole, leaves nothing behind, and the next one works."""
    good = [new_message(f"user{n}@example.org") for n in range(5)]
    bad = spoil(new_message("last@example.org"), monkeypatch)
    with pytest.raises(Exception):   # the contract only promises "nothing was queued"
        spool.enqueue_claimed(good + [bad], T0, "node-a", LEASE)
    assert_empty(spool)
    monkeypatch.undo()
    ids, claimed = spool.enqueue_claimed(good, T0 + 1, "node-a", LEASE)
    assert len(set(ids)) == 5 and len(claimed) == 5 and spool.status(T0 + 1).recipients["inflight"] == 5


# -- claims ---------------------------------------------------------------


def test_claim_groups_recipients_by_message(spool):
    """A claim returns each message once, with its body and its claimed recipients in order."""
    m1 = new_message("a1@a.example", "a2@b.example", "a3@a.example", subject="one")
    m2 = new_message("b1@c.example", subject="two", body="Grüße\r\n".encode())
    id1 = spool.enqueue([m1], T0)[0]
    id2 = spool.enqueue([m2], T0 + 1)[0]
    claimed = spool.claim("node-a", T0 + 10, LEASE, limit=10)
    assert [c.id for c in claimed] == [id1, id2]
    first, second = claimed
    assert (first.sender, first.data, first.size, first.eight_bit, first.created_at) == (
        "app@example.com", m1.data, len(m1.data), False, T0)
    assert (second.data, second.eight_bit, second.created_at) == (m2.data, True, T0 + 1)
    assert [(r.address, r.domain, r.message_id) for r in first.recipients] == [
        ("a1@a.example", "a.example", id1), ("a2@b.example", "b.example", id1),
        ("a3@a.example", "a.example", id1)]
    assert all((r.attempts, r.queued_at) == (0, T0) for r in first.recipients)
    assert len(set(recipient_ids(claimed))) == 4


def test_claim_sets_inflight(spool):
    """Claimed recipients are inflight and not returned again while the lease lives."""
    qid = enqueue_one(spool, "a@example.org", "b@example.org")
    spool.claim("node-a", T0, LEASE, limit=10)
    assert states(spool, qid) == [State.INFLIGHT, State.INFLIGHT]
    assert spool.status(T0).recipients["inflight"] == 2
    assert spool.claim("node-a", T0 + 1, LEASE, limit=10) == []


def test_claim_respects_limit_oldest_first(spool):
    """A claim takes at most ``limit`` recipients, the longest due first."""
    ids = [enqueue_one(spool, f"u{n}@example.org", now=T0 + n) for n in range(5)]
    first = spool.claim("node-a", T0 + 10, LEASE, limit=2)
    assert [c.id for c in first] == ids[:2]
    rest = spool.claim("node-a", T0 + 10, LEASE, limit=10)
    assert [c.id for c in rest] == ids[2:]


def test_claim_limit_counts_recipients(spool):
    """The limit counts recipients, so a claim may return part of a message."""
    qid = enqueue_one(spool, "a@example.org", "b@example.org", "c@example.org")
    claimed = spool.claim("node-a", T0, LEASE, limit=2)
    assert [c.id for c in claimed] == [qid]
    assert [r.address for r in claimed[0].recipients] == ["a@example.org", "b@example.org"]
    assert states(spool, qid) == [State.INFLIGHT, State.INFLIGHT, State.QUEUED]


def test_claim_excludes_domains(spool):
    """Recipients at an excluded domain are left for a later claim."""
    qid = enqueue_one(spool, "a@slow.example", "b@fast.example", "c@other.example")
    claimed = spool.claim("node-a", T0, LEASE, limit=10, exclude_domains=["slow.example", "other.example"])
    assert [r.address for r in claimed[0].recipients] == ["b@fast.example"]
    assert states(spool, qid) == [State.QUEUED, State.INFLIGHT, State.QUEUED]


def test_claim_skips_recipients_not_yet_due(spool):
    """A recipient queued for later is not claimed before that time."""
    enqueue_one(spool, "a@example.org", now=T0 + 100)
    assert spool.claim("node-a", T0 + 99, LEASE, limit=10) == []
    assert len(spool.claim("node-a", T0 + 100, LEASE, limit=10)) == 1


def test_claim_on_empty_spool(spool):
    """Claiming from an empty spool returns nothing."""
    assert spool.claim("node-a", T0, LEASE, limit=10) == []


def test_live_lease_is_not_claimed_by_another_node(spool):
    """While a lease lives no other node gets the recipient."""
    enqueue_one(spool, "a@example.org")
    claim_one(spool, "node-a", T0)
    assert spool.claim("node-b", T0 + LEASE - 1, LEASE, limit=10) == []


def test_expired_lease_is_claimed_by_another_node(spool):
    """Once the lease has expired another node claims the same recipient, attempts unchanged."""
    qid = enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    claimed = spool.claim("node-b", T0 + LEASE + 1, LEASE, limit=10)
    assert recipient_ids(claimed) == [rid]
    assert claimed[0].recipients[0].attempts == 0
    assert states(spool, qid) == [State.INFLIGHT]
    assert spool.renew("node-a", T0 + LEASE + 2, LEASE) == 0   # node-a lost it


def test_renew_extends_lease(spool):
    """After renewal the old expiry no longer frees the recipient; the new one does."""
    enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    assert spool.renew("node-a", T0 + 30, LEASE) == 1
    assert spool.claim("node-b", T0 + LEASE + 1, LEASE, limit=10) == []
    assert spool.claim("node-b", T0 + 30 + LEASE - 1, LEASE, limit=10) == []
    assert recipient_ids(spool.claim("node-b", T0 + 30 + LEASE, LEASE, limit=10)) == [rid]


def test_renew_only_named_recipients(spool):
    """Renewing some recipient ids leaves the other leases to expire."""
    enqueue_one(spool, "a@example.org", "b@example.org")
    kept, dropped = recipient_ids(spool.claim("node-a", T0, LEASE, limit=10))
    assert spool.renew("node-a", T0 + 30, LEASE, recipient_ids=[kept]) == 1
    assert recipient_ids(spool.claim("node-b", T0 + LEASE + 1, LEASE, limit=10)) == [dropped]


def test_renew_by_another_node_extends_nothing(spool):
    """A node cannot renew leases it does not hold."""
    enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    assert spool.renew("node-b", T0 + 30, LEASE) == 0
    assert spool.renew("node-b", T0 + 30, LEASE, recipient_ids=[rid]) == 0
    assert recipient_ids(spool.claim("node-c", T0 + LEASE, LEASE, limit=10)) == [rid]


# -- release and recover --------------------------------------------------


def _give_back(spool, how: str, node: str, ids: list[int], now: float) -> int:
    if how == "release":
        return spool.release(node, ids, now)
    return spool.recover(node, now)


@pytest.mark.parametrize("how", ["release", "recover"])
@pytest.mark.parametrize("tried, expected", [
    # never attempted: back to queued
    (False, State.QUEUED),
    # one deferred attempt before this claim: back to deferred
    (True, State.DEFERRED),
])
def test_give_back_claim(spool, how, tried, expected):
    """Released or recovered recipients are queued (never tried) or deferred, and due at once."""
    if tried:
        qid = deferred_once(spool, "a@example.org", retry_at=T0 + 300)
        now = T0 + 300
    else:
        qid = enqueue_one(spool, "a@example.org")
        now = T0
    rid = claim_one(spool, "node-a", now)
    back = now + 5
    assert _give_back(spool, how, "node-a", [rid], back) == 1
    info = spool.show(qid).recipients[0]
    assert (info.state, info.attempts, info.next_attempt_at) == (expected, int(tried), back)
    assert recipient_ids(spool.claim("node-b", back, LEASE, limit=10)) == [rid]


@pytest.mark.parametrize("how", ["release", "recover"])
def test_give_back_only_by_owner(spool, how):
    """Another node cannot release or recover a claim it does not hold."""
    qid = enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    assert _give_back(spool, how, "node-b", [rid], T0 + 5) == 0
    assert states(spool, qid) == [State.INFLIGHT]
    assert spool.claim("node-b", T0 + 5, LEASE, limit=10) == []


def test_release_some_and_recover_the_rest(spool):
    """release gives back only the named recipients; recover takes back all the node still holds."""
    enqueue_one(spool, "a@example.org", "b@example.org", "c@example.org")
    a, b, c = recipient_ids(spool.claim("node-a", T0, LEASE, limit=10))
    assert spool.release("node-a", [a], T0 + 1) == 1
    assert spool.release("node-a", [], T0 + 1) == 0
    assert spool.recover("node-a", T0 + 2) == 2
    assert spool.recover("node-a", T0 + 3) == 0
    assert sorted(recipient_ids(spool.claim("node-b", T0 + 3, LEASE, limit=10))) == sorted([a, b, c])


# -- record ---------------------------------------------------------------


@pytest.mark.parametrize("state, code, response, next_at", [
    # a 2xx to RCPT and to the final dot
    (State.DELIVERED, 250, "2.0.0 Ok: queued as 4Xyz", None),
    # a 4xx: tried again at next_attempt_at
    (State.DEFERRED, 451, "4.3.0 Try again later", T0 + 300),
    # a 5xx: final
    (State.BOUNCED, 550, "5.1.1 No such user", None),
])
def test_record_outcome(spool, state, code, response, next_at):
    """An attempted outcome sets the state and last reply, counts the attempt and adds a history row."""
    qid = enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    out = Outcome(recipient_id=rid, state=state, code=code, response=response,
                  host="mx1.example.org[192.0.2.1]", next_attempt_at=next_at)
    assert spool.record("node-a", T0 + 5, [out]) == []
    info = spool.show(qid).recipients[0]
    assert (info.state, info.attempts, info.last_code, info.last_response) == (state, 1, code, response)
    assert info.next_attempt_at == next_at
    assert info.history == (Attempt(at=T0 + 5, host="mx1.example.org[192.0.2.1]", code=code, response=response),)
    assert spool.status(T0 + 5).recipients[state.value] == 1
    assert spool.status(T0 + 5).recipients["inflight"] == 0


def test_record_a_batch_of_outcomes(spool):
    """One record call settles recipients of several messages at once."""
    id1 = enqueue_one(spool, "a@example.org", "b@example.org")
    id2 = enqueue_one(spool, "c@example.net")
    a, b, c = recipient_ids(spool.claim("node-a", T0, LEASE, limit=10))
    spool.record("node-a", T0 + 5, [
        Outcome(recipient_id=a, state=State.DELIVERED, code=250, response="2.0.0 Ok"),
        Outcome(recipient_id=b, state=State.BOUNCED, code=550, response="5.1.1 Unknown"),
        Outcome(recipient_id=c, state=State.DEFERRED, code=421, response="4.4.2 Bye", next_attempt_at=T0 + 60),
    ])
    assert states(spool, id1) == [State.DELIVERED, State.BOUNCED]
    assert states(spool, id2) == [State.DEFERRED]


def test_record_outcomes_shared_by_many_recipients(spool):
    """Outcomes that write the same values (record groups them into one statement) give each
    recipient its own state, attempt count and history row, and skip recipients not held."""
    qid = enqueue_one(spool, *[f"r{n}@example.org" for n in range(7)])
    ids = recipient_ids(spool.claim("node-a", T0, LEASE, limit=10))
    spool.release("node-a", ids[6:], T0 + 1)           # the last one is no longer ours
    sent = dict(state=State.DELIVERED, code=250, response="2.0.0 Ok", host="mx1.example.org[192.0.2.1]:25")
    later = dict(state=State.DEFERRED, code=451, response="4.3.0 later", host="mx1.example.org[192.0.2.1]:25",
                 next_attempt_at=T0 + 300)
    spool.record("node-a", T0 + 5, [
        Outcome(recipient_id=ids[0], **sent), Outcome(recipient_id=ids[1], **later),
        Outcome(recipient_id=ids[2], **sent), Outcome(recipient_id=ids[3], **later),
        Outcome(recipient_id=ids[4], **sent),
        Outcome(recipient_id=ids[5], state=State.BOUNCED, code=554, response="4.4.7 Delivery time expired",
                attempted=False),
        Outcome(recipient_id=ids[6], **sent),
    ])
    info = spool.show(qid).recipients
    assert [(r.state, r.attempts, r.last_code, r.next_attempt_at) for r in info] == [
        (State.DELIVERED, 1, 250, None), (State.DEFERRED, 1, 451, T0 + 300),
        (State.DELIVERED, 1, 250, None), (State.DEFERRED, 1, 451, T0 + 300),
        (State.DELIVERED, 1, 250, None), (State.BOUNCED, 0, 554, None),
        (State.QUEUED, 0, None, T0 + 1)]
    assert [r.history for r in info[:2]] == [
        (Attempt(at=T0 + 5, host="mx1.example.org[192.0.2.1]:25", code=250, response="2.0.0 Ok"),),
        (Attempt(at=T0 + 5, host="mx1.example.org[192.0.2.1]:25", code=451, response="4.3.0 later"),)]
    assert row_count(spool, attempts_table) == 5


def test_deferred_recipient_is_due_at_next_attempt_at(spool):
    """A deferred recipient is not claimable before its next_attempt_at and is claimable at it."""
    enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    spool.record("node-a", T0 + 5, [Outcome(recipient_id=rid, state=State.DEFERRED, code=451,
                                            response="4.3.0 later", next_attempt_at=T0 + 900)])
    assert spool.status(T0 + 5).next_attempt_at == T0 + 900
    assert spool.claim("node-a", T0 + 899, LEASE, limit=10) == []
    claimed = spool.claim("node-b", T0 + 900, LEASE, limit=10)
    assert recipient_ids(claimed) == [rid]
    assert claimed[0].recipients[0].attempts == 1


def test_attempts_accumulate_history(spool):
    """Each attempt adds one history row, oldest first, and increments attempts."""
    qid = enqueue_one(spool, "a@example.org")
    now = T0
    for n, host in enumerate(["mx1.example.org", "mx2.example.org"]):
        rid = claim_one(spool, "node-a", now)
        spool.record("node-a", now + 1, [Outcome(recipient_id=rid, state=State.DEFERRED, code=451,
                                                 response=f"4.3.0 busy {n}", host=host,
                                                 next_attempt_at=now + 100)])
        now += 100
    rid = claim_one(spool, "node-a", now)
    spool.record("node-a", now + 1, [Outcome(recipient_id=rid, state=State.DELIVERED, code=250,
                                             response="2.0.0 Ok", host="mx1.example.org")])
    info = spool.show(qid).recipients[0]
    assert (info.state, info.attempts, info.next_attempt_at) == (State.DELIVERED, 3, None)
    assert [(h.at, h.host, h.code, h.response) for h in info.history] == [
        (T0 + 1, "mx1.example.org", 451, "4.3.0 busy 0"),
        (T0 + 101, "mx2.example.org", 451, "4.3.0 busy 1"),
        (T0 + 201, "mx1.example.org", 250, "2.0.0 Ok")]
    assert spool.claim("node-a", now + 10_000, LEASE, limit=10) == []


@pytest.mark.parametrize("state, next_at", [
    # expired before it was tried (4.4.7): bounced without an attempt
    (State.BOUNCED, None),
    # not tried this time (e.g. the domain was throttled): deferred without an attempt
    (State.DEFERRED, T0 + 300),
])
def test_record_without_attempt(spool, state, next_at):
    """An outcome with attempted=False writes no history and does not count an attempt."""
    qid = enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    spool.record("node-a", T0 + 5, [Outcome(recipient_id=rid, state=state, code=None,
                                            response="4.4.7 Delivery time expired",
                                            next_attempt_at=next_at, attempted=False)])
    info = spool.show(qid).recipients[0]
    assert (info.state, info.attempts, info.history) == (state, 0, ())
    assert info.last_response == "4.4.7 Delivery time expired"
    assert row_count(spool, attempts_table) == 0


def test_record_ignores_outcome_after_lease_taken(spool):
    """An outcome from a node whose lease expired and was taken by another node is ignored."""
    qid = enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    assert recipient_ids(spool.claim("node-b", T0 + LEASE + 1, LEASE, limit=10)) == [rid]
    late = Outcome(recipient_id=rid, state=State.DELIVERED, code=250, response="2.0.0 Ok", host="mx")
    assert spool.record("node-a", T0 + LEASE + 2, [late]) == []
    info = spool.show(qid).recipients[0]
    assert (info.state, info.attempts, info.history) == (State.INFLIGHT, 0, ())
    spool.record("node-b", T0 + LEASE + 3, [Outcome(recipient_id=rid, state=State.BOUNCED, code=550,
                                                    response="5.1.1 Unknown", host="mx")])
    info = spool.show(qid).recipients[0]
    assert (info.state, info.attempts, len(info.history)) == (State.BOUNCED, 1, 1)


def test_record_ignores_recipient_not_claimed(spool):
    """An outcome for a recipient nobody claimed changes nothing."""
    qid = enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    spool.release("node-a", [rid], T0 + 1)
    spool.record("node-a", T0 + 2, [Outcome(recipient_id=rid, state=State.DELIVERED, code=250)])
    assert states(spool, qid) == [State.QUEUED]


def test_record_queues_new_messages(spool):
    """Bounces given to record are queued with the outcomes, and their ids returned in order."""
    enqueue_one(spool, "a@example.org", "b@example.org")
    a, b = recipient_ids(spool.claim("node-a", T0, LEASE, limit=10))
    dsn1 = parse_message(b"From: MAILER-DAEMON@relay.example\r\nTo: app@example.com\r\n"
                         b"Subject: Undelivered Mail (1)\r\n\r\nSorry.\r\n", sender="<>")
    dsn2 = replace(dsn1, subject="Undelivered Mail (2)")
    ids = spool.record("node-a", T0 + 5, [
        Outcome(recipient_id=a, state=State.BOUNCED, code=550, response="5.1.1 Unknown", host="mx"),
        Outcome(recipient_id=b, state=State.BOUNCED, code=550, response="5.1.1 Unknown", host="mx"),
    ], new_messages=[dsn1, dsn2])
    assert len(ids) == 2
    assert [spool.show(i).subject for i in ids] == ["Undelivered Mail (1)", "Undelivered Mail (2)"]
    bounce = spool.show(ids[0])
    assert (bounce.sender, bounce.created_at) == ("", T0 + 5)
    assert [(r.address, r.state) for r in bounce.recipients] == [("app@example.com", State.QUEUED)]
    assert [c.id for c in spool.claim("node-a", T0 + 5, LEASE, limit=10)] == ids


def test_free_space_floor_refuses_new_mail_but_not_outcomes_or_bounces(spool_url):
    """spool.min_free_space (SQLite): with less free than the floor, enqueue and
    enqueue_claimed raise a "full" SpoolUnavailable and write nothing, while
    record (outcomes and the bounces it queues) goes on.  PostgreSQL's disk
    is not visible: the floor is not checked there."""
    spool = open_spool(spool_url, busy_timeout=2.0, min_free_space=1)
    try:
        qid = enqueue_one(spool, "a@example.org", key="first")
        rid = claim_one(spool, "node-a", T0)
        if spool.dialect != "sqlite":
            assert spool.free_space is None
            return
        spool.free_space.floor = 10 ** 18              # more than any file system has free
        # A client retrying with a key already queued gets its first id: nothing new is written.
        assert spool.enqueue([new_message("a@example.org", key="first")], T0) == [qid]
        for attempt in (lambda: spool.enqueue([new_message("b@example.org")], T0),
                        lambda: spool.enqueue_claimed([new_message("c@example.org")], T0, "node-a", LEASE),
                        lambda: spool.enqueue([new_message("d@example.org", key="k1")], T0)):
            with pytest.raises(SpoolUnavailable, match=r" is full: .* free on its file system, and "
                                                       r".* is kept free for delivery \(spool.min_free_space\)"):
                attempt()
        assert spool.status(T0).messages == 1
        dsn = parse_message(b"From: MAILER-DAEMON@relay.example\r\nTo: app@example.com\r\n"
                            b"Subject: Undelivered Mail\r\n\r\nSorry.\r\n", sender="<>")
        [bounce] = spool.record("node-a", T0 + 1, [
            Outcome(recipient_id=rid, state=State.BOUNCED, code=550, response="5.1.1 Unknown", host="mx")],
            new_messages=[dsn])
        assert states(spool, qid) == [State.BOUNCED]
        assert spool.show(bounce).subject == "Undelivered Mail"
        spool.free_space.floor = 1
        assert spool.enqueue([new_message("b@example.org")], T0 + 2)
    finally:
        spool.close()


def test_record_is_one_transaction(spool):
    """When a new message cannot be queued, the outcomes of the same call are not recorded either."""
    qid = enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    broken = replace(new_message("app@example.com"), data="not bytes")  # type: ignore[arg-type]
    with pytest.raises(Exception):   # the contract only promises that nothing is half-written
        spool.record("node-a", T0 + 5, [Outcome(recipient_id=rid, state=State.BOUNCED, code=550,
                                                response="5.1.1 Unknown", host="mx")],
                     new_messages=[broken])
    info = spool.show(qid).recipients[0]
    assert (info.state, info.attempts, info.history) == (State.INFLIGHT, 0, ())
    assert spool.status(T0 + 5).messages == 1


# -- status ---------------------------------------------------------------


def test_status_of_empty_spool(spool):
    """An empty spool has no messages, zero in every state and no times."""
    status = spool.status(T0)
    assert status.messages == 0
    assert status.recipients == {s.value: 0 for s in State}
    assert (status.oldest_pending_at, status.next_attempt_at, status.domains) == (None, None, ())


def test_status_counts(spool):
    """status counts recipients per state and messages, and finds the oldest pending and next retry."""
    done = enqueue_one(spool, "d1@done.example", now=T0 - 500)
    rid = claim_one(spool, "node-a", T0 - 500)
    spool.record("node-a", T0 - 499, [Outcome(recipient_id=rid, state=State.DELIVERED, code=250)])
    held = enqueue_one(spool, "h@held.example", now=T0 - 400)
    spool.hold(held, T0 - 400)                                          # held: not pending
    deferred_once(spool, "x1@busy.example", now=T0 - 300, retry_at=T0 + 700)
    deferred_once(spool, "x2@busy.example", now=T0 - 200, retry_at=T0 + 600)
    enqueue_one(spool, "q1@busy.example", "q2@alpha.example", "q3@zulu.example", now=T0 - 100)
    enqueue_one(spool, "q4@alpha.example", now=T0)
    claimed = spool.claim("node-a", T0, LEASE, limit=1)                 # the longest due
    assert [r.address for r in claimed[0].recipients] == ["q1@busy.example"]
    status = spool.status(T0)
    assert spool.show(done).recipients[0].state is State.DELIVERED
    assert status.messages == 6
    assert status.recipients == {"queued": 3, "deferred": 2, "inflight": 1,
                                 "delivered": 1, "bounced": 0, "held": 1}
    assert status.oldest_pending_at == T0 - 300
    assert status.next_attempt_at == T0 + 600
    # Busiest first (pending = queued + deferred + inflight), ties by name.
    assert [(d.domain, d.queued, d.deferred, d.inflight) for d in status.domains] == [
        ("busy.example", 0, 2, 1), ("alpha.example", 2, 0, 0), ("zulu.example", 1, 0, 0)]


# -- list and show --------------------------------------------------------


@pytest.fixture
def listed(spool):
    """A spool with one message in each interesting situation, by name."""
    ids = {"delivered": enqueue_one(spool, "a@done.example", now=T0 - 40)}
    rid = claim_one(spool, "node-a", T0 - 40)
    spool.record("node-a", T0 - 39, [Outcome(recipient_id=rid, state=State.DELIVERED, code=250)])
    ids["deferred"] = deferred_once(spool, "b@Slow.Example", now=T0 - 30, retry_at=T0 + 600)
    ids["queued"] = enqueue_one(spool, "c@new.example", "d@slow.example", now=T0 - 20)
    ids["held"] = enqueue_one(spool, "e@held.example", now=T0 - 10)
    spool.hold(ids["held"], T0)
    return ids


@pytest.mark.parametrize("kwargs, expected", [
    # default: everything not yet delivered or bounced, oldest first
    ({}, ["deferred", "queued", "held"]),
    # one state
    ({"state": "delivered"}, ["delivered"]),
    ({"state": "queued"}, ["queued"]),
    ({"state": "held"}, ["held"]),
    # one domain (domains compare lower-cased, a trailing dot ignored)
    ({"domain": "slow.example"}, ["deferred", "queued"]),
    ({"domain": "SLOW.example."}, ["deferred", "queued"]),
    # a state at a domain
    ({"state": "deferred", "domain": "slow.example"}, ["deferred"]),
    ({"state": "delivered", "domain": "slow.example"}, []),
    # the oldest N
    ({"limit": 2}, ["deferred", "queued"]),
])
def test_list_messages_filters(spool, listed, kwargs, expected):
    """list_messages selects by state, domain and limit, oldest first."""
    by_id = {v: k for k, v in listed.items()}
    assert [by_id[m.id] for m in spool.list_messages(**kwargs)] == expected


def test_list_messages_describes_messages(spool, listed):
    """Each listed message carries its summary and every recipient's state."""
    info = next(m for m in spool.list_messages() if m.id == listed["queued"])
    assert (info.sender, info.subject, info.created_at) == ("app@example.com", "Hello", T0 - 20)
    assert [(r.address, r.state) for r in info.recipients] == [("c@new.example", State.QUEUED),
                                                               ("d@slow.example", State.QUEUED)]


def test_show_with_history_and_data(spool):
    """show returns every recipient with its history, and the message data only when asked."""
    msg = new_message("a@example.org", "b@example.org")
    qid = spool.enqueue([msg], T0)[0]
    a, _b = recipient_ids(spool.claim("node-a", T0, LEASE, limit=10))
    spool.record("node-a", T0 + 3, [Outcome(recipient_id=a, state=State.DELIVERED, code=250,
                                            response="2.0.0 Ok", host="mx.example.org")])
    info = spool.show(qid)
    assert info.data is None
    assert [(r.address, r.state, r.history) for r in info.recipients] == [
        ("a@example.org", State.DELIVERED, (Attempt(T0 + 3, "mx.example.org", 250, "2.0.0 Ok"),)),
        ("b@example.org", State.INFLIGHT, ())]
    assert spool.show(qid, include_data=True).data == msg.data


@pytest.mark.parametrize("operation", [
    lambda s: s.show("0000000000000000DEAD"),
    lambda s: s.show("0000000000000000DEAD", include_data=True),
    lambda s: s.retry(T0, queue_id="0000000000000000DEAD"),
    lambda s: s.hold("0000000000000000DEAD", T0),
    lambda s: s.release_held("0000000000000000DEAD", T0),
    lambda s: s.delete("0000000000000000DEAD", T0),
], ids=["show", "show-data", "retry", "hold", "release_held", "delete"])
def test_unknown_queue_id(spool, operation):
    """Every operation on a queue id raises UnknownMessage for an id not in the spool."""
    enqueue_one(spool, "a@example.org")
    with pytest.raises(UnknownMessage, match="0000000000000000DEAD"):
        operation(spool)


# -- retry ----------------------------------------------------------------


@pytest.mark.parametrize("kwargs, due", [
    # one message
    ({"queue_id": "first"}, ["first"]),
    # one domain (lower-cased, trailing dot ignored)
    ({"domain": "A.example."}, ["first", "third"]),
    # everything
    ({}, ["first", "second", "third"]),
])
def test_retry(spool, kwargs, due):
    """retry makes deferred recipients due now: of one message, one domain or all."""
    ids = {"first": deferred_once(spool, "x@a.example", retry_at=T0 + 3600),
           "second": deferred_once(spool, "y@b.example", retry_at=T0 + 3600),
           "third": deferred_once(spool, "z@a.example", retry_at=T0 + 3600)}
    if "queue_id" in kwargs:
        kwargs = {"queue_id": ids[kwargs["queue_id"]]}
    assert spool.retry(T0 + 10, **kwargs) == len(due)
    claimed = spool.claim("node-a", T0 + 10, LEASE, limit=10)
    assert sorted(c.id for c in claimed) == sorted(ids[name] for name in due)


def test_retry_leaves_inflight_held_and_final_alone(spool):
    """retry touches only queued and deferred recipients."""
    inflight = enqueue_one(spool, "a@example.org")
    claim_one(spool, "node-a", T0)
    held = enqueue_one(spool, "b@example.org")
    spool.hold(held, T0)
    assert spool.retry(T0 + 1) == 0
    assert states(spool, inflight) == [State.INFLIGHT]
    assert states(spool, held) == [State.HELD]
    assert spool.claim("node-b", T0 + 1, LEASE, limit=10) == []


# -- hold, release_held, delete -------------------------------------------


@pytest.mark.parametrize("tried, released_state", [
    # never attempted: released back to queued
    (False, State.QUEUED),
    # deferred once before it was held: released back to deferred
    (True, State.DEFERRED),
])
def test_hold_and_release_held(spool, tried, released_state):
    """Held recipients are never claimed; release_held makes them due at once."""
    qid = (deferred_once(spool, "a@example.org", "b@example.org", retry_at=T0 + 10) if tried
           else enqueue_one(spool, "a@example.org", "b@example.org"))
    assert spool.hold(qid, T0 + 5) == 2
    assert states(spool, qid) == [State.HELD, State.HELD]
    assert spool.status(T0 + 5).recipients["held"] == 2
    assert spool.claim("node-a", T0 + 10_000, LEASE, limit=10) == []
    assert spool.release_held(qid, T0 + 20_000) == 2
    info = spool.show(qid)
    assert [(r.state, r.next_attempt_at) for r in info.recipients] == [(released_state, T0 + 20_000)] * 2
    assert spool.claim("node-a", T0 + 19_999, LEASE, limit=10) == []
    assert len(recipient_ids(spool.claim("node-a", T0 + 20_000, LEASE, limit=10))) == 2
    assert spool.release_held(qid, T0 + 20_001) == 0   # nothing held any more


def test_hold_keeps_finished_recipients(spool):
    """Holding a partly delivered message holds only its undelivered recipients."""
    qid = enqueue_one(spool, "a@example.org", "b@example.org")
    a, b = recipient_ids(spool.claim("node-a", T0, LEASE, limit=10))
    spool.record("node-a", T0 + 1, [Outcome(recipient_id=a, state=State.DELIVERED, code=250),
                                    Outcome(recipient_id=b, state=State.DEFERRED, code=451,
                                            next_attempt_at=T0 + 100)])
    assert spool.hold(qid, T0 + 2) == 1
    assert states(spool, qid) == [State.DELIVERED, State.HELD]


@pytest.mark.parametrize("operation", [
    lambda s, qid, now: s.hold(qid, now),
    lambda s, qid, now: s.delete(qid, now),
], ids=["hold", "delete"])
def test_refused_while_in_flight(spool, operation):
    """hold and delete raise MessageInFlight while a live lease exists, and change nothing."""
    qid = enqueue_one(spool, "a@example.org", "b@example.org")
    spool.claim("node-a", T0, LEASE, limit=1)
    with pytest.raises(MessageInFlight, match=qid):
        operation(spool, qid, T0 + LEASE - 1)
    assert states(spool, qid) == [State.INFLIGHT, State.QUEUED]


def test_hold_allowed_after_lease_expired(spool):
    """Once the lease has expired a message can be held; the old owner's late outcome is ignored."""
    qid = enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    assert spool.hold(qid, T0 + LEASE + 1) == 1
    assert states(spool, qid) == [State.HELD]
    spool.record("node-a", T0 + LEASE + 2, [Outcome(recipient_id=rid, state=State.DELIVERED, code=250)])
    assert states(spool, qid) == [State.HELD]
    assert spool.claim("node-b", T0 + 10_000, LEASE, limit=10) == []


def test_delete_allowed_after_lease_expired(spool):
    """Once the lease has expired a message can be deleted."""
    qid = enqueue_one(spool, "a@example.org")
    claim_one(spool, "node-a", T0)
    spool.delete(qid, T0 + LEASE + 1)
    with pytest.raises(UnknownMessage):
        spool.show(qid)


def test_delete_removes_recipients_and_history(spool):
    """delete removes the message with its recipients and attempt history, and nothing else."""
    qid = deferred_once(spool, "a@example.org", "b@example.org")
    kept = enqueue_one(spool, "k@example.org")
    spool.delete(qid, T0 + 5)
    with pytest.raises(UnknownMessage):
        spool.show(qid)
    assert [row_count(spool, t) for t in (messages_table, recipients_table, attempts_table)] == [1, 1, 0]
    assert states(spool, kept) == [State.QUEUED]


# -- purge ----------------------------------------------------------------


def test_purge_removes_only_old_finished_messages(spool):
    """purge removes messages older than the cutoff whose recipients are all delivered or bounced."""
    day = 86400.0
    codes = {State.DELIVERED: 250, State.DEFERRED: 451, State.BOUNCED: 550}

    def finish(qid, *final, now=T0):
        ids = recipient_ids(spool.claim("node-a", now, LEASE, limit=10))
        spool.record("node-a", now + 1, [
            Outcome(recipient_id=i, state=s, code=codes[s], host="mx",
                    next_attempt_at=now + 10 * day if s is State.DEFERRED else None)
            for i, s in zip(ids, final)])
        return qid

    old_done = finish(enqueue_one(spool, "a@example.org", "b@example.org"), State.DELIVERED, State.BOUNCED)
    old_partial = finish(enqueue_one(spool, "c@example.org", "d@example.org"), State.DELIVERED, State.DEFERRED)
    old_held = enqueue_one(spool, "e@example.org")
    spool.hold(old_held, T0)
    new_done = finish(enqueue_one(spool, "f@example.org", now=T0 + 2 * day), State.DELIVERED, now=T0 + 2 * day)
    assert spool.purge(day, T0 + 2 * day + 1) == 1
    with pytest.raises(UnknownMessage):
        spool.show(old_done)
    for qid in (old_partial, old_held, new_done):
        spool.show(qid)
    assert row_count(spool, attempts_table) == 3      # old_partial's two, new_done's one
    assert spool.purge(day, T0 + 2 * day + 1) == 0


# -- concurrency ----------------------------------------------------------


def test_concurrent_claims_never_overlap(spool):
    """Four nodes claiming in small batches at once never get the same recipient and miss none."""
    batch = [new_message(*(f"u{m}-{r}@d{r}.example" for r in range(4)), subject=f"m{m}") for m in range(50)]
    spool.enqueue(batch, T0)
    got: dict[str, list[int]] = {}
    sizes: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def node(name: str) -> None:
        mine: list[int] = []
        try:
            start.wait()
            while claimed := spool.claim(name, T0, LEASE, limit=7):
                sizes.append(len(recipient_ids(claimed)))
                mine.extend(recipient_ids(claimed))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        got[name] = mine

    threads = [threading.Thread(target=node, args=(f"node-{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert max(sizes) <= 7
    everything = [rid for ids in got.values() for rid in ids]
    assert len(everything) == len(set(everything)) == 200
    assert spool.status(T0).recipients["inflight"] == 200


# -- an unavailable spool -------------------------------------------------


def _unreachable_url(spool_url: str, tmp_path) -> str:
    if spool_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}"          # a directory: SQLite cannot open it
    return "postgresql+psycopg://relay:s3cret@127.0.0.1:1/test"   # nothing listens on port 1


def test_unreachable_spool_raises_spool_unavailable(spool_url, tmp_path):
    """An unreachable database gives SpoolUnavailable (one sentence, no password), not a driver error."""
    url = _unreachable_url(spool_url, tmp_path)
    with pytest.raises(SpoolUnavailable) as opened:
        open_spool(url, busy_timeout=0.1)
    assert "s3cret" not in str(opened.value)
    spool = open_spool(url, busy_timeout=0.1, check_schema=False)
    try:
        with pytest.raises(SpoolUnavailable):
            spool.ping()
        with pytest.raises(SpoolUnavailable) as queued:
            spool.enqueue([new_message("a@example.org")], T0)
        assert "s3cret" not in str(queued.value)
        assert "\n" not in str(queued.value)
    finally:
        spool.close()


def _lock_spool(spool, spool_url):
    """Another connection holding the spool's write lock; returns its release."""
    if spool.dialect == "sqlite":
        path = make_url(spool_url).database
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        return lambda: (locker.rollback(), locker.close())
    # PostgreSQL: ACCESS EXCLUSIVE table locks, as an operator's open
    # transaction or a schema change would hold them.
    conn = spool.engine.connect()
    conn.execute(text("LOCK TABLE messages, recipients IN ACCESS EXCLUSIVE MODE"))
    return lambda: (conn.rollback(), conn.close())


def test_locked_spool_raises_spool_unavailable(spool, spool_url):
    """A spool locked by another session gives a "locked" SpoolUnavailable after
    spool.busy_timeout (PostgreSQL's lock_timeout, SQLite's busy timeout) for
    enqueue, enqueue_claimed and record alike; nothing is written, and all of it
    works once the lock is gone."""
    import time

    qid = enqueue_one(spool, "a@example.org")
    rid = claim_one(spool, "node-a", T0)
    busy = open_spool(spool_url, busy_timeout=0.2)
    unlock = _lock_spool(spool, spool_url)
    try:
        writes = [lambda: busy.enqueue([new_message("b@example.org", key="locked")], T0),
                  lambda: busy.enqueue([new_message("c@example.org")], T0),
                  lambda: busy.enqueue_claimed([new_message("d@example.org")], T0, "node-a", LEASE),
                  lambda: busy.record("node-a", T0 + 1, [Outcome(recipient_id=rid, state=State.DELIVERED,
                                                                 code=250, host="mx")])]
        for write in writes:
            started = time.monotonic()
            with pytest.raises(SpoolUnavailable, match="is locked by another process; try again"):
                write()
            # busy_timeout is 0.2 s; without it the write would wait for as long as the lock is held
            assert time.monotonic() - started < 10.0
    finally:
        unlock()
    assert spool.status(T0).messages == 1 and states(spool, qid) == [State.INFLIGHT]
    try:
        assert busy.enqueue([new_message("b@example.org", key="locked")], T0 + 1)
        busy.record("node-a", T0 + 2, [Outcome(recipient_id=rid, state=State.DELIVERED, code=250, host="mx")])
    finally:
        busy.close()
    assert spool.status(T0 + 2).messages == 2 and states(spool, qid) == [State.DELIVERED]


def test_enqueue_claimed_after_the_server_ended_the_connection(pg_url):
    """PostgreSQL: a direct-writer connection the server ended (restart,
    pg_terminate_backend) is noticed and replaced before the statement is sent,
    so the next submission commits instead of failing with 451."""
    import psycopg
    spool = open_spool(pg_url)
    try:
        spool.enqueue_claimed([new_message("a@example.org")], T0, "node-a", LEASE)
        (raw, _), = spool._direct._idle             # the one connection it used
        backend = raw.driver_connection.info.backend_pid
        server = make_url(pg_url).set(drivername="postgresql", query={})
        with psycopg.connect(server.render_as_string(hide_password=False), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        for _ in range(1000):       # the server's goodbye reaches the old connection
            if spool_sql._has_input(raw.driver_connection):
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("the terminated backend's connection never became readable within 10 s")
        ids, claimed = spool.enqueue_claimed([new_message("b@example.org")], T0 + 1, "node-a", LEASE)
        assert len(claimed) == 1 and spool.status(T0 + 1).recipients["inflight"] == 2
        (raw, _), = spool._direct._idle
        assert raw.driver_connection.info.backend_pid != backend
    finally:
        spool.close()


def test_enqueue_claimed_failing_otherwise_gives_its_connection_back(pg_url, monkeypatch):
    """PostgreSQL: a commit that fails with something other than a database
    error (a bug, say) closes its connection: it is neither reused nor left
    checked out."""
    spool = open_spool(pg_url)
    try:
        spool.enqueue_claimed([new_message("a@example.org")], T0, "node-a", LEASE)
        (raw, _), = spool._direct._idle
        backend = raw.driver_connection.info.backend_pid
        del raw

        def broken(raw, message_rows, recipient_rows):
            raise TypeError("not a database error")

        monkeypatch.setattr(spool._direct, "_postgresql", broken)
        with pytest.raises(TypeError):
            spool.enqueue_claimed([new_message("b@example.org")], T0 + 1, "node-a", LEASE)
        assert spool.engine.pool.checkedout() == 0 and spool._direct._idle == []
        monkeypatch.undo()
        spool.enqueue_claimed([new_message("c@example.org")], T0 + 2, "node-a", LEASE)
        assert spool.status(T0 + 2).recipients["inflight"] == 2
        (raw, _), = spool._direct._idle
        assert raw.driver_connection.info.backend_pid != backend     # a new connection, not the failed one
    finally:
        spool.close()


def test_enqueue_claimed_ids_match_the_rows_of_a_large_batch(spool):
    """Hundreds of recipients in one batch: every claimed id is the row of
    that message's recipient at that position."""
    msgs = [replace(new_message("x@example.org", subject=f"bulk {n}"),
                    recipients=tuple(f"user{n}-{k}@example{n % 3}.org" for k in range(70)))
            for n in range(4)]
    ids, claimed = spool.enqueue_claimed(msgs, T0, "node-a", LEASE)
    with spool.engine.connect() as conn:
        rows = {r.id: (r.message_id, r.position, r.address) for r in conn.execute(
            select(recipients_table.c.id, recipients_table.c.message_id, recipients_table.c.position,
                   recipients_table.c.address))}
    expected = {r.id: (m.id, pos, r.address) for m in claimed for pos, r in enumerate(m.recipients)}
    assert len(expected) == 280 and rows == expected
    assert [m.id for m in claimed] == ids


def test_enqueue_claimed_ids_when_sqlite_rowids_are_at_their_maximum(sqlite_url):
    """SQLite: once the largest rowid is 2**63 - 1, new rows get random ids;
    the claimed ids are still those of the rows (never computed from rowids)."""
    spool = open_spool(sqlite_url)
    try:
        first = spool.enqueue([new_message("first@example.org")], T0)[0]
        with spool.engine.begin() as conn:
            conn.execute(recipients_table.update().where(recipients_table.c.message_id == first)
                         .values(id=2**63 - 1))
        ids, claimed = spool.enqueue_claimed([new_message("a@example.org", "b@example.org", subject="one"),
                                              new_message("c@example.org", subject="two")], T0, "node-a", LEASE)
        with spool.engine.connect() as conn:
            rows = {r.id: (r.message_id, r.address) for r in conn.execute(
                select(recipients_table.c.id, recipients_table.c.message_id, recipients_table.c.address)
                .where(recipients_table.c.message_id.in_(ids)))}
        assert rows == {r.id: (m.id, r.address) for m in claimed for r in m.recipients}
        assert len(rows) == 3
    finally:
        spool.close()
