"""Contracts between relay's parts (zope.interface, as Twisted does it).

``ISpool`` is synchronous: ``relayctl`` and ``import relay`` call it
directly, and ``relayd`` runs it on a thread pool (``relay.spool.deferred``).
Every ``now`` is a POSIX timestamp chosen by the caller; the spool never reads
the clock, so tests inject one.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISpool(Interface):
    """The persistent queue of messages and their recipients."""

    url = Attribute("The spool's SQLAlchemy URL (may contain a password).")

    def enqueue(messages, now):
        """Durably queue validated messages in one transaction.

        @param messages: a sequence of L{relay.model.NewMessage}.
        @param now: the queue time.
        @return: the queue ids, in input order.  A message whose
            idempotency key is already in the spool is not queued again; its
            existing id is returned instead.
        @raise relay.errors.SpoolUnavailable: the spool is unreachable,
            locked or full; nothing was queued.
        """

    def enqueue_claimed(messages, now, node, lease):
        """C{enqueue}, with the new recipients claimed for C{node} until
        C{now + lease} in the same transaction (relayd's listener hands what
        it accepts straight to its own drain).  Other nodes are not woken.

        @return: a tuple (queue ids in input order, the newly queued messages
            as L{relay.model.ClaimedMessage}s); a message whose idempotency
            key was already in the spool is not among the claimed.
        @raise relay.errors.SpoolUnavailable: as C{enqueue}.
        """

    def claim(node, now, lease, limit, exclude_domains=()):
        """Claim up to C{limit} due recipients for C{node} until C{now + lease}.

        Due means queued or deferred with C{next_attempt_at <= now}, or
        inflight with an expired lease.  Recipients whose domain is in
        C{exclude_domains} are skipped.  Safe to call from several processes
        at once: no recipient is returned to two callers while its lease lives.

        @return: a list of L{relay.model.ClaimedMessage}, oldest due first,
            each with the claimed recipients of that message.
        """

    def renew(node, now, lease, recipient_ids=None):
        """Extend C{node}'s leases (all of them, or only C{recipient_ids}) to C{now + lease}.

        @return: how many leases were extended.
        """

    def release(node, recipient_ids, now):
        """Give back claimed recipients that were not attempted; they are due at C{now}.

        @return: how many were released.
        """

    def recover(node, now):
        """Take back every claim C{node} still holds (a restarted relayd); due at C{now}.

        @return: how many were recovered.
        """

    def record(node, now, outcomes, new_messages=()):
        """Record a batch of L{relay.model.Outcome} and queue C{new_messages}
        (bounces) in one transaction.

        Outcomes for recipients whose lease C{node} no longer holds are ignored.

        @return: the queue ids of C{new_messages}.
        """

    def status(now):
        """Counts for C{relayctl status}: a L{relay.model.SpoolStatus}."""

    def list_messages(state=None, domain=None, limit=None):
        """Messages with a recipient in C{state} (default: not yet delivered
        or bounced) and at C{domain}, oldest first: L{relay.model.MessageInfo}s."""

    def show(queue_id, include_data=False):
        """One message with every recipient and its attempt history.

        @raise relay.errors.UnknownMessage: no such queue id.
        """

    def retry(now, queue_id=None, domain=None):
        """Make queued and deferred recipients due at C{now}: of one message,
        of one domain, or (neither given) all of them.

        @return: how many recipients were made due.
        @raise relay.errors.UnknownMessage: C{queue_id} is not in the spool.
        """

    def hold(queue_id, now):
        """Keep a message's undelivered recipients out of delivery.

        @raise relay.errors.UnknownMessage: no such queue id.
        @raise relay.errors.MessageInFlight: a relayd holds a live claim on it.
        @return: how many recipients were held.
        """

    def release_held(queue_id, now):
        """Put a held message's recipients back, due at C{now}.

        @return: how many recipients were released.
        @raise relay.errors.UnknownMessage: no such queue id.
        """

    def delete(queue_id, now):
        """Remove a message and its history.

        @raise relay.errors.UnknownMessage: no such queue id.
        @raise relay.errors.MessageInFlight: a relayd holds a live claim on it.
        """

    def purge(older_than, now):
        """Remove messages queued before C{now - older_than} whose recipients
        are all delivered or bounced.

        @return: how many messages were removed.
        """

    def ping():
        """Raise L{relay.errors.SpoolUnavailable} unless the spool answers."""

    def close():
        """Release connections."""
