"""The group commit's siblings: sessions of one listener between an accepted
MAIL and their final dot, for whose messages a commit waits (commit_delay)."""

from __future__ import annotations

from twisted.internet import task

from relay.submission import GroupCommitter, _Settings, mid_transaction
from tests.unit.submission_fakes import Session, Spool, code

BODY = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


class Listener:
    """Sessions sharing one committer with commit_delay, onto a spool that
    records commits and answers when released."""

    def __init__(self):
        self.clock = task.Clock()
        self.spool = Spool(hold=True)
        self.transactions: set = set()
        committer = GroupCommitter(self.spool, self.clock, commit_delay=0.001,
                                   siblings=lambda: mid_transaction(self.transactions))
        self.settings = _Settings(hostname="relay.test", max_size=10_000, committer=committer,
                                  requires_auth=False, transactions=self.transactions)

    def session(self) -> Session:
        s = Session(settings=self.settings, spool=self.spool)
        s.ehlo()
        return s

    def commits(self) -> list[int]:
        """The size of each commit started and not yet released."""
        return [len(messages) for messages, _ in self.spool.waiting]


def open_transaction(s: Session) -> None:
    assert code(s.cmd(b"MAIL FROM:<a@s.test>") + s.cmd(b"RCPT TO:<r@d.test>")) == [b"250 2.1.0", b"250 2.1.5"]


def test_a_commit_waits_for_a_session_mid_transaction_and_takes_both_messages():
    listener = Listener()
    a, b = listener.session(), listener.session()
    open_transaction(a)
    open_transaction(b)
    assert code(a.cmd(b"DATA") + a.send(BODY)) == [b"354 Continue"]
    assert listener.commits() == []                 # b is coming
    assert code(b.cmd(b"DATA")) == [b"354 Continue"]
    assert b.send(BODY) == []
    assert listener.commits() == [2]                # b was the last: no timer needed
    assert listener.clock.getDelayedCalls() == []
    listener.spool.release()
    assert code(a.replies()) == [b"250 2.0.0"] and code(b.replies()) == [b"250 2.0.0"]


def sibling_in_data(listener: Listener, partial: bytes) -> tuple[Session, Session]:
    """Sessions a and b: b has sent ``partial`` of its DATA when a sends its
    whole message, which is held back for b's."""
    a, b = listener.session(), listener.session()
    open_transaction(a)
    open_transaction(b)
    b.cmd(b"DATA")
    b.send(partial)
    a.cmd(b"DATA")
    a.send(BODY)
    assert listener.commits() == []
    return a, b


def test_a_session_receiving_its_body_is_a_sibling():
    listener = Listener()
    sibling_in_data(listener, b"Subject: half\r\n\r\n")
    listener.clock.advance(0.001)                   # b is slow: the commit goes without it
    assert listener.commits() == [1]


def test_sessions_whose_transaction_ended_are_no_siblings():
    listener = Listener()
    a, reset, gone, idle = (listener.session() for _ in range(4))
    for s in (a, reset, gone):
        open_transaction(s)
    assert code(reset.cmd(b"RSET")) == [b"250 2.0.0"]
    gone.hang_up()
    assert listener.transactions == {a.proto, reset.proto}    # a closed session leaves at once ...
    a.cmd(b"DATA")
    a.send(BODY)
    assert listener.commits() == [1]                # ... reset's ended transaction did not hold the commit back
    assert listener.transactions == set()           # and both were dropped on the way


def held_back_for(listener: Listener, sibling: Session) -> Session:
    """A session whose message is held back for ``sibling`` (mid-transaction)."""
    a = listener.session()
    open_transaction(a)
    open_transaction(sibling)
    a.cmd(b"DATA")
    a.send(BODY)
    assert listener.commits() == []
    return a


def test_a_sibling_that_resets_lets_the_held_back_commit_go_at_once():
    listener = Listener()
    b = listener.session()
    held_back_for(listener, b)
    b.cmd(b"RSET")
    assert listener.commits() == [1]                # not at the timer
    assert listener.clock.getDelayedCalls() == []


def test_a_sibling_that_says_ehlo_again_lets_the_held_back_commit_go():
    listener = Listener()
    b = listener.session()
    held_back_for(listener, b)
    b.ehlo()
    assert listener.commits() == [1]


def test_a_sibling_that_hangs_up_lets_the_held_back_commit_go():
    listener = Listener()
    b = listener.session()
    held_back_for(listener, b)
    b.hang_up()
    assert listener.commits() == [1]


def test_a_sibling_whose_message_is_too_big_is_not_waited_for():
    listener = Listener()
    _, b = sibling_in_data(listener, b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n")
    b.send((b"x" * 900 + b"\r\n") * 12)             # over max_size (10,000): b's message will never come
    assert listener.commits() == [1]
    assert code(b.send(b".\r\n")) == [b"552 5.3.4"]


def test_a_held_back_message_whose_client_hangs_up_is_not_queued():
    """The client will never see the 250, and would send the message again."""
    listener = Listener()
    a = listener.session()
    b = held_back_for(listener, a)                  # b's message waits: a is mid-transaction
    b.hang_up()
    assert listener.commits() == []
    assert listener.clock.getDelayedCalls() == []   # nothing left to wait for
    a.cmd(b"DATA")
    a.send(BODY)
    assert listener.commits() == [1]                # a's message alone


def test_a_lone_session_commits_at_once():
    listener = Listener()
    a = listener.session()
    open_transaction(a)
    a.cmd(b"DATA")
    a.send(BODY)
    assert listener.commits() == [1]
    assert listener.clock.getDelayedCalls() == []
