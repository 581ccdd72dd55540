"""The composition root: ``makeService`` builds relayd from a Config.

``relayd`` (relay.daemon), ``twist relay`` and ``twistd -n relay`` all come
through here; this is the one place (with relay.daemon) that touches the
global reactor.

Start order: spool thread pool, drain, then the listeners.  Stop order is the
reverse and *sequential* (``MultiService`` would stop its children all at
once): listeners first (no new mail), then the drain (finish transactions,
record, release), and the thread pool last, once nothing uses it.
"""

from __future__ import annotations

import os
from typing import Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from relay.config import Config, load_config, redact_url
from relay.drain import DrainService
from relay.errors import ConfigError, RelayError
from relay.metrics import RelayMetrics, build_metrics_service
from relay.routing import Router, make_resolver
from relay.spool import open_spool
from relay.spool.deferred import DeferredSpool
from relay.submission import build_submission_service, check_submission_config
from relay.wakeup import build_wakeup_service

log = Logger(namespace="relay")


#: relayd keeps a connection that has carried mail open, idle, this long after
#: its destination's queue empties, so that the next message to it (a steady
#: stream, or the next one soon after) skips connecting, the greeting and EHLO.
LINGER = 2.0
#: While relayd is delivering, new mail is claimed after at most this delay
#: rather than once per commit (one claim instead of many small ones).  Mail
#: from the submission listener does not wait for it (it is handed over
#: already claimed); this paces claims of what other processes queue (and the
#: SQLite watcher's wake-ups, which also follow relayd's own commits).
BUSY_CLAIM_DELAY = 0.05


class Options(usage.Options):
    """Flags of ``twist relay`` / ``twistd relay`` (same as relayd's)."""

    synopsis = "[--config PATH]"
    optParameters = [
        ["config", "c", None, "relay configuration file (TOML); default $RELAY_CONFIG, else built-in defaults"],
    ]


class RelayService(service.MultiService):
    """relayd's services, started in order and stopped in reverse order, one after the other.

    A service that cannot start (a listening address in use) stops relayd:
    its sentence is logged and ``start_error`` keeps it.  relayd starts its
    services on a running reactor, which is then stopped (stopping what had
    started) and relayd exits with the error's code; ``twist``/``twistd``
    start them before running the reactor, so the spool's threads are
    stopped and SystemExit carries the code out of the runner.
    """

    def __init__(self, config: Config, spool: DeferredSpool, reactor=None):
        service.MultiService.__init__(self)
        self.config = config
        self.spool = spool
        self.reactor = reactor
        self.drain: DrainService | None = None
        #: The error that stopped start-up, if one did.
        self.start_error: RelayError | None = None

    def privilegedStartService(self) -> None:
        try:
            service.MultiService.privilegedStartService(self)     # twistd: binds the listener
        except RelayError as e:
            self._start_failed(e)

    def startService(self) -> None:
        self.spool.start()
        try:
            service.MultiService.startService(self)
        except RelayError as e:
            self._start_failed(e)

    def _start_failed(self, e: RelayError) -> None:
        self.start_error = e
        log.critical("{sentence}", sentence=str(e))
        if self.reactor is not None and self.reactor.running:
            self.reactor.stop()
            return
        self.spool.stop()
        raise SystemExit(e.exit_code) from None

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for child in reversed(list(self)):
            if not child.running:       # never started (start-up stopped before it)
                continue
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=child.name)
        self.spool.stop()


def build_service(config: Config, reactor=None, *, trust_root=None, attempt_log=None) -> RelayService:
    """Every relayd service for ``config``: the drain (and, when configured,
    the submission listener and the metrics endpoint).  ``attempt_log``
    (optional) takes the drain's per-attempt log lines and the listener's
    per-message ones instead of twisted.logger."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor
        reactor = global_reactor
    submission_tls = check_submission_config(config)   # refuse an open relay before touching the spool
    pin_to_cpus(config.cpu_affinity)     # before any thread starts (threads inherit it)
    spool = open_spool(config.spool_url, busy_timeout=config.spool_busy_timeout,
                       min_free_space=config.min_free_space)
    deferred_spool = DeferredSpool(spool, reactor, threads=3)
    top = RelayService(config, deferred_spool, reactor)
    resolver = make_resolver(config.nameservers, reactor)
    router = Router(resolver=resolver, clock=reactor, routes=config.routes, port=config.delivery_port)
    metrics = RelayMetrics(max_lifetime=config.max_lifetime, clock=reactor)
    if spool.free_space is not None:
        metrics.watch_free_space(spool.free_space)
    drain = DrainService(config=config, spool=deferred_spool, router=router, reactor=reactor,
                         trust_root=trust_root, metrics=metrics, linger=LINGER,
                         busy_claim_delay=BUSY_CLAIM_DELAY, attempt_log=attempt_log)
    drain.setServiceParent(top)
    top.drain = drain
    wakeup = build_wakeup_service(config.spool_url, reactor, drain.wake, busy_interval=drain.wake_delay)
    if wakeup is not None:
        wakeup.setServiceParent(top)
    submission = build_submission_service(config, deferred_spool, reactor, on_enqueued=drain.wake,
                                          handoff=drain, metrics=metrics, tls=submission_tls,
                                          log_line=attempt_log)
    if submission is not None:
        submission.setServiceParent(top)
    metrics_service = build_metrics_service(config, metrics, deferred_spool, reactor)
    if metrics_service is not None:
        metrics_service.setServiceParent(top)
    return top


#: relayd's garbage-collector thresholds: a young-generation collection every
#: 50,000 net allocations instead of 700 (a delivered message allocates
#: about a thousand objects, most freed by reference counting at once).
#: Measured with scripts/bench_e2e.py: about 5 % more messages per second.
GC_THRESHOLDS = (50_000, 20, 20)


def pin_to_cpus(cpus: Sequence[int]) -> None:
    """``relay.cpu_affinity``: keep every thread of this process (and those it
    starts later) on these CPUs; nothing when empty.

    relayd runs Python on one core at a time (the GIL); its reactor thread and
    the spool's threads hand the GIL and work to each other many times per
    message.  Where waking a thread on another CPU is dear (virtual machines:
    an inter-processor interrupt is a VM exit), keeping them on one CPU is
    much cheaper; see README "Performance".  Raises ConfigError for a CPU
    this process may not use."""
    if not cpus:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("relay.cpu_affinity needs Linux (sched_setaffinity); remove it on this system.")
    allowed = os.sched_getaffinity(0)
    refused = sorted(set(cpus) - allowed)
    if refused:
        raise ConfigError(f"relay.cpu_affinity names CPU {refused[0]}, which this process may not use "
                          f"(it may use {', '.join(str(c) for c in sorted(allowed))}).")
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, set(cpus))
        except ProcessLookupError:
            pass    # a thread that ended meanwhile


def tune_garbage_collector() -> None:
    """Freeze what start-up allocated (never scanned again) and collect less often."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def describe(config: Config) -> str:
    """The start-up line: where the spool is and who this node is."""
    return (f"relayd starting: node {config.node}, hostname {config.hostname}, "
            f"spool {redact_url(config.spool_url)}")


def makeService(options) -> RelayService:
    """IServiceMaker entry point for ``twist relay`` / ``twistd relay``."""
    config = load_config(options["config"])
    log.info("{line}", line=describe(config))
    top = build_service(config)
    tune_garbage_collector()
    return top
