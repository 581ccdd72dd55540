"""The composition root: ``makeService`` builds relayd from a Config.

``relayd`` (relay.daemon), ``twist relay`` and ``twistd -n relay`` all come
through here; this is the one place (with relay.daemon) that touches the
global reactor.
"""

from __future__ import annotations

from twisted.application import service
from twisted.python import usage

from relay.config import Config, load_config, redact_url
from relay.drain import DrainService
from relay.routing import Router, make_resolver
from relay.spool import open_spool
from relay.spool.deferred import DeferredSpool


class Options(usage.Options):
    """Flags of ``twist relay`` / ``twistd relay`` (same as relayd's)."""

    synopsis = "[--config PATH]"
    optParameters = [
        ["config", "c", None, "relay configuration file (TOML); default $RELAY_CONFIG, else built-in defaults"],
    ]


def build_service(config: Config, reactor=None, *, trust_root=None) -> service.MultiService:
    """Every relayd service for ``config``: the drain (and, when configured,
    the submission listener and the metrics endpoint)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor
        reactor = global_reactor
    top = service.MultiService()
    spool = open_spool(config.spool_url, busy_timeout=config.spool_busy_timeout)
    deferred_spool = DeferredSpool(spool, reactor, threads=2)
    resolver = make_resolver(config.nameservers, reactor)
    router = Router(resolver=resolver, clock=reactor, routes=_routes(config), port=config.delivery_port)
    drain = DrainService(config=config, spool=deferred_spool, router=router, reactor=reactor,
                         trust_root=trust_root)
    drain.setServiceParent(top)
    top.drain = drain  # type: ignore[attr-defined]
    top.config = config  # type: ignore[attr-defined]
    return top


def _routes(config: Config):
    from relay.routing import Route
    return {domain: Route(host=r.host, port=r.port, tls=r.tls, username=r.username, password=r.password)
            for domain, r in config.routes.items()}


def describe(config: Config) -> str:
    """The start-up line: where the spool is and who this node is."""
    return (f"relayd starting: node {config.node}, hostname {config.hostname}, "
            f"spool {redact_url(config.spool_url)}")


def makeService(options) -> service.MultiService:
    """IServiceMaker entry point for ``twist relay`` / ``twistd relay``."""
    from twisted.logger import Logger
    config = load_config(options["config"])
    Logger(namespace="relay").info("{line}", line=describe(config))
    return build_service(config)
