"""Twisted plugins: ``twist relay --config PATH`` / ``twistd -n relay --config PATH``,
and relayd's reactor for them: ``twist --reactor=relay relay --config PATH``.

(No ``__init__.py`` here or in ``twisted/``: Twisted finds plugin modules in
every ``twisted/plugins`` directory on ``sys.path``.)
"""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "relay",
    "relay.tap",
    "relay: a persistent outbound SMTP relay queue (drains the spool, delivers by MX)",
    "relay",
)

relay_reactor = Reactor(
    "relay",
    "relay.reactor",
    "relayd's reactor: epoll, with replies sent once per reactor turn (see relay/reactor.py)",
)
