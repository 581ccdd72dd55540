"""GroupCommitter: one commit in flight, the rest batched; with a hand-off
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
