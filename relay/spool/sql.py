"""``SQLSpool``: the ISpool provider for SQLite and PostgreSQL.

Every statement lives here.  The two dialects differ in two places only,
both in :mod:`relay.spool.engine`: how a connection is set up (SQLite: WAL,
``synchronous=FULL``, busy timeout, foreign keys) and how a write
transaction starts (SQLite ``BEGIN IMMEDIATE``); plus ``FOR UPDATE SKIP
LOCKED`` in the claim on PostgreSQL.

Round trips are per batch: ``enqueue`` uses executemany; ``record`` one
``UPDATE ... WHERE id IN (...)`` (and one ``INSERT ... SELECT`` of history)
per group of outcomes that write the same values, executemany for the rest;
a claim is one ``UPDATE ... RETURNING`` plus one ``SELECT`` of the bodies.
"""

from __future__ import annotations

import itertools
import secrets
import select as select_module
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Sequence

from sqlalchemy import and_, bindparam, case, delete, exists, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from zope.interface import implementer

from relay.config import redact_url
from relay.errors import MessageInFlight, SpoolUnavailable, UnknownMessage
from relay.interfaces import ISpool
from relay.message import domain_of
from relay.model import (
    Attempt,
    ClaimedMessage,
    ClaimedRecipient,
    DomainCounts,
    MessageInfo,
    NewMessage,
    Outcome,
    RecipientInfo,
    SpoolStatus,
    State,
)
from relay.spool.engine import _sentence, spool_errors, write_options
from relay.spool.schema import attempts as A
from relay.spool.schema import messages as M
from relay.spool.schema import recipients as R
from relay.spool.space import FreeSpaceFloor, floor_for_sqlite

_PENDING = (State.QUEUED.value, State.DEFERRED.value, State.INFLIGHT.value)
_NOT_FINAL = _PENDING + (State.HELD.value,)
_CHUNK = 900  # rows per IN (...) list: under SQLite's default variable limit

#: The columns enqueue writes, in the order of its parameter tuples.
_MESSAGE_COLUMNS = ("id", "sender", "size", "eight_bit", "created_at", "subject",
                    "message_id_header", "idempotency_key", "data")
_RECIPIENT_COLUMNS = ("message_id", "position", "address", "domain", "state", "attempts",
                      "queued_at", "next_attempt_at", "updated_at", "lease_owner", "lease_expires_at")

_id_lock = threading.Lock()
_id_counter = itertools.count(secrets.randbits(36))


# record(): one recipient's outcome (executemany), and one outcome shared by
# several recipients (an expanding IN list) with their history rows.
_OUTCOME_VALUES = dict(
    state=bindparam("b_state"),
    attempts=R.c.attempts + bindparam("b_inc"),
    next_attempt_at=bindparam("b_next"),
    last_code=func.coalesce(bindparam("b_code"), R.c.last_code),
    last_response=func.coalesce(bindparam("b_response"), R.c.last_response),
    lease_owner=None, lease_expires_at=None, updated_at=bindparam("b_now"))
_UPDATE_ONE = update(R).where(R.c.id == bindparam("b_id")).values(**_OUTCOME_VALUES)
_UPDATE_MANY = update(R).where(R.c.id.in_(bindparam("ids", expanding=True))).values(**_OUTCOME_VALUES)
_HISTORY_MANY = insert(A).from_select(
    ["recipient_id", "at", "host", "code", "response"],
    select(R.c.id, bindparam("h_at", type_=A.c.at.type), bindparam("h_host", type_=A.c.host.type),
           bindparam("h_code", type_=A.c.code.type), bindparam("h_response", type_=A.c.response.type))
    .where(R.c.id.in_(bindparam("ids", expanding=True))))


def new_queue_id(now: float | None = None) -> str:
    """A 20-hex-digit queue id: milliseconds since the epoch, then a counter
    that starts at a random value per process.  Sorts by queue time."""
    ms = int((time.time() if now is None else now) * 1000)
    with _id_lock:
        n = next(_id_counter)
    return f"{ms & 0xFFFFFFFFFFF:011X}{n & 0xFFFFFFFFF:09X}"


def _message_row(qid: str, msg: NewMessage, now: float) -> tuple:
    """``msg`` as a row of the messages table, in ``_MESSAGE_COLUMNS`` order."""
    return (qid, msg.sender, msg.size, bool(msg.eight_bit), now, msg.subject, msg.message_id,
            msg.idempotency_key, bytes(msg.data))


def _recipient_rows(qid: str, msg: NewMessage, now: float, state: str, due: float,
                    owner: str | None, expires: float | None) -> list[tuple]:
    """``msg``'s recipients as rows of the recipients table, in ``_RECIPIENT_COLUMNS`` order."""
    return [(qid, pos, address, domain_of(address), state, 0, now, due, now, owner, expires)
            for pos, address in enumerate(msg.recipients)]


def _claimed_messages(new: Sequence[tuple[str, NewMessage]], rids: dict[tuple[str, int], int],
                      now: float) -> list[ClaimedMessage]:
    """Messages just queued (queue id, message) as claimed ones, given their
    recipients' ids by (queue id, position)."""
    return [ClaimedMessage(
        id=qid, sender=m.sender, data=bytes(m.data), size=m.size, eight_bit=bool(m.eight_bit),
        created_at=now,
        recipients=tuple(ClaimedRecipient(id=rids[(qid, pos)], message_id=qid, address=address,
                                          domain=domain_of(address), attempts=0, queued_at=now)
                         for pos, address in enumerate(m.recipients)))
        for qid, m in new]


def _chunks(seq: Sequence, size: int = _CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


@implementer(ISpool)
class SQLSpool:
    """See :class:`relay.interfaces.ISpool`."""

    #: PostgreSQL: bounds (seconds) of the reads behind /healthz and the
    #: metrics gauges, so that a lock cannot hold a spool thread for ever.
    PING_TIMEOUT = 5.0
    STATUS_TIMEOUT = 30.0

    def __init__(self, engine: Engine, url: str, *, busy_timeout: float = 5.0, min_free_space: int = 0):
        self.engine = engine
        self.url = url
        self.dialect = engine.dialect.name        # "sqlite" or "postgresql"
        #: SQLite: the free space new mail must leave on the spool's file
        #: system (``spool.min_free_space``, see relay.spool.space; a floor of
        #: 0 refuses nothing but is still measured); None on PostgreSQL or for
        #: a database in memory.
        self.free_space: FreeSpaceFloor | None = (
            floor_for_sqlite(url, min_free_space) if self.dialect == "sqlite" else None)
        self._notify = self.dialect == "postgresql"
        # SQLite has one writer at a time.  Writers of this process queue on a
        # lock, woken as soon as the previous one commits, instead of meeting
        # in SQLite's busy handler, which sleeps 1, 2, 5, 10... ms between
        # retries (several milliseconds per commit when relayd's submission
        # listener, claims and records write at once).  Other processes still
        # meet in the busy handler.
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else None
        self._busy_timeout = busy_timeout
        # enqueue's two INSERTs as driver SQL with positional parameters: the
        # rows go to the DBAPI's executemany as plain tuples, without
        # SQLAlchemy's per-call statement, cache-key and parameter processing.
        self._insert_messages = self._driver_insert(M, _MESSAGE_COLUMNS)
        self._insert_recipients = self._driver_insert(R, _RECIPIENT_COLUMNS)
        self._direct = _DirectWriter(self)

    def _driver_insert(self, table, columns: Sequence[str]) -> str:
        quote = self.engine.dialect.identifier_preparer.quote
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        return (f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
                f"VALUES ({', '.join([mark] * len(columns))})")

    # -- plumbing -------------------------------------------------------

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """SQLite: this process's writers one at a time (see ``_write_lock``);
        SpoolUnavailable after ``busy_timeout``.  PostgreSQL: nothing."""
        lock = self._write_lock
        if lock is None:
            yield
            return
        if not lock.acquire(timeout=self._busy_timeout):
            raise SpoolUnavailable(f"The spool {redact_url(self.url)} is locked by another process; try again.")
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite), errors mapped."""
        with self._writer_turn():
            with spool_errors(self.url):
                with self.engine.connect() as conn:
                    conn = conn.execution_options(**write_options(self.dialect))
                    with conn.begin():
                        yield conn

    @contextmanager
    def _read(self, timeout: float | None = None) -> Iterator[Connection]:
        """A read transaction; on PostgreSQL a statement that takes longer
        than ``timeout`` seconds (waiting for a lock included) is cancelled."""
        with spool_errors(self.url):
            with self.engine.connect() as conn:
                with conn.begin():
                    if timeout is not None and self.dialect == "postgresql":
                        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
                    yield conn

    def close(self) -> None:
        self._direct.close()
        self.engine.dispose()

    def ping(self) -> None:
        """Read one row of the spool's recipients: fails when the database is
        unreachable, the schema missing or the table locked (PING_TIMEOUT).

        SQLite (WAL) reads while another process holds the write lock, so
        there the ping also opens an empty write transaction (``_write``:
        ``BEGIN IMMEDIATE`` in this process's writer turn, then a commit that
        writes nothing): a lock held longer than the busy timeout fails it.
        Waiting for the turn and then for the lock, it may take up to twice
        the busy timeout (``/healthz`` answers 503 at its own bound first)."""
        with self._read(self.PING_TIMEOUT) as conn:
            conn.execute(select(R.c.id).limit(1)).all()
        if self.dialect == "sqlite":
            with self._write():
                pass

    # -- enqueue --------------------------------------------------------

    def enqueue(self, messages: Sequence[NewMessage], now: float) -> list[str]:
        return self._enqueue(messages, now, None)[0]

    def _check_room(self, messages: Sequence[NewMessage]) -> None:
        """SpoolUnavailable when new mail would eat into ``spool.min_free_space``."""
        if self.free_space is not None and messages:
            self.free_space.check(sum(len(m.data) for m in messages))

    def enqueue_claimed(self, messages: Sequence[NewMessage], now: float, node: str,
                        lease: float) -> tuple[list[str], list[ClaimedMessage]]:
        """``enqueue``, with the new recipients claimed for ``node`` until
        ``now + lease`` in the same transaction.

        relayd's submission listener hands what it accepts straight to its
        drain this way, without a claim transaction (and without waking other
        nodes: nothing it queues is due for them).  A message whose
        idempotency key is already in the spool is neither queued nor claimed.

        @return: the queue ids in input order, and the messages claimed.
        """
        if any(m.idempotency_key for m in messages):
            return self._enqueue(messages, now, (node, now + lease))
        return self._direct.enqueue_claimed(messages, now, node, now + lease)

    def _enqueue(self, messages: Sequence[NewMessage], now: float,
                 claim: tuple[str, float] | None) -> tuple[list[str], list[ClaimedMessage]]:
        for attempt in range(3):
            try:
                with self._write() as conn:
                    return self._insert(conn, messages, now, claim, check_room=True)
            except IntegrityError:
                # Another enqueue committed the same idempotency key between
                # our lookup and our insert: look again.
                if attempt == 2:
                    raise SpoolUnavailable("The spool refused the message because of a conflicting "
                                           "idempotency key; try again.") from None
        raise AssertionError("unreachable")

    def _insert(self, conn: Connection, messages: Sequence[NewMessage], now: float,
                claim: tuple[str, float] | None = None, *,
                check_room: bool = False) -> tuple[list[str], list[ClaimedMessage]]:
        """Insert messages and recipients (executemany): the ids in input order,
        and (with ``claim`` = (node, lease expiry)) the new messages as claimed.
        ``check_room``: refuse (SpoolUnavailable) new mail that would eat into
        ``spool.min_free_space`` -- only what is new: a known idempotency key
        still returns its id."""
        ids: list[str | None] = [None] * len(messages)
        keys = [m.idempotency_key for m in messages if m.idempotency_key]
        known: dict[str, str] = {}
        for chunk in _chunks(keys):
            rows = conn.execute(select(M.c.idempotency_key, M.c.id).where(M.c.idempotency_key.in_(chunk)))
            known.update({k: i for k, i in rows})
        message_rows: list[tuple] = []
        recipient_rows: list[tuple] = []
        new: list[tuple[str, NewMessage]] = []
        if claim is None:
            state, owner, expires, due = State.QUEUED.value, None, None, now
        else:
            state, owner, expires, due = State.INFLIGHT.value, claim[0], claim[1], claim[1]
        for n, msg in enumerate(messages):
            key = msg.idempotency_key
            if key and key in known:
                ids[n] = known[key]
                continue
            qid = new_queue_id(now)
            if key:
                known[key] = qid
            ids[n] = qid
            new.append((qid, msg))
            message_rows.append(_message_row(qid, msg, now))
            recipient_rows.extend(_recipient_rows(qid, msg, now, state, due, owner, expires))
        claimed: list[ClaimedMessage] = []
        if check_room:
            self._check_room([m for _, m in new])
        if message_rows:
            conn.exec_driver_sql(self._insert_messages, message_rows)
            if recipient_rows:
                conn.exec_driver_sql(self._insert_recipients, recipient_rows)
            if claim is None:
                if self._notify:
                    conn.exec_driver_sql("NOTIFY relay_queue")
            else:
                claimed = self._as_claimed(conn, new, now)
        return ids, claimed  # type: ignore[return-value]

    @staticmethod
    def _as_claimed(conn: Connection, new: list[tuple[str, NewMessage]], now: float) -> list[ClaimedMessage]:
        """The just-inserted messages as ClaimedMessages (one SELECT of the recipients' ids)."""
        rids: dict[tuple[str, int], int] = {}
        for chunk in _chunks([qid for qid, _ in new]):
            rids.update({(mid, pos): rid for rid, mid, pos in conn.execute(
                select(R.c.id, R.c.message_id, R.c.position).where(R.c.message_id.in_(chunk)))})
        return _claimed_messages(new, rids, now)

    # -- claims ---------------------------------------------------------

    def claim(self, node: str, now: float, lease: float, limit: int,
              exclude_domains: Sequence[str] = ()) -> list[ClaimedMessage]:
        expires = now + lease
        due = (select(R.c.id)
               .where(R.c.next_attempt_at <= now)
               .order_by(R.c.next_attempt_at, R.c.id)
               .limit(limit))
        if exclude_domains:
            due = due.where(R.c.domain.not_in(list(exclude_domains)))
        if self.dialect == "postgresql":
            due = due.with_for_update(skip_locked=True)
        stmt = (update(R)
                .where(R.c.id.in_(due.scalar_subquery()))
                .values(state=State.INFLIGHT.value, lease_owner=node, lease_expires_at=expires,
                        next_attempt_at=expires, updated_at=now)
                .returning(R.c.id, R.c.message_id, R.c.address, R.c.domain, R.c.attempts,
                           R.c.queued_at, R.c.position))
        with self._write() as conn:
            claimed = conn.execute(stmt).all()
            if not claimed:
                return []
            # The bodies of the claimed recipients' messages: every row this
            # claim touched has next_attempt_at = expires (the due index), so
            # no list of ids is sent (a row of an earlier claim with the same
            # expiry only adds a body that is not used).
            bodies = {row[0]: row for row in conn.execute(
                select(M.c.id, M.c.sender, M.c.data, M.c.size, M.c.eight_bit, M.c.created_at)
                .where(M.c.id.in_(select(R.c.message_id)
                                  .where(R.c.next_attempt_at == expires, R.c.lease_owner == node)
                                  .scalar_subquery()))).all()}
        by_message: dict[str, list] = {}
        for row in claimed:
            rows = by_message.get(row[1])
            if rows is None:
                by_message[row[1]] = [row]
            else:
                rows.append(row)
        out = []
        for qid, rows in by_message.items():
            body = bodies.get(qid)
            if body is None:   # deleted between statements: cannot happen inside one transaction
                continue
            if len(rows) > 1:
                rows.sort(key=lambda r: r[6])
            _id, sender, data, size, eight_bit, created_at = body
            out.append(ClaimedMessage(
                id=qid, sender=sender, data=bytes(data), size=size,
                eight_bit=bool(eight_bit), created_at=created_at,
                recipients=tuple(ClaimedRecipient(id=rid, message_id=qid, address=address,
                                                  domain=domain, attempts=attempts,
                                                  queued_at=queued_at)
                                 for rid, _mid, address, domain, attempts, queued_at, _pos in rows)))
        out.sort(key=lambda m: (m.created_at, m.id))
        return out

    def renew(self, node: str, now: float, lease: float,
              recipient_ids: Sequence[int] | None = None) -> int:
        expires = now + lease
        stmt = (update(R)
                .where(R.c.lease_owner == node, R.c.state == State.INFLIGHT.value)
                .values(lease_expires_at=expires, next_attempt_at=expires))
        with self._write() as conn:
            if recipient_ids is None:
                return conn.execute(stmt).rowcount
            return sum(conn.execute(stmt.where(R.c.id.in_(chunk))).rowcount
                       for chunk in _chunks(list(recipient_ids)))

    def _unclaim_values(self, now: float) -> dict:
        return dict(
            state=case((R.c.attempts == 0, State.QUEUED.value), else_=State.DEFERRED.value),
            lease_owner=None, lease_expires_at=None, next_attempt_at=now, updated_at=now)

    def release(self, node: str, recipient_ids: Sequence[int], now: float) -> int:
        if not recipient_ids:
            return 0
        stmt = (update(R)
                .where(R.c.lease_owner == node, R.c.state == State.INFLIGHT.value)
                .values(**self._unclaim_values(now)))
        with self._write() as conn:
            return sum(conn.execute(stmt.where(R.c.id.in_(chunk))).rowcount
                       for chunk in _chunks(list(recipient_ids)))

    def recover(self, node: str, now: float) -> int:
        stmt = (update(R)
                .where(R.c.lease_owner == node, R.c.state == State.INFLIGHT.value)
                .values(**self._unclaim_values(now)))
        with self._write() as conn:
            return conn.execute(stmt).rowcount

    # -- outcomes -------------------------------------------------------

    def record(self, node: str, now: float, outcomes: Sequence[Outcome],
               new_messages: Sequence[NewMessage] = ()) -> list[str]:
        with self._write() as conn:
            held: set[int] = set()
            ids = [o.recipient_id for o in outcomes]
            for chunk in _chunks(ids):
                held.update(conn.execute(
                    select(R.c.id).where(R.c.id.in_(chunk), R.c.lease_owner == node,
                                         R.c.state == State.INFLIGHT.value)).scalars().all())
            # Outcomes that write the same values (typically every recipient a
            # peer accepted with the same reply) share one UPDATE ... WHERE id
            # IN (...) and one INSERT ... SELECT of their history rows; the
            # others go row by row (executemany), as all did before.
            mine: list[Outcome] = []
            for o in outcomes:
                if o.recipient_id not in held:
                    continue   # our lease lapsed and another node took it
                if o.state not in (State.DELIVERED, State.DEFERRED, State.BOUNCED):
                    raise ValueError(f"an outcome cannot set state {o.state}")
                if o.state is State.DEFERRED and o.next_attempt_at is None:
                    raise ValueError("a deferred outcome needs next_attempt_at")
                mine.append(o)
            groups: dict[tuple, list[Outcome]] = {}
            if len({o.recipient_id for o in mine}) == len(mine):
                for o in mine:
                    key = (o.state, o.attempted, o.next_attempt_at if o.state is State.DEFERRED else None,
                           o.code, o.response, o.host)
                    group = groups.get(key)
                    if group is None:
                        groups[key] = [o]
                    else:
                        group.append(o)
            else:   # one recipient twice (never from the drain): in order, one by one
                groups = {(o,): [o] for o in mine}
            rows, history = [], []
            for group in groups.values():
                o = group[0]
                inc = 1 if o.attempted else 0
                next_at = o.next_attempt_at if o.state is State.DEFERRED else None
                if len(group) > 1:
                    for chunk in _chunks([g.recipient_id for g in group]):
                        conn.execute(_UPDATE_MANY, {"ids": chunk, "b_state": o.state.value, "b_inc": inc,
                                                    "b_next": next_at, "b_code": o.code,
                                                    "b_response": o.response, "b_now": now})
                        if o.attempted:
                            conn.execute(_HISTORY_MANY, {"ids": chunk, "h_at": now, "h_host": o.host,
                                                         "h_code": o.code, "h_response": o.response})
                    continue
                rows.append({"b_id": o.recipient_id, "b_state": o.state.value, "b_inc": inc, "b_next": next_at,
                             "b_code": o.code, "b_response": o.response, "b_now": now})
                if o.attempted:
                    history.append({"recipient_id": o.recipient_id, "at": now, "host": o.host,
                                    "code": o.code, "response": o.response})
            if rows:
                conn.execute(_UPDATE_ONE, rows)
            if history:
                conn.execute(insert(A), history)
            return self._insert(conn, new_messages, now)[0] if new_messages else []

    # -- inspection -----------------------------------------------------

    def status(self, now: float) -> SpoolStatus:
        with self._read(self.STATUS_TIMEOUT) as conn:
            n_messages = conn.execute(select(func.count()).select_from(M)).scalar_one()
            counts = {s.value: 0 for s in State}
            for state, n in conn.execute(select(R.c.state, func.count()).group_by(R.c.state)):
                counts[state] = n
            oldest = [conn.execute(select(func.min(R.c.queued_at)).where(R.c.state == s)).scalar()
                      for s in _PENDING]
            oldest = [o for o in oldest if o is not None]
            next_at = conn.execute(select(func.min(R.c.next_attempt_at))
                                   .where(R.c.state == State.DEFERRED.value)).scalar()
            per_domain: dict[str, dict[str, int]] = defaultdict(dict)
            for domain, state, n in conn.execute(
                    select(R.c.domain, R.c.state, func.count())
                    .where(R.c.state.in_(_PENDING)).group_by(R.c.domain, R.c.state)):
                per_domain[domain][state] = n
        domains = sorted((DomainCounts(domain=d, **c) for d, c in per_domain.items()),
                         key=lambda d: (-(d.queued + d.deferred + d.inflight), d.domain))
        return SpoolStatus(messages=n_messages, recipients=counts,
                           oldest_pending_at=min(oldest) if oldest else None,
                           next_attempt_at=next_at, domains=tuple(domains[:20]))

    def list_messages(self, state: str | None = None, domain: str | None = None,
                      limit: int | None = None) -> list[MessageInfo]:
        states = [state] if state else list(_NOT_FINAL)
        cond = [R.c.message_id == M.c.id, R.c.state.in_(states)]
        if domain:
            cond.append(R.c.domain == domain.lower().rstrip("."))
        stmt = (select(M.c.id, M.c.sender, M.c.size, M.c.created_at, M.c.subject, M.c.message_id_header)
                .where(exists().where(and_(*cond)))
                .order_by(M.c.created_at, M.c.id))
        if limit:
            stmt = stmt.limit(limit)
        with self._read() as conn:
            msgs = conn.execute(stmt).all()
            rcpts: dict[str, list] = defaultdict(list)
            for chunk in _chunks([m.id for m in msgs]):
                for r in conn.execute(select(R).where(R.c.message_id.in_(chunk))
                                      .order_by(R.c.message_id, R.c.position)):
                    rcpts[r.message_id].append(r)
        return [MessageInfo(id=m.id, sender=m.sender, size=m.size, created_at=m.created_at,
                            subject=m.subject, message_id=m.message_id_header,
                            recipients=tuple(self._recipient_info(r, ()) for r in rcpts[m.id]))
                for m in msgs]

    @staticmethod
    def _recipient_info(r, history) -> RecipientInfo:
        return RecipientInfo(
            address=r.address, domain=r.domain, state=State(r.state), attempts=r.attempts,
            next_attempt_at=r.next_attempt_at if r.state in (State.QUEUED.value, State.DEFERRED.value) else None,
            last_code=r.last_code, last_response=r.last_response, history=tuple(history))

    def show(self, queue_id: str, include_data: bool = False) -> MessageInfo:
        cols = [M.c.id, M.c.sender, M.c.size, M.c.created_at, M.c.subject, M.c.message_id_header]
        if include_data:
            cols.append(M.c.data)
        with self._read() as conn:
            m = conn.execute(select(*cols).where(M.c.id == queue_id)).first()
            if m is None:
                raise UnknownMessage(f"There is no message {queue_id} in the spool.")
            rs = conn.execute(select(R).where(R.c.message_id == queue_id).order_by(R.c.position)).all()
            history: dict[int, list[Attempt]] = defaultdict(list)
            for a in conn.execute(select(A).where(A.c.recipient_id.in_([r.id for r in rs]))
                                  .order_by(A.c.recipient_id, A.c.at, A.c.id)):
                history[a.recipient_id].append(Attempt(at=a.at, host=a.host, code=a.code, response=a.response))
        return MessageInfo(id=m.id, sender=m.sender, size=m.size, created_at=m.created_at,
                           subject=m.subject, message_id=m.message_id_header,
                           recipients=tuple(self._recipient_info(r, history[r.id]) for r in rs),
                           data=bytes(m.data) if include_data else None)

    # -- administration -------------------------------------------------

    def _require(self, conn: Connection, queue_id: str) -> None:
        if conn.execute(select(M.c.id).where(M.c.id == queue_id)).first() is None:
            raise UnknownMessage(f"There is no message {queue_id} in the spool.")

    def _refuse_in_flight(self, conn: Connection, queue_id: str, now: float, verb: str) -> None:
        live = conn.execute(select(func.count()).where(
            R.c.message_id == queue_id, R.c.state == State.INFLIGHT.value,
            R.c.lease_expires_at > now)).scalar_one()
        if live:
            raise MessageInFlight(f"Message {queue_id} is being delivered right now, so it cannot be "
                                  f"{verb}; try again in a moment.")

    def retry(self, now: float, queue_id: str | None = None, domain: str | None = None) -> int:
        stmt = (update(R).where(R.c.state.in_((State.QUEUED.value, State.DEFERRED.value)))
                .values(next_attempt_at=now, updated_at=now))
        if queue_id is not None:
            stmt = stmt.where(R.c.message_id == queue_id)
        if domain is not None:
            stmt = stmt.where(R.c.domain == domain.lower().rstrip("."))
        with self._write() as conn:
            if queue_id is not None:
                self._require(conn, queue_id)
            n = conn.execute(stmt).rowcount
            if n and self._notify:
                conn.exec_driver_sql("NOTIFY relay_queue")
            return n

    def hold(self, queue_id: str, now: float) -> int:
        with self._write() as conn:
            self._require(conn, queue_id)
            self._refuse_in_flight(conn, queue_id, now, "held")
            return conn.execute(
                update(R).where(R.c.message_id == queue_id, R.c.state.in_(_PENDING))
                .values(state=State.HELD.value, next_attempt_at=None, lease_owner=None,
                        lease_expires_at=None, updated_at=now)).rowcount

    def release_held(self, queue_id: str, now: float) -> int:
        with self._write() as conn:
            self._require(conn, queue_id)
            n = conn.execute(
                update(R).where(R.c.message_id == queue_id, R.c.state == State.HELD.value)
                .values(state=case((R.c.attempts == 0, State.QUEUED.value), else_=State.DEFERRED.value),
                        next_attempt_at=now, updated_at=now)).rowcount
            if n and self._notify:
                conn.exec_driver_sql("NOTIFY relay_queue")
            return n

    def delete(self, queue_id: str, now: float) -> None:
        with self._write() as conn:
            self._require(conn, queue_id)
            self._refuse_in_flight(conn, queue_id, now, "deleted")
            rids = select(R.c.id).where(R.c.message_id == queue_id).scalar_subquery()
            conn.execute(delete(A).where(A.c.recipient_id.in_(rids)))
            conn.execute(delete(R).where(R.c.message_id == queue_id))
            conn.execute(delete(M).where(M.c.id == queue_id))

    def purge(self, older_than: float, now: float) -> int:
        cutoff = now - older_than
        unfinished = exists().where(R.c.message_id == M.c.id, R.c.state.in_(_NOT_FINAL))
        victims = select(M.c.id).where(M.c.created_at < cutoff, ~unfinished)
        with self._write() as conn:
            ids = list(conn.execute(victims).scalars())
            for chunk in _chunks(ids):
                rids = select(R.c.id).where(R.c.message_id.in_(chunk)).scalar_subquery()
                conn.execute(delete(A).where(A.c.recipient_id.in_(rids)))
                conn.execute(delete(R).where(R.c.message_id.in_(chunk)))
                conn.execute(delete(M).where(M.c.id.in_(chunk)))
            return len(ids)


def _has_input(connection) -> bool:
    """True when a PostgreSQL connection with no query running has bytes to read
    (the server closed it or sent a notice), checked without blocking."""
    try:
        readable, _, _ = select_module.select([connection.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class _DirectWriter:
    """``enqueue_claimed`` on a DBAPI connection, without SQLAlchemy.

    This is relayd's submission path: one commit per group of accepted
    messages, whose latency is the 250 every client waits for.  The statements
    are the same as ``enqueue``'s; what is saved is per-transaction overhead:

    * SQLite: SQLAlchemy's Connection and transaction objects.  The DBAPI
      connection is the pool's most recently used one, as for every other
      write of this process (writers take turns): SQLite keeps a
      connection's page cache only while no other connection has written,
      so sharing one writer connection saves re-reading pages from the WAL
      at every turn (a connection of its own re-read about five pages per
      message).
    * PostgreSQL: BEGIN, three statements, COMMIT and the pool's pre-ping
      become ONE statement in autocommit (a data-modifying CTE over
      ``unnest`` arrays): one round trip, then the WAL flush.  The connection
      is pinged only after an idle spell (a restarted server is noticed before
      the statement is sent, so nothing is ever sent twice).

    Commits may run concurrently (relayd's GroupCommitter has up to two in
    flight on PostgreSQL): each PostgreSQL commit takes an idle connection of
    the writer's own, opening one when none is idle; SQLite's writers take
    turns (``_writer_turn``).
    """

    #: PostgreSQL: ping a connection unused for this long before using it.
    IDLE_PING = 1.0

    def __init__(self, spool: SQLSpool):
        self.spool = spool
        self._lock = threading.Lock()
        #: PostgreSQL: idle connections, with when each was last used.
        self._idle: list[tuple[object, float]] = []
        self._closed = False
        quote = spool.engine.dialect.identifier_preparer.quote
        self._messages, self._recipients = quote(M.name), quote(R.name)
        if spool.dialect == "postgresql":
            mcols = ", ".join(quote(c) for c in _MESSAGE_COLUMNS)
            rcols = ", ".join(quote(c) for c in _RECIPIENT_COLUMNS)
            mtypes = ("text", "text", "bigint", "boolean", "float8", "text", "text", "text", "bytea")
            rtypes = ("text", "int", "text", "text", "text", "int", "float8", "float8", "float8", "text", "float8")
            munnest = ", ".join(f"%s::{t}[]" for t in mtypes)
            runnest = ", ".join(f"%s::{t}[]" for t in rtypes)
            self._pg_sql = (
                f"WITH new_messages AS (INSERT INTO {self._messages} ({mcols}) SELECT * FROM unnest({munnest})) "
                f"INSERT INTO {self._recipients} ({rcols}) SELECT * FROM unnest({runnest}) "
                f"RETURNING {quote('id')}, {quote('message_id')}, {quote('position')}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for raw, _ in idle:
            self._drop(raw)

    @staticmethod
    def _drop(raw) -> None:
        try:
            raw.invalidate()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass

    def _checkout(self):
        """PostgreSQL: an idle writer connection (or a new one), in
        autocommit, pinged first when it may be stale."""
        with self._lock:
            raw, last_used = self._idle.pop() if self._idle else (None, 0.0)
        if raw is None:
            raw = self.spool.engine.raw_connection()
            raw.driver_connection.autocommit = True
        elif time.monotonic() - last_used > self.IDLE_PING or _has_input(raw.driver_connection):
            # Idle for a while, or the server said something unasked (it does
            # when it ends the session: a restart, pg_terminate_backend): ping,
            # and on failure reconnect before the statement is sent.
            try:
                raw.driver_connection.execute("SELECT 1")
            except Exception:  # noqa: BLE001 - any failure: reconnect
                self._drop(raw)
                return self._checkout()
        return raw

    def _checkin(self, raw) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append((raw, time.monotonic()))
                return
        self._drop(raw)         # a commit that ended after close()

    def enqueue_claimed(self, messages: Sequence[NewMessage], now: float, node: str,
                        expires: float) -> tuple[list[str], list[ClaimedMessage]]:
        spool = self.spool
        if not messages:
            return [], []
        spool._check_room(messages)
        new = [(new_queue_id(now), m) for m in messages]
        message_rows = [_message_row(qid, m, now) for qid, m in new]
        inflight = State.INFLIGHT.value
        recipient_rows = [row for qid, m in new
                          for row in _recipient_rows(qid, m, now, inflight, expires, node, expires)]
        dbapi_error = spool.engine.dialect.loaded_dbapi.Error
        if spool.dialect == "postgresql":
            raw = None
            try:
                raw = self._checkout()
                rows = self._postgresql(raw, message_rows, recipient_rows)
            except BaseException as e:
                if raw is not None:
                    self._drop(raw)     # never back to the free list after a failure
                if isinstance(e, dbapi_error):
                    raise SpoolUnavailable(_sentence(spool.url, e)) from e
                raise
            self._checkin(raw)
        else:
            with spool._writer_turn():
                raw = spool.engine.raw_connection()     # the pool's most recent: see above
                try:
                    rows = self._sqlite(raw, message_rows, recipient_rows, [qid for qid, _ in new])
                except dbapi_error as e:
                    raw.invalidate()
                    raise SpoolUnavailable(_sentence(spool.url, e)) from e
                finally:
                    raw.close()         # back to the pool (a no-op once invalidated)
        rids = {(mid, pos): rid for rid, mid, pos in rows}
        return [qid for qid, _ in new], _claimed_messages(new, rids, now)

    def _sqlite(self, raw, message_rows, recipient_rows, qids) -> list[tuple]:
        cur = raw.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany(self.spool._insert_messages, message_rows)
                if recipient_rows:
                    cur.executemany(self.spool._insert_recipients, recipient_rows)
                rows: list[tuple] = []
                for chunk in _chunks(qids):
                    cur.execute(f"SELECT id, message_id, position FROM {self._recipients} "
                                f"WHERE message_id IN ({', '.join('?' * len(chunk))})", list(chunk))
                    rows.extend(cur.fetchall())
                cur.execute("COMMIT")
            except BaseException:
                if raw.driver_connection.in_transaction:
                    cur.execute("ROLLBACK")
                raise
        finally:
            cur.close()
        return rows

    def _postgresql(self, raw, message_rows, recipient_rows) -> list[tuple]:
        with raw.driver_connection.cursor() as cur:
            cur.execute(self._pg_sql, [list(column) for column in zip(*message_rows)]
                        + [list(column) for column in zip(*recipient_rows)])
            return cur.fetchall()
