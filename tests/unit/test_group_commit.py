"""GroupCommitter: up to max_in_flight commits running (1 unless told), the rest batched; with a hand-off
(relayd's drain), batches are queued already claimed and handed over after the
250s, and the drain is not woken for them."""

from __future__ import annotations

from twisted.internet import defer, task

from relay.errors import SpoolUnavailable
from relay.model import ClaimedMessage, NewMessage
from relay.submission import GroupCommitter


def message(n: int) -> NewMessage:
    return NewMessage(sender="a@s.test", recipients=(f"r{n}@d.test",), data=b"Subject: %d\r\n\r\nx\r\n" % n)


class Spool:
    """enqueue / enqueue_claimed whose Deferreds the test fires."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.pending: list[defer.Deferred] = []

    def enqueue(self, messages, now):
        self.calls.append(("enqueue", len(messages)))
        d = defer.Deferred()
        self.pending.append((d, messages, None))
        return d

    def enqueue_claimed(self, messages, now, node, lease):
        self.calls.append(("enqueue_claimed", len(messages), node, lease))
        d = defer.Deferred()
        self.pending.append((d, messages, node))
        return d

    def commit(self, fail: bool = False) -> None:
        d, messages, node = self.pending.pop(0)
        if fail:
            d.errback(SpoolUnavailable("The spool is unavailable."))
            return
        ids = [f"Q{n}" for n in range(len(messages))]
        if node is None:
            d.callback(ids)
        else:
            d.callback((ids, [ClaimedMessage(id=i, sender=m.sender, data=m.data, size=m.size, eight_bit=False,
                                             created_at=0.0, recipients=()) for i, m in zip(ids, messages)]))


class Drain:
    def __init__(self, terms=("node-a", 30.0)):
        self.terms = terms
        self.adopted: list[list[str]] = []
        self.events: list[str] = []

    def claim_terms(self):
        return self.terms

    def adopt(self, messages):
        self.events.append("adopt")
        self.adopted.append([m.id for m in messages])


def test_batches_are_handed_to_the_drain_after_the_replies():
    spool, drain, committed = Spool(), Drain(), []
    committer = GroupCommitter(spool, task.Clock(), handoff=drain,
                               on_committed=lambda n, handed_off: committed.append((n, handed_off)))
    replies = []
    first = committer.submit(message(1))
    first.addCallback(lambda qid: drain.events.append("250 " + qid))
    later = [committer.submit(message(n)) for n in (2, 3)]     # arrive while the first commits
    assert spool.calls == [("enqueue_claimed", 1, "node-a", 30.0)]
    spool.commit()
    assert drain.events == ["250 Q0", "adopt"]                  # the reply before the hand-off
    assert spool.calls[1] == ("enqueue_claimed", 2, "node-a", 30.0)
    for d in later:
        d.addCallback(replies.append)
    spool.commit()
    assert replies == ["Q0", "Q1"] and drain.adopted == [["Q0"], ["Q0", "Q1"]]
    assert committed == [(1, True), (2, True)]


def test_a_failed_hand_off_is_still_counted_and_the_drain_woken():
    """adopt() raising (a bug in the drain) loses neither the 250s nor the
    commit hook: the metrics count the commit and the drain is woken."""
    class BrokenDrain(Drain):
        def adopt(self, messages):
            raise RuntimeError("drain broke")

    spool, committed, replies = Spool(), [], []
    committer = GroupCommitter(spool, task.Clock(), handoff=BrokenDrain(),
                               on_committed=lambda n, handed_off: committed.append((n, handed_off)))
    committer.submit(message(1)).addCallback(replies.append)
    spool.commit()
    assert replies == ["Q0"]
    assert committed == [(1, False)]


def test_without_room_in_the_drain_mail_is_queued_unclaimed_and_the_drain_woken():
    spool, drain, committed = Spool(), Drain(terms=None), []
    committer = GroupCommitter(spool, task.Clock(), handoff=drain,
                               on_committed=lambda n, handed_off: committed.append((n, handed_off)))
    d = committer.submit(message(1))
    assert spool.calls == [("enqueue", 1)]
    spool.commit()
    assert d.result == "Q0" and drain.adopted == [] and committed == [(1, False)]


def test_a_failed_commit_hands_nothing_over():
    spool, drain, committed = Spool(), Drain(), []
    committer = GroupCommitter(spool, task.Clock(), handoff=drain,
                               on_committed=lambda n, handed_off: committed.append((n, handed_off)))
    d = committer.submit(message(1))
    failures = []
    d.addErrback(failures.append)
    spool.commit(fail=True)
    assert failures and failures[0].check(SpoolUnavailable)
    assert drain.adopted == [] and committed == []
    assert committer.idle().called


# -- commit_delay: waiting for sessions mid-transaction ----------------------

class Siblings:
    """The listener's answer to "is another session mid-transaction?"."""

    def __init__(self, busy: bool = False):
        self.busy = busy
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.busy


def delayed_committer(siblings, clock, **kw):
    spool = Spool()
    return spool, GroupCommitter(spool, clock, commit_delay=0.001, siblings=siblings, **kw)


def test_a_lone_session_is_committed_at_once():
    clock = task.Clock()
    spool, committer = delayed_committer(Siblings(busy=False), clock)
    committer.submit(message(1))
    assert spool.calls == [("enqueue", 1)]
    assert clock.getDelayedCalls() == []


def test_with_a_sibling_mid_transaction_the_commit_waits_at_most_commit_delay():
    clock, siblings = task.Clock(), Siblings(busy=True)
    spool, committer = delayed_committer(siblings, clock)
    committer.submit(message(1))
    clock.advance(0.0009)
    committer.submit(message(2))
    assert spool.calls == []                      # still held back for the sibling
    clock.advance(0.0001)                         # commit_delay after the first, not the second
    assert spool.calls == [("enqueue", 2)]
    assert clock.getDelayedCalls() == []


def test_the_commit_starts_as_soon_as_the_last_sibling_has_submitted():
    clock, siblings = task.Clock(), Siblings(busy=True)
    spool, committer = delayed_committer(siblings, clock)
    replies = []
    committer.submit(message(1)).addCallback(replies.append)
    siblings.busy = False                         # the sibling's final dot: nobody else is coming
    committer.submit(message(2)).addCallback(replies.append)
    assert spool.calls == [("enqueue", 2)]
    assert clock.getDelayedCalls() == []          # the timer was cancelled
    spool.commit()
    assert replies == ["Q0", "Q1"]


def test_a_full_batch_does_not_wait_for_siblings():
    clock = task.Clock()
    spool, committer = delayed_committer(Siblings(busy=True), clock, max_batch=3)
    for n in range(3):
        committer.submit(message(n))
    assert spool.calls == [("enqueue", 3)]
    assert clock.getDelayedCalls() == []


def test_no_wait_while_a_commit_runs_and_the_next_batch_may_wait_again():
    clock, siblings = task.Clock(), Siblings(busy=False)
    spool, committer = delayed_committer(siblings, clock)
    committer.submit(message(1))                  # committed at once
    siblings.busy = True
    committer.submit(message(2))                  # waits for the running commit, not for a timer
    assert clock.getDelayedCalls() == []
    spool.commit()                                # the next one could start: a sibling is mid-transaction
    assert spool.calls == [("enqueue", 1)]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.001)
    assert spool.calls == [("enqueue", 1), ("enqueue", 1)]


def test_withdrawn_while_held_back_commits_nothing_and_becomes_idle():
    clock = task.Clock()
    spool, committer = delayed_committer(Siblings(busy=True), clock)
    d = committer.submit(message(1))
    idle = []
    committer.idle().addCallback(idle.append)
    assert committer.withdraw(d)
    assert idle == [None]
    assert clock.getDelayedCalls() == []          # nothing left to hold back: the timer is gone
    clock.advance(0.001)
    assert spool.calls == []


def test_recheck_starts_a_held_back_commit_once_no_sibling_is_left():
    clock, siblings = task.Clock(), Siblings(busy=True)
    spool, committer = delayed_committer(siblings, clock)
    committer.submit(message(1))
    committer.recheck()                           # still a sibling: still held back
    assert spool.calls == []
    siblings.busy = False                         # the sibling sent RSET, say
    committer.recheck()
    assert spool.calls == [("enqueue", 1)]
    assert clock.getDelayedCalls() == []


def test_a_batch_at_the_byte_limit_does_not_wait_for_siblings():
    clock = task.Clock()
    size = message(1).size
    spool, committer = delayed_committer(Siblings(busy=True), clock, max_batch_bytes=2 * size)
    committer.submit(message(1))
    assert spool.calls == []
    committer.submit(message(2))                  # the batch is full by size
    assert spool.calls == [("enqueue", 2)]


def test_commits_and_messages_are_counted():
    clock = task.Clock()
    spool, committer = delayed_committer(Siblings(busy=True), clock)
    for n in range(4):
        committer.submit(message(n))
    clock.advance(0.001)
    spool.commit()
    assert (committer.commits, committer.messages) == (1, 4)


def test_without_commit_delay_siblings_are_not_asked():
    siblings = Siblings(busy=True)
    spool = Spool()
    GroupCommitter(spool, task.Clock(), siblings=siblings).submit(message(1))
    assert spool.calls == [("enqueue", 1)] and siblings.asked == 0


# -- max_in_flight: concurrent commits (PostgreSQL) ---------------------------

def test_a_second_commit_starts_while_the_first_runs_up_to_the_limit():
    spool = Spool()
    committer = GroupCommitter(spool, task.Clock(), max_in_flight=2)
    replies: list[str] = []
    committer.submit(message(1)).addCallback(replies.append)
    committer.submit(message(2)).addCallback(replies.append)       # starts at once: one commit runs
    for n in (3, 4):
        committer.submit(message(n)).addCallback(replies.append)   # wait: two run
    assert spool.calls == [("enqueue", 1), ("enqueue", 1)]
    idle = committer.idle()
    spool.commit()                                                  # the first: the waiting two go together
    assert spool.calls[2:] == [("enqueue", 2)]
    spool.commit()
    spool.commit()
    assert replies == ["Q0", "Q0", "Q0", "Q1"] and idle.called
    assert (committer.commits, committer.messages) == (3, 4)


def test_one_commit_in_flight_by_default():
    spool = Spool()
    committer = GroupCommitter(spool, task.Clock())
    committer.submit(message(1))
    committer.submit(message(2))
    assert spool.calls == [("enqueue", 1)]


def test_idle_waits_for_every_commit_in_flight():
    spool = Spool()
    committer = GroupCommitter(spool, task.Clock(), max_in_flight=2)
    committer.submit(message(1))
    failed = committer.submit(message(2))
    failed.addErrback(lambda f: f.trap(SpoolUnavailable))
    idle = committer.idle()
    spool.commit()
    assert not idle.called
    spool.commit(fail=True)
    assert idle.called


def test_listener_commits_in_flight_by_spool():
    from relay.submission import commits_in_flight
    assert commits_in_flight("sqlite:////var/lib/relay/spool.db") == 1
    assert commits_in_flight("postgresql+psycopg://relay@db/relay") == 2
