"""relayd's Prometheus metrics and health endpoint (``metrics.listen``).

``RelayMetrics`` owns its own ``CollectorRegistry`` (never the process-wide
one, so tests and several relayd instances in one process do not collide).
The drain reports to it as mail moves (:meth:`RelayMetrics.outcome`,
``connection_opened/closed``); the submission listener reports accepted
messages (:meth:`RelayMetrics.enqueued`).  Numbers that live in the spool
(recipients per state, the oldest pending recipient) are refreshed every few
seconds by a ``LoopingCall`` that runs ``DeferredSpool.status`` on the spool's
thread pool; a scrape never touches the database.

``build_metrics_service`` serves, on ``metrics.listen``:

``/metrics``
    the registry in the Prometheus text format (OpenMetrics when the scraper
    asks for it), rendered on the reactor thread from memory;
``/healthz``
    ``200 ok`` when ``spool.ping()`` (on the spool's thread pool) answers
    within ``health_timeout`` seconds, else ``503`` and one line naming the
    problem.  Concurrent checks share one ping, so a hung database holds at
    most one spool thread for health checks.

Families (every label value below is created at start, so each series exists
from the first scrape):

==========================================  =======================================================
``relay_enqueued_total{source}``            messages accepted by this relayd; ``source`` is
                                            ``submission`` (SMTP listener) or ``dsn`` (bounces)
``relay_submission_commits_total``          spool transactions of the SMTP listener; enqueued
                                            (``source="submission"``) over this is the group
                                            commit's messages per commit
``relay_delivered_total``                   recipients delivered (one per recipient)
``relay_deferred_total{reason}``            recipient attempts deferred, by reason class
``relay_bounced_total{reason}``             recipients bounced (failed permanently or expired)
``relay_recipients{state}``                 recipients in the spool per state (all six states),
                                            from the last refresh
``relay_oldest_pending_age_seconds``        age of the oldest queued/deferred/inflight recipient
                                            (0 when none), computed at scrape time from the
                                            last refresh's ``oldest_pending_at``
``relay_spool_up``                          1 when the last refresh read the spool, else 0
``relay_spool_last_refresh_timestamp_seconds``  when the spool was last read successfully
``relay_connections_open``                  outbound SMTP connections open now
``relay_spool_free_bytes``                  SQLite only: bytes free on the spool's file system
                                            (read at scrape time, at most once a second); new
                                            mail is refused (452 4.3.1) below
                                            ``relay_spool_min_free_bytes``, ``spool.min_free_space``
``relay_time_in_queue_seconds{outcome}``    queued -> final outcome, ``outcome`` is ``delivered``
                                            or ``bounced`` (one observation per recipient)
``relay_delivery_latency_seconds``          queued -> the result of *each* attempt, whatever it
                                            was (delivered, deferred or bounced): how old mail is
                                            when relayd gets an answer for it.  On a healthy
                                            queue its low buckets are the end-to-end delivery
                                            time of first attempts; deferrals show up as its
                                            tail.  (Per-SMTP-transaction timing is not
                                            reported: the drain does not pass it.)
==========================================  =======================================================

Reason classes (``reason`` label), a fixed set of eight -- see
:func:`reason_class`:

``network``  the host could not be reached or the connection failed (421, X.4.x)
``dns``      the destination could not be resolved or routed (NXDOMAIN, null MX,
             DNS failures: X.1.2, X.1.10, X.4.3, X.4.4, 556)
``tls``      STARTTLS or AUTH with the peer failed (X.7.5, X.7.10, X.7.11, 454)
``mailbox``  the recipient's mailbox (X.1.x, X.2.x; 450, 452, 550-553)
``content``  the message itself: size, 8-bit, SMTPUTF8 (X.3.4, X.6.x)
``policy``   refused by the peer's policy (X.7.x; 554)
``expired``  ``retry.max_lifetime`` passed (X.4.7; a bounce carrying a 4xx code)
``other``    everything else (X.3.x, X.5.x, 451, malformed replies ...)

The deferred counter is by definition the 4xx class and the bounced counter
the 5xx class (plus ``expired``), so the class is not a separate label.  The
drain passes every attempt's reply text to ``outcome`` (``text=``) and the
class comes from its enhanced status, so e.g. a DNS failure (``451 4.4.3``)
counts as ``dns`` and an NXDOMAIN bounce (``550 5.1.2``) as ``dns`` too; a
reply without an enhanced status is classed by its code alone (``451 try
later`` is ``other``).
"""

from __future__ import annotations

import re
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from relay import replies
from relay.config import Config, parse_listen, redact_url
from relay.errors import CannotListen, RelayError
from relay.model import State, SpoolStatus

__all__ = ["REASONS", "ENQUEUE_SOURCES", "RelayMetrics", "MetricsService", "build_metrics_service",
           "reason_class"]

log = Logger(namespace="relay")

#: Every value the ``reason`` label can take.
REASONS = ("network", "dns", "tls", "mailbox", "content", "policy", "expired", "other")
#: Every value the ``source`` label of ``relay_enqueued_total`` can take.
ENQUEUE_SOURCES = ("submission", "dsn")

#: Histogram buckets (seconds): sub-second local delivery up to retry.max_lifetime's default 5 days.
QUEUE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0,
                 12 * 3600.0, 86400.0, 2 * 86400.0, 5 * 86400.0)


# RFC 3463: class "." subject "." detail, at the start of a reply's text.
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")


def _reason_from_status(subject: int, detail: int, code: int) -> str | None:
    """The reason for an RFC 3463 status ``X.subject.detail``; None for ``X.0.0`` (says nothing)."""
    if subject == 0 and detail == 0:
        return None
    if subject == 4 and detail == 7:
        return "expired"
    if (subject, detail) in ((1, 2), (1, 10), (4, 3), (4, 4)):
        return "dns"
    if subject == 7 and (detail in (5, 10, 11) or (detail == 0 and code == 454)):
        return "tls"
    if subject in (1, 2):
        return "mailbox"
    if (subject, detail) == (3, 4) or subject == 6:
        return "content"
    if subject == 4:
        return "network"
    if subject == 7:
        return "policy"
    return "other"


_CODE_REASONS = {421: "network", 450: "mailbox", 451: "other", 452: "mailbox", 454: "tls",
                 550: "mailbox", 551: "mailbox", 552: "mailbox", 553: "mailbox", 554: "policy",
                 556: "dns"}


def reason_class(state: State, code: int, text: str | None = None, *, age: float | None = None,
                 max_lifetime: float | None = None) -> str:
    """The ``reason`` label (one of :data:`REASONS`) of a deferral or bounce.

    From the enhanced status at the start of ``text`` when there is one, else
    from the reply ``code``.  A bounce is ``expired`` when its code is 4xx (the
    drain bounces a deferral that outlived ``retry.max_lifetime`` with the
    deferral's own code) or its status is 4.4.7; without ``text``, a 554
    bounce at least ``max_lifetime`` after queueing is taken as the drain's
    expiry bounce too.
    """
    klass = replies.reply_class(code)
    if state is State.BOUNCED and klass == 4:
        return "expired"
    if text:
        # The status's own class is not checked against the code's: the
        # drain's expiry bounce is "554 4.4.7 ...".
        match = _ENHANCED.match(text)
        if match:
            found = _reason_from_status(int(match[2]), int(match[3]), code)
            if found is not None:
                return found
    elif (state is State.BOUNCED and code == 554 and age is not None and max_lifetime is not None
          and age >= max_lifetime):
        return "expired"
    return _CODE_REASONS.get(code, "other")


class RelayMetrics:
    """relayd's metrics, in a registry of their own (see the module docstring).

    Every method is called on the reactor thread.  ``clock`` (an
    ``IReactorTime``, or None for the global reactor) gives "now" for the
    oldest-pending age at scrape time.
    """

    def __init__(self, *, max_lifetime: float | None = None, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.max_lifetime = max_lifetime
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.enqueued_total = Counter("relay_enqueued", "Messages accepted into the spool by this relayd.",
                                      ["source"], registry=r)
        self.submission_commits_total = Counter(
            "relay_submission_commits", "Spool transactions that committed messages of the submission listener "
            "(relay_enqueued_total{source=\"submission\"} over this is the group commit's messages a commit).",
            registry=r)
        self.delivered_total = Counter("relay_delivered", "Recipients delivered.", registry=r)
        self.deferred_total = Counter("relay_deferred", "Recipient delivery attempts deferred, by reason class.",
                                      ["reason"], registry=r)
        self.bounced_total = Counter("relay_bounced", "Recipients bounced (permanent failure or expired), "
                                     "by reason class.", ["reason"], registry=r)
        self.recipients = Gauge("relay_recipients", "Recipients in the spool per state (last refresh).",
                                ["state"], registry=r)
        self.oldest_pending_age = Gauge("relay_oldest_pending_age_seconds",
                                        "Age of the oldest queued, deferred or inflight recipient (0 when none).",
                                        registry=r)
        self.spool_up = Gauge("relay_spool_up", "1 when the last periodic refresh could read the spool, else 0.",
                              registry=r)
        self.last_refresh = Gauge("relay_spool_last_refresh_timestamp_seconds",
                                  "When the spool was last read successfully (POSIX time; 0 = never).",
                                  registry=r)
        self.connections_open = Gauge("relay_connections_open", "Outbound SMTP connections open now.",
                                      registry=r)
        self.time_in_queue = Histogram("relay_time_in_queue_seconds",
                                       "Time from queueing to the final outcome (delivered or bounced), "
                                       "per recipient.", ["outcome"], buckets=QUEUE_BUCKETS, registry=r)
        self.delivery_latency = Histogram("relay_delivery_latency_seconds",
                                          "Time from queueing to the result of each delivery attempt "
                                          "(delivered, deferred or bounced), per recipient.",
                                          buckets=QUEUE_BUCKETS, registry=r)
        for source in ENQUEUE_SOURCES:
            self.enqueued_total.labels(source=source)
        for reason in REASONS:
            self.deferred_total.labels(reason=reason)
            self.bounced_total.labels(reason=reason)
        for state in State:
            self.recipients.labels(state=state.value)
        for outcome in (State.DELIVERED, State.BOUNCED):
            self.time_in_queue.labels(outcome=outcome.value)
        self._oldest_pending_at: float | None = None
        self.oldest_pending_age.set_function(self._oldest_age)
        # The children outcome() touches per recipient, looked up once.
        self._time_delivered = self.time_in_queue.labels(outcome=State.DELIVERED.value)
        self._time_bounced = self.time_in_queue.labels(outcome=State.BOUNCED.value)

    # -- events ---------------------------------------------------------

    def enqueued(self, n: int = 1, source: str = "submission") -> None:
        """``n`` messages were committed to the spool by ``source`` ("submission" or "dsn")."""
        if source not in ENQUEUE_SOURCES:
            raise ValueError(f"enqueue source must be one of {', '.join(ENQUEUE_SOURCES)}, not {source!r}")
        if n:
            self.enqueued_total.labels(source=source).inc(n)

    def submission_committed(self, n: int) -> None:
        """One spool transaction committed ``n`` messages of the submission listener."""
        self.enqueued(n)
        self.submission_commits_total.inc()

    def watch_free_space(self, free_space) -> None:
        """Export a SQLite spool's free space (a FreeSpaceFloor) and its floor."""
        def free() -> float:
            try:
                return float(free_space.recent_free())
            except OSError:
                return float("nan")
        Gauge("relay_spool_free_bytes", "Bytes free on the SQLite spool's file system (read at scrape "
              "time, at most once a second).", registry=self.registry).set_function(free)
        Gauge("relay_spool_min_free_bytes", "spool.min_free_space: below this much free space new mail "
              "is refused.", registry=self.registry).set(free_space.floor)

    def connection_opened(self) -> None:
        self.connections_open.inc()

    def connection_closed(self) -> None:
        self.connections_open.dec()

    def outcome(self, state: State, code: int, queued_at: float, now: float, text: str | None = None) -> None:
        """One recipient's result in one attempt (DELIVERED, DEFERRED or BOUNCED).

        ``text`` (the reply text after the code) is optional; with it the
        reason class comes from the enhanced status code instead of the reply
        code alone.
        """
        age = max(0.0, now - queued_at)
        self.delivery_latency.observe(age)
        if state is State.DELIVERED:
            self.delivered_total.inc()
            self._time_delivered.observe(age)
        elif state is State.DEFERRED:
            self.deferred_total.labels(reason=reason_class(state, code, text)).inc()
        elif state is State.BOUNCED:
            reason = reason_class(state, code, text, age=age, max_lifetime=self.max_lifetime)
            self.bounced_total.labels(reason=reason).inc()
            self._time_bounced.observe(age)
        else:
            raise ValueError(f"an attempt's outcome is delivered, deferred or bounced, not {state}")

    # -- spool snapshot ---------------------------------------------------

    def spool_status(self, status: SpoolStatus, now: float) -> None:
        """Take the numbers of one successful ``DeferredSpool.status`` call."""
        for state in State:
            self.recipients.labels(state=state.value).set(status.recipients.get(state.value, 0))
        self._oldest_pending_at = status.oldest_pending_at
        self.spool_up.set(1)
        self.last_refresh.set(now)

    def spool_down(self) -> None:
        """The last refresh could not read the spool (the other gauges keep their last values)."""
        self.spool_up.set(0)

    def _oldest_age(self) -> float:
        if self._oldest_pending_at is None:
            return 0.0
        return max(0.0, self.clock.seconds() - self._oldest_pending_at)

    # -- exposition -------------------------------------------------------

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry as (body, content type) for an ``Accept`` header."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


# -- HTTP ---------------------------------------------------------------------


class _MetricsPage(resource.Resource):
    """``/metrics``: rendered from memory on the reactor thread (no I/O)."""

    isLeaf = True

    def __init__(self, metrics: RelayMetrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request) -> bytes:
        accept = (request.getHeader("accept") or "")
        body, content_type = self.metrics.exposition(accept)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body


class _HealthPage(resource.Resource):
    """``/healthz``: 200 ``ok`` when the spool answers a ping in time, else 503 and why."""

    isLeaf = True

    def __init__(self, check: Callable[[], defer.Deferred]):
        super().__init__()
        self.check = check

    def render_GET(self, request):
        finished = request.notifyFinish()   # errbacks if the client goes away
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        def answer(problem: str | None) -> None:
            if gone:
                return
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            if problem is None:
                request.setResponseCode(200)
                request.write(b"ok\n")
            else:
                request.setResponseCode(503)
                request.write((problem + "\n").encode("utf-8", "replace"))
            request.finish()

        self.check().addCallback(answer).addErrback(
            lambda f: log.failure("health check failed unexpectedly", f))
        return server.NOT_DONE_YET


class _Index(resource.Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"relayd: /metrics /healthz\n"


class _QuietSite(server.Site):
    """A Site that does not log a line per scrape or announce its factory."""

    noisy = False

    def log(self, request) -> None:
        pass


def _one_line(failure: Failure) -> str:
    text = " ".join(failure.getErrorMessage().split())
    return text or failure.type.__name__


def _bounded(d: defer.Deferred, seconds: float, clock) -> defer.Deferred:
    """A Deferred firing with None when ``d`` fires or after ``seconds``,
    whichever comes first (``d`` itself is left alone)."""
    out: defer.Deferred = defer.Deferred()

    def fire(_=None):
        if not out.called:
            out.callback(None)

    timer = clock.callLater(seconds, fire)

    def settled(result):
        if timer.active():
            timer.cancel()
        fire()
        return result

    d.addBoth(settled)
    return out


class MetricsService(service.Service):
    """The metrics HTTP listener plus the periodic spool refresh.

    ``refresh_interval``: seconds between ``DeferredSpool.status`` calls
    (one at a time; a tick that finds the previous call still running does
    nothing).  ``health_timeout``: how long ``/healthz`` waits for the
    spool's ping.  ``listening`` is the ``IListeningPort`` while running.
    """

    name = "metrics"

    def __init__(self, *, host: str, port: int, metrics: RelayMetrics, spool, reactor,
                 refresh_interval: float = 5.0, health_timeout: float = 2.0):
        self.host = host
        self.port = port
        self.metrics = metrics
        self.spool = spool
        self.reactor = reactor
        self.refresh_interval = refresh_interval
        self.health_timeout = health_timeout
        root = resource.Resource()
        root.putChild(b"", _Index())
        root.putChild(b"metrics", _MetricsPage(metrics))
        root.putChild(b"healthz", _HealthPage(self.check_health))
        self.site = _QuietSite(root, reactor=reactor)
        self.listening = None
        self._loop: task.LoopingCall | None = None
        self._refreshing: defer.Deferred | None = None
        self._ping: defer.Deferred | None = None
        self._ping_waiters: list[defer.Deferred] = []
        self._spool_was_up = True

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:
        try:
            self.listening = self.reactor.listenTCP(self.port, self.site, interface=self.host)
        except CannotListenError as e:
            raise CannotListen(f"metrics.listen {self.host}:{self.port}: cannot listen "
                               f"({e.socketError or e}).") from None
        service.Service.startService(self)
        log.info("metrics on http://{host}:{port}/metrics and /healthz", host=self.host,
                 port=self.listening.getHost().port)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.refresh_interval, now=True)

    @defer.inlineCallbacks
    def stopService(self):
        """Stop listening and refreshing; wait (a little) for a status call in
        progress, since the spool's thread pool is stopped after us."""
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        listening, self.listening = self.listening, None
        if listening is not None:
            yield listening.stopListening()
        if self._refreshing is not None:
            yield _bounded(self._refreshing, max(self.health_timeout, 5.0), self.reactor)

    # -- periodic refresh -----------------------------------------------------

    def _tick(self) -> None:
        # Not returning the Deferred: the LoopingCall keeps its pace even while
        # a status call hangs (and refresh() does not start a second one).
        if self._refreshing is not None and self._spool_was_up:
            # The previous read has not answered in a whole interval: the
            # spool is not answering (a lock, a dead link), whatever it says later.
            self.metrics.spool_down()
            log.warn("metrics: the spool did not answer within {seconds:g}s", seconds=self.refresh_interval)
            self._spool_was_up = False
        self.refresh()

    def refresh(self) -> defer.Deferred:
        """Read the spool's status once (on its thread pool) into the gauges.

        Returns a Deferred that fires with None when that read is over,
        successful or not; a read already in progress is shared, not doubled.
        """
        d = self._refreshing
        if d is None:
            try:
                d = self.spool.status(self.reactor.seconds())
            except Exception:      # noqa: BLE001 - e.g. the spool is being stopped
                d = defer.fail()
            self._refreshing = d
            d.addCallbacks(self._refreshed, self._refresh_failed)
        waiter: defer.Deferred = defer.Deferred()

        def settled(result):
            waiter.callback(None)
            return result

        d.addBoth(settled)
        return waiter

    def _refreshed(self, status: SpoolStatus) -> None:
        self._refreshing = None
        self.metrics.spool_status(status, self.reactor.seconds())
        if not self._spool_was_up:
            log.info("metrics: the spool answers again")
        self._spool_was_up = True

    def _refresh_failed(self, f: Failure) -> None:
        self._refreshing = None
        self.metrics.spool_down()
        if self._spool_was_up:
            log.warn("metrics: could not read the spool: {error}", error=_one_line(f))
        self._spool_was_up = False

    # -- health ------------------------------------------------------------------

    def check_health(self) -> defer.Deferred:
        """A Deferred firing with None when the spool answers a ping within
        ``health_timeout`` seconds, else with one line naming the problem.
        Never errbacks.  Checks made while a ping is running share it, so a
        hung database ties up one spool thread, not one per request."""
        waiter: defer.Deferred = defer.Deferred()
        self._ping_waiters.append(waiter)

        def timed_out() -> None:
            if waiter in self._ping_waiters:
                self._ping_waiters.remove(waiter)
                waiter.callback(f"spool {self._where()} did not answer within {self.health_timeout:g}s")

        timer = self.reactor.callLater(self.health_timeout, timed_out)

        def settled(result):
            if timer.active():
                timer.cancel()
            return result

        waiter.addBoth(settled)
        if self._ping is None:
            try:
                ping = self.spool.ping()
            except Exception:          # noqa: BLE001 - whatever it is, the spool is not answering
                ping = defer.fail()
            self._ping = ping
            ping.addCallbacks(lambda _: None, self._ping_problem)
            ping.addBoth(self._pinged)
        return waiter

    def _ping_problem(self, f: Failure) -> str:
        if f.check(RelayError):
            return _one_line(f)        # already one sentence naming the spool (SpoolUnavailable)
        return f"spool {self._where()} unavailable: {_one_line(f)}"

    def _pinged(self, problem: str | None) -> None:
        self._ping = None
        waiters, self._ping_waiters = self._ping_waiters, []
        for waiter in waiters:
            waiter.callback(problem)

    def _where(self) -> str:
        return redact_url(getattr(self.spool, "url", "") or "")


def build_metrics_service(config: Config, metrics: RelayMetrics, spool, reactor, *,
                          refresh_interval: float = 5.0, health_timeout: float = 2.0) -> MetricsService | None:
    """The metrics endpoint for ``config.metrics_listen``, or None when it is ``""`` (off).

    Raises ConfigError when its host is not an IP address or ``localhost``."""
    if not config.metrics_listen:
        return None
    host, port = parse_listen(config.metrics_listen, "metrics.listen")
    return MetricsService(host=host, port=port, metrics=metrics, spool=spool, reactor=reactor,
                          refresh_interval=refresh_interval, health_timeout=health_timeout)
