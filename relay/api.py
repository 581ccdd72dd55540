"""The Python API: what an application server (and ``relayctl``) calls.

>>> import relay
>>> with relay.open() as outbox:                       # default config/spool
...     qid = outbox.enqueue(raw_bytes_or_EmailMessage)

Every method commits before it returns; an id returned by ``enqueue`` is
durably in the spool.  Nothing here prints.
"""

from __future__ import annotations

import time
from email.message import Message
from email.policy import SMTP
from typing import Callable, Iterable, Sequence

from relay.config import Config, load_config
from relay.errors import UsageError
from relay.message import parse_message
from relay.model import MessageInfo, NewMessage, SpoolStatus, State
from relay.spool import SQLSpool, open_spool, upgrade


def _as_bytes(message: bytes | str | Message) -> bytes:
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        return message.encode("utf-8")
    if isinstance(message, Message):
        return message.as_bytes(policy=SMTP)
    raise TypeError(f"cannot enqueue a {type(message).__name__}; give bytes, str or an email.message.Message")


class Relay:
    """A handle on one spool, for enqueueing and inspecting.

    ``clock`` returns the current POSIX time; tests inject a fake one.
    """

    def __init__(self, config: Config, spool: SQLSpool, clock: Callable[[], float] = time.time):
        self.config = config
        self.spool = spool
        self.clock = clock

    # -- context manager ------------------------------------------------
    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.spool.close()

    # -- enqueue --------------------------------------------------------
    def enqueue(self, message: bytes | str | Message, *, sender: str | None = None,
                recipients: Sequence[str] | None = None,
                idempotency_key: str | None = None) -> str:
        """Validate and durably queue one message; return its queue id.

        Without ``recipients`` they come from To/Cc/Bcc (Bcc is stripped);
        without ``sender`` it comes from From; ``sender="<>"`` is the null
        sender.  A repeated ``idempotency_key`` returns the first id.
        Raises BadMessage (nothing queued) or SpoolUnavailable.
        """
        msg = parse_message(_as_bytes(message), sender=sender, recipients=recipients,
                            idempotency_key=idempotency_key)
        return self.spool.enqueue([msg], self.clock())[0]

    def enqueue_many(self, messages: Iterable[NewMessage]) -> list[str]:
        """Queue already-validated messages (``relay.message.parse_message``) in one transaction."""
        return self.spool.enqueue(list(messages), self.clock())

    # -- inspect --------------------------------------------------------
    def status(self) -> SpoolStatus:
        return self.spool.status(self.clock())

    def list(self, *, state: str | None = None, domain: str | None = None,
             limit: int | None = None) -> list[MessageInfo]:
        if state is not None and state not in {s.value for s in State}:
            raise UsageError(f"Unknown state {state!r}; states are "
                             f"{', '.join(s.value for s in State)}.")
        return self.spool.list_messages(state=state, domain=domain, limit=limit)

    def show(self, queue_id: str, *, include_data: bool = False) -> MessageInfo:
        return self.spool.show(queue_id, include_data=include_data)

    # -- administer -----------------------------------------------------
    def retry(self, queue_id: str | None = None, *, domain: str | None = None) -> int:
        return self.spool.retry(self.clock(), queue_id=queue_id, domain=domain)

    def hold(self, queue_id: str) -> int:
        return self.spool.hold(queue_id, self.clock())

    def release(self, queue_id: str) -> int:
        return self.spool.release_held(queue_id, self.clock())

    def delete(self, queue_id: str) -> None:
        self.spool.delete(queue_id, self.clock())

    def purge(self, older_than: float) -> int:
        return self.spool.purge(older_than, self.clock())


def open(config: Config | str | None = None, *, spool_url: str | None = None,
         clock: Callable[[], float] = time.time) -> Relay:
    """Open the configured spool (creating the schema of an empty one).

    ``config``: a Config, a TOML path, or None for ``$RELAY_CONFIG`` /
    defaults.  ``spool_url`` overrides ``spool.url``.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    if spool_url:
        cfg = cfg.with_overrides(spool_url=spool_url)
    spool = open_spool(cfg.spool_url, busy_timeout=cfg.spool_busy_timeout, min_free_space=cfg.min_free_space)
    return Relay(cfg, spool, clock)


def upgrade_schema(config: Config) -> tuple[str | None, str]:
    """Bring the configured spool to the newest schema; return (before, after)."""
    spool = open_spool(config.spool_url, busy_timeout=config.spool_busy_timeout, check_schema=False)
    try:
        return upgrade(spool.engine, config.spool_url)
    finally:
        spool.close()
