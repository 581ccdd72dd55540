"""The drain: relayd's delivery loop, as a Twisted service.

One cycle: claim due recipients (a lease per recipient, on the spool's thread
pool) -> bounce the expired ones -> group the rest into SMTP transactions per
destination (route or domain) -> deliver over as few connections as the
concurrency limits allow, several messages per connection -> record every
outcome in batches, with the bounces (DSNs) queued in the same transaction.

Policy lives in the pure modules (backoff, replies, grouping, dsn, logfmt);
this module only moves work between the spool, the router and the SMTP
client, and keeps the books:

* every claimed recipient is either recorded or released, never dropped;
* a destination's first connection must succeed before more are opened to it
  (so a dead MX costs one connection attempt, not ``per_domain_concurrency``);
* a destination whose backlog is deep is left out of the next claims, so one
  slow destination cannot hold the others up;
* leases are renewed while the process lives; on start the node takes back
  what it held before it died.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from twisted.application import service
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.logger import Logger

from relay import backoff, dsn, logfmt, replies
from relay.config import Config
from relay.grouping import group_envelopes, split_expired
from relay.model import (
    ClaimedMessage,
    ClaimedRecipient,
    Envelope,
    NewMessage,
    Outcome,
    RecipientResult,
    State,
)
from relay.routing import RoutingFailure, destination_key
from relay.smtpclient import open_session
from relay.spool.deferred import DeferredSpool

log = Logger(namespace="relay")

EXPIRED_CODE = 554
EXPIRED_TEXT = "4.4.7 Delivery time expired"


def _temporary(code: int, text: str) -> tuple[int, str]:
    """A host-level failure as a deferral: when no host is left, recipients
    are deferred (SPEC "Routing") even if the last host answered 5xx."""
    if 400 <= code < 500:
        return code, text
    if len(text) > 1 and text[0] in "245" and text[1] == ".":
        text = "4" + text[1:]
    else:
        text = f"4.4.1 {text}"
    return 451, text


@dataclass(eq=False)
class _Destination:
    """In-memory work for one destination (a route name or a domain)."""

    key: str
    queue: deque = field(default_factory=deque)   # Envelopes waiting for a connection
    backlog: int = 0          # recipients in ``queue``
    sessions: int = 0         # connections (or their DNS lookups) in progress
    starting: int = 0         # sessions that have not taken an envelope yet
    proven: bool = False      # a connection to it has carried mail
    waiting: deque = field(default_factory=deque)  # idle sessions kept open: [Deferred, state, timer]


class DrainService(service.Service):
    """Claims, delivers and records; see the module docstring."""

    name = "drain"

    #: Under load, the least time from the start of one record transaction to
    #: the start of the next: the outcomes of that time are written together
    #: (each transaction costs a commit; on SQLite an fsync).  A first outcome
    #: after a quiet spell is still written ``flush_delay`` after it arrives.
    flush_interval = 0.05

    def __init__(self, *, config: Config, spool: DeferredSpool, router, reactor,
                 session_opener: Callable = open_session, rng: random.Random | None = None,
                 trust_root=None, shutdown_timeout: float = 30.0, flush_delay: float = 0.005,
                 metrics=None, linger: float = 0.0, busy_claim_delay: float = 0.0,
                 attempt_log: Callable[[str], None] | None = None):
        self.config = config
        self.spool = spool
        self.router = router
        self.reactor = reactor
        self.open_session = session_opener
        self.rng = rng or random.Random()
        self.trust_root = trust_root
        self.shutdown_timeout = shutdown_timeout
        self.flush_delay = flush_delay
        #: How long a connection stays open, idle, when its destination's queue
        #: is empty (0: QUIT at once).  New mail for the destination goes to
        #: such a connection before any new one is opened.
        self.linger = linger
        #: While deliveries are under way, a wake-up (new mail) claims after at most
        #: this delay instead of at once, so that a stream of small commits becomes
        #: fewer, larger claims.  An idle drain always claims at once.
        self.busy_claim_delay = busy_claim_delay
        #: Receives outcome/connection events (relay.metrics.RelayMetrics); optional.
        self.metrics = metrics
        #: Takes the one log line per recipient per attempt (default: twisted.logger,
        #: ``log.info("{line}", line=...)``; relayd writes them to stderr directly).
        self.attempt_log = attempt_log or (lambda line: log.info("{line}", line=line))
        self.node = config.node
        self.max_claimed = max(config.batch_size * 2, config.concurrency * 4)
        #: Room in the claim window that hand-offs leave to claims: what _tick
        #: needs to claim at all.
        self._claim_reserve = max(1, config.batch_size // 4)
        self.deep_backlog = max(config.batch_size // 2, config.per_domain_concurrency * 20)

        self._destinations: dict[str, _Destination] = {}
        self._claimed: dict[int, ClaimedRecipient] = {}
        self._connections = 0
        self._sessions: set[defer.Deferred] = set()
        self._claiming: defer.Deferred | None = None
        self._poll_call = None
        self._outbox: list[Outcome] = []
        self._dsn_box: list[NewMessage] = []     # DSNs built, waiting to be recorded
        #: Recipients that bounced and are not recorded yet, per message id:
        #: (message, failures, when).  One DSN per message for all of them
        #: (SPEC "Bounces"), built when their outcomes are recorded (_flush),
        #: in the same transaction.
        self._bouncing: dict[str, tuple[ClaimedMessage, list[dsn.FailedRecipient], float]] = {}
        self._flushing: defer.Deferred | None = None
        self._flush_call = None
        self._renewal: task.LoopingCall | None = None
        self._stopping = False
        self._recovered = False   # start-up recover() has finished (hand-offs wait for it)
        self._woken = False
        self._starved = False     # the last tick found no room in the claim window
        self._idle_waiters: list[defer.Deferred] = []
        #: Counters for metrics and tests.
        self.stats = {"delivered": 0, "deferred": 0, "bounced": 0, "connections": 0, "dsns": 0}

    # -- lifecycle ------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        self._stopping = False
        self._recovered = False
        d = self.spool.recover(self.node, self.reactor.seconds())

        def recovered(n: int) -> None:
            if n:
                log.info("took back {n} recipient(s) this node ({node}) held before it stopped", n=n, node=self.node)

        d.addCallbacks(recovered, lambda f: log.failure("could not take back earlier claims", f))

        def ready(_) -> None:
            self._recovered = True      # hand-offs may come now: recover() cannot undo them
            self._tick()
        d.addBoth(ready)
        self._renewal = task.LoopingCall(self._renew)
        self._renewal.clock = self.reactor
        self._renewal.start(max(1.0, self.config.lease / 3), now=False)

    @defer.inlineCallbacks
    def stopService(self):
        """Stop claiming, release what was not started, let transactions in
        progress finish (until ``shutdown_timeout``), record everything."""
        service.Service.stopService(self)
        self._stopping = True
        self._end_lingering()
        if self._poll_call is not None and self._poll_call.active():
            self._poll_call.cancel()
        self._poll_call = None
        if self._claiming is not None:
            yield self._claiming
        unstarted = self._take_all_queued()
        if unstarted:
            try:
                yield self.spool.release(self.node, [r.id for r in unstarted], self.reactor.seconds())
                for r in unstarted:
                    self._claimed.pop(r.id, None)
            except Exception:
                log.failure("could not release {n} unstarted recipient(s); their leases will expire",
                            n=len(unstarted))
        if self._sessions:
            log.info("waiting up to {t:.0f}s for {n} connection(s) to finish", t=self.shutdown_timeout,
                     n=len(self._sessions))
            waiting = defer.DeferredList(list(self._sessions), consumeErrors=True)
            timer = self.reactor.callLater(self.shutdown_timeout, waiting.cancel)
            try:
                yield waiting
            except defer.CancelledError:
                pass
            if timer.active():
                timer.cancel()
            for d in list(self._sessions):
                d.cancel()     # aborts the connection; its transaction is recorded as deferred
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        yield self._flush_all()
        if self._claimed:
            # Anything still claimed (e.g. a session cancelled before its
            # results arrived) goes back to the queue.
            try:
                yield self.spool.release(self.node, list(self._claimed), self.reactor.seconds())
                self._claimed.clear()
            except Exception:
                log.failure("could not release {n} recipient(s); their leases will expire", n=len(self._claimed))

    def wake(self) -> None:
        """Look for due mail now instead of at the next poll (new mail arrived)."""
        if self._stopping or not self.running:
            return
        if self._claiming is not None:
            self._woken = True        # claim again as soon as this claim is done
            return
        if self._poll_call is not None and self._poll_call.active():
            delay = self.wake_delay()
            if delay > 0:
                if self._poll_call.getTime() > self.reactor.seconds() + delay:
                    self._poll_call.reset(delay)
                return
            self._poll_call.cancel()
            self._poll_call = None
            self._tick()

    def wake_delay(self) -> float:
        """How long a wake-up waits before claiming: 0 when idle,
        ``busy_claim_delay`` while claimed recipients are being delivered.
        (Safe to call from another thread: it only reads.)"""
        return self.busy_claim_delay if self._claimed else 0.0

    def idle(self) -> defer.Deferred:
        """A Deferred that fires when nothing is claimed, queued or being recorded (tests)."""
        d = defer.Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    def _check_idle(self) -> None:
        if self._claimed or self._outbox or self._flushing or self._claiming:
            return
        if len(self._sessions) > sum(len(dest.waiting) for dest in self._destinations.values()):
            return                    # connections kept open with nothing to do do not count
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    # -- claiming -------------------------------------------------------

    def _schedule_poll(self, delay: float | None = None) -> None:
        if self._stopping:
            return
        if self._poll_call is not None and self._poll_call.active():
            return
        self._poll_call = self.reactor.callLater(self.config.poll_interval if delay is None else delay, self._tick)

    def _tick(self) -> None:
        self._poll_call = None
        if self._stopping or self._claiming is not None:
            return
        room = self.max_claimed - len(self._claimed)
        if room < max(1, self.config.batch_size // 4):
            self._starved = True
            self._schedule_poll()   # outcomes being recorded will wake us sooner
            return
        self._starved = False
        limit = min(self.config.batch_size, room)
        exclude = [d.key for d in self._destinations.values()
                   if d.backlog >= self.deep_backlog and d.key not in self.config.routes and "*" not in self.config.routes]
        now = self.reactor.seconds()
        self._claiming = self.spool.claim(self.node, now, self.config.lease, limit, exclude)
        self._claiming.addCallbacks(self._claimed_batch, self._claim_failed, callbackArgs=(limit,))

    def _claim_failed(self, failure) -> None:
        self._claiming = None
        log.error("could not claim from the spool: {error}", error=failure.getErrorMessage())
        self._schedule_poll(max(1.0, self.config.poll_interval))
        self._check_idle()

    def _claimed_batch(self, messages: list[ClaimedMessage], limit: int) -> None:
        self._claiming = None
        count = self._take_in(messages)
        woken, self._woken = self._woken, False
        if count >= limit and not self._stopping:
            self._schedule_poll(0)       # more is due right now
        elif woken and not self._stopping:
            self._schedule_poll(self.wake_delay())   # new mail arrived during the claim
        else:
            self._schedule_poll()
        self._check_idle()

    def _take_in(self, messages: list[ClaimedMessage]) -> int:
        """Book claimed messages, bounce the expired, queue the rest per
        destination and dispatch; the number of recipients taken in."""
        now = self.reactor.seconds()
        count = 0
        for message in messages:
            for r in message.recipients:
                self._claimed[r.id] = r
                count += 1
        live, expired = split_expired(messages, now=now, max_lifetime=self.config.max_lifetime)
        for message in expired:
            self._expire(message, now)
        groups = group_envelopes(live, lambda domain: destination_key(domain, self.config.routes))
        for key, envelopes in groups.items():
            dest = self._destinations.get(key)
            if dest is None:
                dest = self._destinations[key] = _Destination(key)
            dest.queue.extend(envelopes)
            dest.backlog += sum(len(e.recipients) for e in envelopes)
        self._dispatch()
        return count

    # -- hand-off from the submission listener --------------------------

    def claim_terms(self) -> tuple[str, float] | None:
        """(node, lease) under which the listener may queue mail already claimed
        for this drain (``ISpool.enqueue_claimed``), or None: while the
        start-up ``recover`` runs (it would take the new claims back), when
        stopping, and when the claim window is full but for the share kept
        for claims (mail due in the spool -- retries, DSNs, mail queued by
        other processes -- is never crowded out by a busy listener).  Mail
        refused terms is queued unclaimed and claimed like any other."""
        if (self._stopping or not self.running or not self._recovered
                or len(self._claimed) >= self.max_claimed - self._claim_reserve):
            return None
        return self.node, self.config.lease

    def adopt(self, messages: list[ClaimedMessage]) -> None:
        """Deliver messages that were queued already claimed for this node:
        the submission listener's hand-off, which skips a claim transaction."""
        if not messages:
            return
        if self._stopping or not self.running:
            # Committed while stopping: give them back to the queue at once.
            ids = [r.id for m in messages for r in m.recipients]
            d = self.spool.release(self.node, ids, self.reactor.seconds())
            d.addErrback(lambda f: log.error("could not release {n} recipient(s); their leases will expire",
                                             n=len(ids)))
            return
        self._take_in(messages)
        self._check_idle()

    def _expire(self, message: ClaimedMessage, now: float) -> None:
        """Bounce the recipients of ``message`` (all past max_lifetime), without an attempt."""
        expired = message.recipients
        outcomes = [Outcome(recipient_id=r.id, state=State.BOUNCED, code=EXPIRED_CODE, response=EXPIRED_TEXT,
                            attempted=False) for r in expired]
        for r in expired:
            self._log_attempt(message.id, r, None, now, r.attempts, State.BOUNCED, EXPIRED_CODE, EXPIRED_TEXT)
        self._queue_outcomes(outcomes, message, [
            dsn.FailedRecipient(address=r.address, status="4.4.7",
                                diagnostic=None, remote_mta=None) for r in expired], now)

    # -- dispatching ----------------------------------------------------

    def _limit_for(self, dest: _Destination) -> int:
        return self.config.per_domain_concurrency if dest.proven else 1

    def _dispatch(self) -> None:
        if self._stopping:
            return
        for dest in list(self._destinations.values()):
            self._feed_lingering(dest)
            while (dest.queue and len(dest.queue) > dest.starting
                   and dest.sessions < self._limit_for(dest)):
                if self._connections >= self.config.concurrency:
                    # Every connection is taken: close one kept open idle elsewhere
                    # (its end dispatches again).
                    self._end_lingering(one=True)
                    break
                self._start_session(dest)
            # A session that ended synchronously (resolve() already failed)
            # re-entered _dispatch, which may have removed ``dest`` already.
            if not dest.queue and not dest.sessions and self._destinations.get(dest.key) is dest:
                del self._destinations[dest.key]

    def _start_session(self, dest: _Destination) -> None:
        dest.sessions += 1
        dest.starting += 1
        self._connections += 1
        if self.metrics is not None:
            self.metrics.connection_opened()
        state = {"pulled": 0}
        d = defer.ensureDeferred(self._deliver(dest, state))
        self._sessions.add(d)

        def done(result):
            self._sessions.discard(d)
            dest.sessions -= 1
            if state["pulled"] == 0:
                dest.starting -= 1
            self._connections -= 1
            if self.metrics is not None:
                self.metrics.connection_closed()
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                log.failure("delivery to {key} failed unexpectedly", result, key=dest.key)
            self._dispatch()
            self._check_idle()

        d.addBoth(done)

    def _take_envelope(self, dest: _Destination, state: dict) -> Envelope | defer.Deferred | None:
        if self._stopping:
            return None
        if not dest.queue:
            if self.linger > 0:
                # Also a connection opened for mail that others took meanwhile:
                # it is ready, and the next mail is likely close behind.
                return self._linger_on(dest, state)
            return None
        envelope = dest.queue.popleft()
        dest.backlog -= len(envelope.recipients)
        if state["pulled"] == 0:
            dest.starting -= 1
            if not dest.proven:
                dest.proven = True
                # The first connection works: open the others now, not only
                # when a claim or a session ends (never, if claims are full).
                self.reactor.callLater(0, self._dispatch)
        state["pulled"] += 1
        return envelope

    # -- connections kept open ------------------------------------------

    def _linger_on(self, dest: _Destination, state: dict) -> defer.Deferred:
        """Keep a session open, idle, for up to ``linger`` seconds: a Deferred
        that fires with its next envelope, or None (QUIT) when time is up."""
        entry: list = []

        def cancel(_d: defer.Deferred) -> None:   # the connection was lost or cancelled
            if entry in dest.waiting:
                dest.waiting.remove(entry)
            if entry[2].active():
                entry[2].cancel()

        d = defer.Deferred(cancel)
        entry.extend([d, state, self.reactor.callLater(self.linger, self._linger_expired, dest, entry)])
        dest.waiting.append(entry)
        self._check_idle()
        return d

    def _linger_expired(self, dest: _Destination, entry: list) -> None:
        if entry in dest.waiting:
            dest.waiting.remove(entry)
            entry[0].callback(None)

    def _feed_lingering(self, dest: _Destination) -> None:
        """Give queued envelopes to the destination's idle sessions first."""
        while dest.waiting and dest.queue and not self._stopping:
            d, state, timer = dest.waiting.popleft()
            if timer.active():
                timer.cancel()
            d.callback(self._take_envelope(dest, state))

    def _end_lingering(self, one: bool = False) -> None:
        """QUIT idle sessions (all of them, or one)."""
        for dest in list(self._destinations.values()):
            while dest.waiting:
                d, _state, timer = dest.waiting.popleft()
                if timer.active():
                    timer.cancel()
                d.callback(None)
                if one:
                    return

    def _take_all_queued(self) -> list[ClaimedRecipient]:
        taken: list[ClaimedRecipient] = []
        for dest in self._destinations.values():
            while dest.queue:
                taken.extend(dest.queue.popleft().recipients)
            dest.backlog = 0
        return taken

    async def _deliver(self, dest: _Destination, state: dict) -> None:
        """Route ``dest`` and deliver its queue over one connection, failing over hosts."""
        try:
            destination = await self.router.resolve(dest.key)
        except RoutingFailure as failure:
            self._fail_queue(dest, failure.code, failure.text, permanent=failure.permanent)
            return
        except defer.CancelledError:
            raise
        except Exception as exc:   # never lose mail over an unexpected resolver error
            log.error("routing {key} failed: {exc!r}", key=dest.key, exc=exc)
            self._fail_queue(dest, 451, "4.4.3 Routing failed", permanent=False)
            return
        route = destination.route
        tls = (route.tls if route is not None and route.tls else None) or self.config.tls
        credentials = (route.username, route.password) if route is not None and route.username else None
        last: tuple[int, str, str | None] | None = None
        for host in destination.hosts:
            host_failed = True
            for address in host.addresses:
                if self._stopping or not dest.queue:
                    return
                end = await self.open_session(
                    self.reactor, address=address, port=host.port, host_name=host.name,
                    ehlo=self.config.hostname, tls=tls,
                    connect_timeout=self.config.connect_timeout,
                    command_timeout=self.config.command_timeout,
                    next_envelope=lambda: self._take_envelope(dest, state),
                    on_result=lambda env, results, h=host.name, a=address, p=host.port:
                        self._on_result(env, results, h, a, p),
                    credentials=credentials, trust_root=self.trust_root)
                self.stats["connections"] += 1
                if state["pulled"]:
                    # The transactions got their results; a session that ended
                    # early (421, lost connection) leaves the rest of the queue
                    # to the next connection _dispatch opens.
                    if end.host_failure is None and end.error is None:
                        self.router.mark_good(host.name)
                    return
                if end.host_failure is None:
                    if not dest.queue:
                        return          # others took the work while we connected
                    last = (451, "4.4.2 Connection closed before any mail was sent", host.name)
                    continue
                failure = end.host_failure
                last = (failure.code, failure.text, host.name)
                log.info("{key}: {host}[{address}]:{port} failed: {code} {text}", key=dest.key,
                         host=host.name, address=address, port=host.port, code=failure.code, text=failure.text)
                if not failure.try_next_host:
                    host_failed = False   # e.g. AUTH refused: the host is fine, the setup is not
                    break
            if host_failed:
                self.router.mark_bad(host.name)
            else:
                break
        if dest.sessions > 1:
            # Another connection to this destination carries on with the queue.
            # Open no replacement until a new first connection works again:
            # otherwise a peer that refuses extra connections (421 greeting)
            # is reconnected to in a loop.
            dest.proven = False
            return
        code, text, host_name = last if last is not None else (451, "4.4.4 No mail host could be reached", None)
        code, text = _temporary(code, text)
        self._fail_queue(dest, code, text, permanent=False, host=host_name)

    def _fail_queue(self, dest: _Destination, code: int, text: str, *, permanent: bool,
                    host: str | None = None) -> None:
        """Give every envelope waiting for ``dest`` the same result (DNS or connection failure)."""
        while dest.queue:
            envelope = dest.queue.popleft()
            dest.backlog -= len(envelope.recipients)
            self._on_result(envelope, [RecipientResult(recipient=r, code=code, text=text)
                                       for r in envelope.recipients], host, None, None,
                            force_state=State.BOUNCED if permanent else State.DEFERRED)

    # -- outcomes -------------------------------------------------------

    def _on_result(self, envelope: Envelope, results: Sequence[RecipientResult], host: str | None,
                   address: str | None, port: int | None, force_state: State | None = None) -> None:
        """Turn one transaction's replies into outcomes, log lines and a DSN."""
        now = self.reactor.seconds()
        message = envelope.message
        relay_label = logfmt.relay_label(host, address, port) if host and address else None
        outcomes: list[Outcome] = []
        failed: list[dsn.FailedRecipient] = []
        for result in results:
            r = result.recipient
            code, text = result.code, result.text
            state = force_state or replies.classify(code)
            next_at = None
            if state is State.DEFERRED:
                if backoff.is_expired(r.queued_at, now, self.config.max_lifetime):
                    state = State.BOUNCED
                    failed.append(dsn.FailedRecipient(address=r.address, status="4.4.7",
                                                      diagnostic=replies.reply_line(code, text),
                                                      remote_mta=host))
                else:
                    next_at = backoff.next_attempt_at(
                        r.attempts + 1, now=now, queued_at=r.queued_at, initial=self.config.retry_initial,
                        maximum=self.config.retry_maximum, max_lifetime=self.config.max_lifetime, rng=self.rng)
            elif state is State.BOUNCED:
                failed.append(dsn.FailedRecipient(address=r.address, status=replies.enhanced_status(code, text),
                                                  diagnostic=replies.reply_line(code, text), remote_mta=host))
            outcomes.append(Outcome(recipient_id=r.id, state=state, code=code, response=text,
                                    host=relay_label or host, next_attempt_at=next_at))
            self._log_attempt(message.id, r, relay_label, now, r.attempts + 1, state, code, text,
                              possible_duplicate=result.possible_duplicate)
        self._queue_outcomes(outcomes, message, failed, now)

    def _bounce(self, message: ClaimedMessage, failed: list[dsn.FailedRecipient], now: float) -> list[NewMessage]:
        """The DSN for recipients that failed together; none for a null-sender message."""
        if not message.sender or not failed:
            return []
        try:
            data = dsn.build_dsn(original=message.data, queue_id=message.id, envelope_sender=message.sender,
                                 failed=failed, reporting_mta=self.config.hostname,
                                 arrival_date=message.created_at, now=now)
        except Exception:
            # The outcomes must still be recorded; a DSN that cannot be built
            # is logged loudly instead of leaving the recipients claimed.
            log.failure("{qid}: could not build the delivery status notification for {n} recipient(s)",
                        qid=message.id, n=len(failed))
            return []
        self.stats["dsns"] += 1
        return [NewMessage(sender="", recipients=(message.sender,), data=data,
                           subject="Undelivered Mail Returned to Sender")]

    def _log_attempt(self, qid: str, r: ClaimedRecipient, relay_label: str | None, now: float,
                     attempts: int, state: State, code: int, text: str,
                     possible_duplicate: bool = False) -> None:
        self.stats[state.value] = self.stats.get(state.value, 0) + 1
        if self.metrics is not None:
            self.metrics.outcome(state, code, r.queued_at, now, text=text)
        self.attempt_log(logfmt.format_attempt(
            queue_id=qid, recipient=r.address, relay=relay_label, delay=max(0.0, now - r.queued_at),
            attempts=attempts, status=state, reply=replies.reply_line(code, text),
            possible_duplicate=possible_duplicate))

    def _queue_outcomes(self, outcomes: list[Outcome], message: ClaimedMessage,
                        failed: list[dsn.FailedRecipient], now: float) -> None:
        """Queue outcomes for the next record; ``failed`` (the bounced
        recipients of ``message``) joins the message's one DSN."""
        self._outbox.extend(outcomes)
        if failed and message.sender:
            pending = self._bouncing.get(message.id)
            if pending is None:
                self._bouncing[message.id] = (message, list(failed), now)
            else:
                pending[1].extend(failed)
        if self._flushing is None and self._flush_call is None:
            self._flush_call = self.reactor.callLater(self.flush_delay, self._flush)

    def _flush(self) -> defer.Deferred | None:
        self._flush_call = None
        if self._flushing is not None or not (self._outbox or self._dsn_box):
            return self._flushing
        batch, self._outbox, bounces, self._bouncing = self._hold_back_bounces()
        dsns, self._dsn_box = self._dsn_box, []
        for message, failed, bounced_at in bounces:
            dsns.extend(self._bounce(message, failed, bounced_at))
        if not (batch or dsns):
            return None         # all held back: the outcomes still to come will flush
        started = self.reactor.seconds()
        d = self._flushing = self.spool.record(self.node, started, batch, dsns)

        def recorded(ids: list[str]) -> None:
            self._flushing = None
            for o in batch:
                self._claimed.pop(o.recipient_id, None)
            if ids:
                log.info("queued {n} delivery status notification(s): {ids}", n=len(ids), ids=" ".join(ids))
                if self.metrics is not None:
                    self.metrics.enqueued(len(ids), source="dsn")
                if self._poll_call is not None and self._poll_call.active():
                    self._poll_call.cancel()
                    self._schedule_poll(0)
            if self._outbox or self._dsn_box:
                delay = 0.0
                if not self._stopping and len(self._outbox) < self.config.batch_size:
                    delay = max(0.0, started + self.flush_interval - self.reactor.seconds())
                self._flush_call = self.reactor.callLater(delay, self._flush)
            if not self._stopping and self._starved and len(self._claimed) < self.max_claimed // 2 \
                    and self._poll_call is not None and self._poll_call.active() and self._claiming is None:
                self._poll_call.cancel()
                self._tick()
            self._check_idle()

        def failed(failure) -> None:
            self._flushing = None
            log.error("could not record {n} outcome(s), will retry: {error}", n=len(batch),
                      error=failure.getErrorMessage())
            self._outbox[:0] = batch
            self._dsn_box[:0] = dsns
            if self._flush_call is None:
                self._flush_call = self.reactor.callLater(1.0, self._flush)

        d.addCallbacks(recorded, failed)
        return d

    def _hold_back_bounces(self) -> tuple[list[Outcome], list[Outcome], list, dict]:
        """Split the outbox and the bounces for a record:
        ``(outcomes now, outcomes held, bounces now, bounces held)``.

        A message some of whose recipients bounced while others it claimed
        with them are still being tried gets its DSN when those are done too
        (one DSN per message per attempt, as Postfix sends one per queue
        run), so the bounced outcomes wait with it (outcomes and DSN are
        recorded together).  Nothing is held back once the drain is stopping.
        """
        outbox, bouncing = self._outbox, self._bouncing
        if self._stopping or not bouncing:
            return outbox, [], list(bouncing.values()), {}
        outcome_ids = {o.recipient_id for o in outbox}
        being_tried = {r.message_id for r in self._claimed.values() if r.id not in outcome_ids}
        held = {mid: entry for mid, entry in bouncing.items() if mid in being_tried}
        now = [entry for mid, entry in bouncing.items() if mid not in held]
        if not held:
            return outbox, [], now, {}
        waits = [o.state is State.BOUNCED and getattr(self._claimed.get(o.recipient_id), "message_id", None) in held
                 for o in outbox]
        return ([o for o, w in zip(outbox, waits) if not w], [o for o, w in zip(outbox, waits) if w], now, held)

    @defer.inlineCallbacks
    def _flush_all(self):
        """Record everything pending (shutdown); retries a few times if the spool is down."""
        for _ in range(30):
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
            if self._flushing is not None:
                yield self._flushing
                continue
            if not (self._outbox or self._dsn_box):
                return
            d = self._flush()
            if d is not None:
                yield d
            if self._outbox:
                yield task.deferLater(self.reactor, 1.0, lambda: None)
        if self._outbox:
            log.error("gave up recording {n} outcome(s) at shutdown; those recipients will be retried "
                      "when their leases expire", n=len(self._outbox))

    def _renew(self) -> defer.Deferred | None:
        if not self._claimed:
            return None
        # Only the recipients this drain holds: a claim it never learnt of (a
        # hand-off whose commit succeeded but whose reply was lost) must expire
        # and be claimed again, not be kept alive forever.
        d = self.spool.renew(self.node, self.reactor.seconds(), self.config.lease, list(self._claimed))
        d.addErrback(lambda f: log.error("could not renew leases: {error}", error=f.getErrorMessage()))
        return d
