"""Twisted plugin: ``twist relay --config PATH`` / ``twistd -n relay --config PATH``.

(No ``__init__.py`` here or in ``twisted/``: Twisted finds plugin modules in
every ``twisted/plugins`` directory on ``sys.path``.)
"""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "relay",
    "relay.tap",
    "relay: a persistent outbound SMTP relay queue (drains the spool, delivers by MX)",
    "relay",
)
