"""relay: a persistent outbound SMTP relay queue for application servers.

The in-process API::

    import relay
    with relay.open() as outbox:
        queue_id = outbox.enqueue(message_bytes)          # From/To/Cc/Bcc from the headers
        outbox.enqueue(msg, sender="app@example.com", recipients=["a@example.org"],
                       idempotency_key="order-1234-receipt")
        print(outbox.show(queue_id).recipients[0].state)

See README.md for relayd and relayctl.
"""

from __future__ import annotations

from relay.api import Relay, open
from relay.config import Config, load_config
from relay.errors import (
    BadMessage,
    ConfigError,
    InputNotFound,
    MessageInFlight,
    RelayError,
    SpoolUnavailable,
    UnknownMessage,
    UsageError,
)
from relay.model import State

__version__ = "0.1.0"

__all__ = [
    "Relay", "open", "Config", "load_config", "State",
    "RelayError", "BadMessage", "ConfigError", "InputNotFound", "MessageInFlight",
    "SpoolUnavailable", "UnknownMessage", "UsageError", "__version__",
]
