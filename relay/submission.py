"""The SMTP submission listener (``submission.listen``): mail in over ESMTP.

Twisted's ``smtp.ESMTP`` server with relay's own ``IMessageDelivery`` (one
per connection, or one per login when ``submission.users`` is set) and one
``IMessage`` per SMTP transaction.  SPEC "Submission listener":

* ESMTP with SIZE, 8BITMIME, SMTPUTF8, PIPELINING and, when users are
  configured, AUTH PLAIN/LOGIN through ``twisted.cred`` (required before MAIL
  from every client, loopback included).  Without users only loopback
  clients are served (others get 554 and are disconnected), and a
  non-loopback listen address is refused at build time (:data:`OPEN_RELAY`).
* Addresses are checked with :mod:`relay.message` rules and refused, never
  repaired: command syntax -> 501, an address the rules refuse -> 553.
  (Twisted's own ``smtp.Address`` is not used for that: it adds a default
  domain to ``<user>``, strips source routes and cannot parse address
  literals, so MAIL and RCPT are parsed here.)
* SMTPUTF8 (RFC 6531), as Postfix's ``smtputf8_enable = yes``: ``MAIL FROM:
  <addr> SMTPUTF8`` (no value: ``SMTPUTF8=x`` -> 501 5.5.4) makes the
  transaction an SMTPUTF8 one, whose sender and recipients may be UTF-8
  (the same :mod:`relay.message` rules as ``relayctl enqueue``; no IDNA or
  other conversion, addresses are kept as sent).  Octets that are not UTF-8
  -> 501 5.5.2.  Without the parameter a non-ASCII address -> 553 5.6.7
  (RFC 6531 §3.4).  Content rules are the same with or without SMTPUTF8:
  like ``relayctl enqueue``, UTF-8 in header fields (RFC 6532) is accepted
  either way.  ``Received:`` says ``with UTF8SMTP`` / ``UTF8SMTPS`` /
  ``UTF8SMTPA`` / ``UTF8SMTPSA`` for SMTPUTF8 transactions (RFC 6531 §3.7.3)
  and is then written in UTF-8.
* Oversize -> 552 (at MAIL with ``SIZE=``, or at the final dot after counting
  the data, which is discarded); content the rules refuse (a line over 998
  octets, bad headers...) -> 501 5.6.0 with the sentence (SPEC "Content":
  SMTP 501 or 553; RFC 5321 would have 554 at the end of DATA), after the
  final dot; the session goes on, also after a data line too long for
  Twisted's line reader (16 KiB), which is read to its end and left out.
* STARTTLS (RFC 3207) when ``submission.tls_cert``/``tls_key`` are set
  (:func:`load_submission_tls`).  Whatever the client pipelined after
  STARTTLS in plaintext is discarded, never run after the handshake
  (CVE-2011-0411), and TLS starts a new session: EHLO/HELO, MAIL/RCPT and
  any AUTH are forgotten.  STARTTLS with an argument -> 501, once TLS is on
  -> 503; inside a transaction it is allowed and resets it (as Postfix's
  smtpd does).  Like Postfix's ``smtpd_tls_auth_only = yes``, a non-loopback
  client that has not started TLS is not offered AUTH and gets 530 5.7.0 for
  AUTH and MAIL; loopback clients are served as without TLS.
* 250 after DATA only once the message is committed.  Messages that finish
  DATA while commits are running wait for the next one, which takes them all
  in ONE ``spool.enqueue`` transaction (:class:`GroupCommitter`); one commit
  is in flight at a time on SQLite, two on PostgreSQL.  A commit that could
  start while another session is mid-transaction (:func:`mid_transaction`)
  waits for that session's message up to ``submission.commit_delay``.  Spool trouble -> 451 4.3.0 (452 4.3.1
  when full).

Pipelining: Twisted's server handles commands in order, but it would go on
reading commands while a commit runs, so a ``QUIT`` or ``MAIL`` pipelined
after the final dot would be answered before the message's 250.  Input is
therefore held from the final dot until its reply is sent, then replayed
(the socket is read on meanwhile, so that a client hanging up is noticed, up
to ``MAX_HELD_BYTES``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import ipaddress
import re
import time
from collections import deque
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Callable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.cred import credentials as cred_credentials
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.config import Config, check_tls_pair, parse_hostport, parse_listen
from relay.errors import BadMessage, CannotListen, ConfigError, SpoolUnavailable
from relay.logfmt import format_accepted
from relay.message import MAX_LINE, parse_submitted, validate_address, validate_sender
from relay.model import NewMessage
from relay.sendnow import close_now, flush_now, write_now
from relay.spool.engine import is_sqlite
from relay.spool.space import human_size

log = Logger(namespace="relay.submission")

OPEN_RELAY = ("submission.listen is not a loopback address and submission.users is empty; "
              "refusing to run an open relay.")

#: Most messages one commit (one spool transaction) takes.
MAX_BATCH = 500
#: Most message bytes one commit takes (a batch always has at least one message).
MAX_BATCH_BYTES = 64 * 1024 * 1024
#: Most recipients of one transaction (RFC 5321 §4.5.3.1.8 asks for at least 100).
MAX_RECIPIENTS = 1000
#: Input a session may send ahead while its message is being committed before it is paused.
MAX_HELD_BYTES = 256 * 1024
#: Idle timeout of a session, seconds (RFC 5321 §4.5.3.2.7: server timeout 5 minutes).
SESSION_TIMEOUT = 300
#: Failed AUTH attempts after which a session is closed with 421 (each is logged).
AUTH_FAILURE_LIMIT = 3
#: Commands of RFC 5321 and its extensions this listener knows but does not
#: offer: 502 (not implemented), where an unknown command gets 500.
NOT_IMPLEMENTED = frozenset({b"EXPN", b"HELP", b"ETRN", b"TURN", b"ATRN", b"BDAT", b"SEND", b"SOML", b"SAML"})

_MAIL_RE = re.compile(rb"FROM:[ \t]*<(?P<path>[^<>]*)>(?P<params>(?:[ \t]+.*)?)\Z", re.I | re.S)
_RCPT_RE = re.compile(rb"TO:[ \t]*<(?P<path>[^<>]*)>(?P<params>(?:[ \t]+.*)?)\Z", re.I | re.S)
_PARAM_RE = re.compile(rb"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?\Z")
_HELO_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")
#: The reply to a message with a data line too long for Twisted's line reader.
_LONG_LINE = (f"5.6.0 A line of the message is longer than {MAX_LINE} octets "
              "(RFC 5322 section 2.1.1); nothing was queued.").encode()
#: What a client-chosen name may not carry into a log line: anything but
#: printable ASCII, and quotes and backslashes.
_UNSAFE_IN_LOG = re.compile(r"[^\x21-\x7e]|['\"\\]")


def drop_long_lines(text: bytes, in_long_line: bool, limit: int) -> tuple[bytes, bytes, bool, bool]:
    """Take the data lines longer than ``limit`` octets out of one read.

    ``text`` starts at the start of a line, or inside a line already too long
    when ``in_long_line`` (the previous read ended in it).  Only lines before
    the final ``.`` line are data; the dot and what follows it are kept as
    they are.  Returns ``(kept, carry, in_long_line, dropped)``: ``kept`` is
    ``text`` without the long lines (each with its CRLF); when the read ends
    inside a long line, ``kept`` holds only whole lines, ``in_long_line`` is
    True and ``carry`` (a CR that may start the line's CRLF, or nothing)
    must go in front of the next read.  ``dropped`` says whether anything
    was taken out.  Lines end at CRLF only, as everywhere in the listener.
    """
    dropped = False
    if in_long_line:
        end = text.find(b"\r\n")
        if end < 0:
            return b"", (b"\r" if text.endswith(b"\r") else b""), True, True
        text, dropped = text[end + 2:], True
    if len(text) <= limit:
        return text, b"", False, dropped
    lines = text.split(b"\r\n")
    partial = lines.pop()
    try:
        end = lines.index(b".")
    except ValueError:
        end = len(lines)
    data = lines[:end]
    kept = [line for line in data if len(line) <= limit]
    dropped = dropped or len(kept) < len(data)
    if end < len(lines):
        return b"\r\n".join(kept + lines[end:] + [partial]), b"", False, dropped
    if len(partial) > limit:
        return b"".join(line + b"\r\n" for line in kept), (b"\r" if partial.endswith(b"\r") else b""), True, True
    return b"\r\n".join(kept + [partial]), b"", False, dropped


@functools.lru_cache(maxsize=1024)
def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ::ffff:127.x.y.z (a textual IP address).

    Cached: every connection asks, nearly always about the same few peers."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


_date_cache: list = [None, ""]


def _date_now() -> str:
    """The RFC 5322 date of this second (local time), formatted once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, formatdate(now, localtime=True)]
    return _date_cache[1]


def _reply(text: str) -> bytes:
    """One reply line from a sentence: ASCII, no CR/LF (a sentence may quote client input)."""
    return re.sub(r"[\r\n]+", " ", text).encode("ascii", "backslashreplace")


_NON_ASCII = b"5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL."
_BAD_UTF8_SENDER = b"5.5.2 The sender address is not valid UTF-8."
_BAD_UTF8_RECIPIENT = b"5.5.2 The recipient address is not valid UTF-8."
_TLS_FIRST = b"5.7.0 Must issue a STARTTLS command first"

#: Formatted replies, by (code, text): most replies are the same every time.
_REPLIES: dict[tuple[int, bytes], bytes] = {}


# -- group commit ---------------------------------------------------------

class GroupCommitter:
    """Commits accepted messages to the spool, many sessions per transaction.

    ``submit`` returns a Deferred that fires with the queue id once the
    message is committed (or fails with the spool's error).  While fewer than
    ``max_in_flight`` commits run a message is committed at once; messages
    submitted while the limit is reached are taken together by the next
    commit (at most ``max_batch`` messages / ``max_batch_bytes``).  SQLite
    has one writer, so relayd allows one commit in flight there; PostgreSQL
    commits concurrently (and merges their WAL flushes), so relayd allows two:
    the next group starts while the previous one waits for its flush.

    ``commit_delay`` (seconds, 0 = off) is PostgreSQL's ``commit_delay`` with
    ``commit_siblings`` for sessions: when a commit could start but
    ``siblings()`` says another session is in the middle of a transaction
    (its message will come soon), the commit waits for it, until no such
    session is left or ``commit_delay`` has passed.  A lone client never
    waits; under load a commit takes several messages instead of one or two,
    and the spool's per-commit cost (the fsync, the thread hand-off) is paid
    that many fewer times.
    """

    def __init__(self, spool, clock, *, on_committed: Callable[[int, bool], None] = lambda n, handed_off: None,
                 handoff=None, max_batch: int = MAX_BATCH, max_batch_bytes: int = MAX_BATCH_BYTES,
                 commit_delay: float = 0.0, siblings: Callable[[], bool] = lambda: False,
                 max_in_flight: int = 1):
        self._spool = spool
        self._clock = clock
        self._on_committed = on_committed
        #: relayd's drain (``claim_terms()``, ``adopt(messages)``): when it has
        #: room, a batch is queued already claimed for it and handed over, and
        #: ``on_committed`` is not called (nothing else needs waking).
        self._handoff = handoff
        self._max_batch = max_batch
        self._max_bytes = max_batch_bytes
        self._commit_delay = commit_delay
        self._siblings = siblings
        #: The timer of a commit held back for siblings (``commit_delay``).
        self._held_back = None
        self._pending_bytes = 0
        self._pending: deque[tuple[NewMessage, defer.Deferred]] = deque()
        self._max_in_flight = max_in_flight
        #: Commits running now.
        self._inflight = 0
        self._idle: list[defer.Deferred] = []
        #: Commits (spool transactions) started so far.
        self.commits = 0
        #: Messages committed so far (``messages / commits`` is the group size).
        self.messages = 0

    @property
    def max_in_flight(self) -> int:
        """How many commits may run at once."""
        return self._max_in_flight

    def submit(self, message: NewMessage) -> "defer.Deferred[str]":
        d: defer.Deferred = defer.Deferred()
        self._pending.append((message, d))
        self._pending_bytes += message.size
        self._next()
        return d

    def withdraw(self, d: defer.Deferred) -> bool:
        """Drop a submitted message whose commit has not started; True if it was dropped."""
        for entry in self._pending:
            if entry[1] is d:
                self._pending.remove(entry)
                self._pending_bytes -= entry[0].size
                if not self._pending:
                    self._cancel_hold()
                self._check_idle()
                return True
        return False

    def recheck(self) -> None:
        """A session left the middle of its transaction without submitting
        (RSET, a new EHLO, STARTTLS, a failed DATA, hung up): a commit held
        back for it may start now."""
        self._next()

    def idle(self) -> defer.Deferred:
        """A Deferred that fires once nothing is pending or being committed."""
        d: defer.Deferred = defer.Deferred()
        self._idle.append(d)
        self._check_idle()
        return d

    def _check_idle(self) -> None:
        if not self._inflight and not self._pending:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def _next(self) -> None:
        if self._inflight >= self._max_in_flight or not self._pending:
            return
        if (self._commit_delay and len(self._pending) < self._max_batch
                and self._pending_bytes < self._max_bytes and self._siblings()):
            if self._held_back is None:
                self._held_back = self._clock.callLater(self._commit_delay, self._delay_over)
            return
        self._cancel_hold()
        self._start()

    def _cancel_hold(self) -> None:
        if self._held_back is not None:
            self._held_back.cancel()
            self._held_back = None

    def _delay_over(self) -> None:
        self._held_back = None
        if self._inflight < self._max_in_flight and self._pending:
            self._start()

    def _start(self) -> None:
        batch: list[tuple[NewMessage, defer.Deferred]] = []
        size = 0
        while self._pending and len(batch) < self._max_batch:
            message = self._pending[0][0]
            if batch and size + message.size > self._max_bytes:
                break
            batch.append(self._pending.popleft())
            self._pending_bytes -= message.size
            size += message.size
        self._inflight += 1
        self.commits += 1
        self.messages += len(batch)
        messages = [m for m, _ in batch]
        terms = self._handoff.claim_terms() if self._handoff is not None else None
        try:
            if terms is None:
                d = self._spool.enqueue(messages, self._clock.seconds())
            else:
                d = self._spool.enqueue_claimed(messages, self._clock.seconds(), *terms)
        except Exception:  # noqa: BLE001 - a synchronous failure is reported like an asynchronous one
            d = defer.fail()
        d.addBoth(self._done, batch)

    def _done(self, result, batch: list[tuple[NewMessage, defer.Deferred]]) -> None:
        self._inflight -= 1
        # Start the next commit (the messages that arrived meanwhile) before
        # answering this one's sessions.
        self._next()
        if isinstance(result, Failure):
            if not result.check(SpoolUnavailable):
                log.failure("committing {n} submitted message(s) failed", result, n=len(batch))
            for _, d in batch:
                d.errback(result)
        else:
            ids, claimed = result if isinstance(result, tuple) else (result, None)
            # The 250s first: the hooks (relayd: start delivering, or wake the
            # drain, which claims on the spool's threads) would otherwise delay them.
            for (_, d), qid in zip(batch, ids):
                d.callback(qid)
            handed_off = False
            if claimed is not None:
                try:
                    self._handoff.adopt(claimed)
                    handed_off = True
                except Exception:  # noqa: BLE001 - the mail is committed; its lease brings it back
                    log.failure("handing {n} accepted message(s) to the drain failed", n=len(batch))
            try:
                self._on_committed(len(batch), handed_off)
            except Exception:  # noqa: BLE001 - never lose the 250s over a hook
                log.failure("after-commit hook failed")
        self._check_idle()
        return None


def commits_in_flight(spool_url: str) -> int:
    """How many listener commits may run at once: 1 on SQLite (one writer at
    a time), 2 on PostgreSQL (see GroupCommitter)."""
    return 1 if is_sqlite(spool_url) else 2


def mid_transaction(transactions: set) -> bool:
    """Whether any session in ``transactions`` is between an accepted MAIL and
    handing its message to the committer (the group commit's siblings).
    Sessions found past that point are dropped from the set."""
    ended = []
    found = False
    for session in transactions:
        if session.mid_transaction:
            found = True
            break
        ended.append(session)
    for session in ended:
        transactions.discard(session)
    return found


# -- envelope, delivery, message -------------------------------------------

@dataclass(frozen=True)
class Path:
    """A validated envelope address (``""`` is the null sender).

    Passed to ``validateFrom`` / ``validateTo`` in place of ``smtp.Address``
    (same ``local``/``domain``/``str()``), keeping the text exactly as given.
    """

    address: str

    @property
    def local(self) -> bytes:
        return self.address.rpartition("@")[0].encode()

    @property
    def domain(self) -> bytes:
        return self.address.rpartition("@")[2].encode()

    def __str__(self) -> str:
        return self.address

    def __bytes__(self) -> bytes:
        return self.address.encode()


@dataclass(frozen=True)
class Recipient:
    """What ``validateTo`` gets: like ``smtp.User`` (``dest``, ``helo``, ``protocol``, ``orig``)."""

    dest: Path
    helo: tuple
    protocol: "SubmissionProtocol"
    orig: Path

    def __str__(self) -> str:
        return self.dest.address


@dataclass
class Transaction:
    """One MAIL ... DATA transaction of a session."""

    sender: str
    recipients: list[str] = field(default_factory=list)
    received: bytes = b""


@dataclass
class _Settings:
    """What every session of one listener shares."""

    hostname: str
    max_size: int
    committer: GroupCommitter
    requires_auth: bool
    sessions: set = field(default_factory=set)
    #: Open sessions whose MAIL was accepted, for the group commit's siblings
    #: (:func:`mid_transaction`); a session leaves when it closes, or when it
    #: is looked at after its transaction ended.
    transactions: set = field(default_factory=set)
    #: ``submission.tls_cert``/``tls_key`` loaded (:func:`load_submission_tls`); None = no STARTTLS.
    tls: ssl.CertificateOptions | None = None
    #: Takes the line logged for each message once committed (logfmt.format_accepted).
    log_line: Callable[[str], None] = field(default=lambda line: log.info("{line}", line=line))
    #: Whether the spool has room for a message of N octets (``spool.min_free_space``).
    has_room: Callable[[int], bool] = field(default=lambda size: True)


@implementer(smtp.IMessageDelivery)
class SubmissionDelivery:
    """Accepts any valid envelope (address rules were applied by the protocol)."""

    def __init__(self, settings: _Settings, user: str | None = None):
        self.settings = settings
        self.user = user
        self.transaction: Transaction | None = None

    def validateFrom(self, helo, origin: Path) -> Path:
        self.transaction = Transaction(sender=origin.address)
        return origin

    def validateTo(self, user: Recipient) -> Callable[[], "SubmittedMessage"]:
        txn = self.transaction
        if txn is None:
            raise smtp.SMTPBadRcpt(str(user), 503, "5.5.1 Need MAIL before RCPT")
        txn.recipients.append(user.dest.address)
        settings, proto = self.settings, user.protocol
        return lambda: SubmittedMessage(settings, txn, proto)

    def receivedHeader(self, helo, origin, recipients) -> None:
        """Build the transaction's ``Received:`` field and keep it with the transaction.

        It is returned as None so that Twisted does not feed it through
        ``IMessage.lineReceived`` (where it would count against SIZE and
        shift the line numbers of error messages); the message prepends it.
        """
        txn = self.transaction
        if txn is None:
            return None
        proto = recipients[0].protocol if recipients else None
        utf8 = proto is not None and proto.smtputf8
        if proto is not None and (utf8 or proto.esmtp or proto.authenticated):
            # RFC 3848 (ESMTPS, ESMTPA, ESMTPSA), RFC 6531 §3.7.3 (UTF8SMTP, ...S, ...A, ...SA)
            with_ = (("UTF8SMTP" if utf8 else "ESMTP") + ("S" if proto.startedTLS else "")
                     + ("A" if proto.authenticated else ""))
        else:
            with_ = "SMTP"
        helo_arg = (helo[0] or b"").decode("ascii", "replace")
        helo_arg = _HELO_UNSAFE.sub("?", helo_arg)[:255] or "unknown"
        ip = helo[1].decode("ascii", "replace") if isinstance(helo[1], bytes) else str(helo[1])
        for_ = f"\r\n\tfor <{txn.recipients[0]}>" if len(txn.recipients) == 1 else ""
        txn.received = (f"Received: from {helo_arg} ([{ip}])\r\n"
                        f"\tby {self.settings.hostname} (relay) with {with_}{for_};\r\n"
                        f"\t{_date_now()}\r\n").encode("utf-8" if utf8 else "ascii", "replace")
        return None


@implementer(smtp.IMessage)
class SubmittedMessage:
    """The data of one transaction: counted, collected, validated and committed at the dot."""

    def __init__(self, settings: _Settings, txn: Transaction, proto: "SubmissionProtocol"):
        self.settings = settings
        self.txn = txn
        self.proto = proto
        self.lines: list[bytes] | None = []
        self.size = 0

    def lineReceived(self, line: bytes) -> None:
        if self.lines is None:
            return
        self.size += len(line) + 2
        limit = self.settings.max_size
        if limit and self.size > limit:
            self.lines = None
            raise smtp.SMTPServerError(552, _reply(
                f"5.3.4 The message is larger than the limit of {limit} octets; nothing was queued."))
        self.lines.append(line)

    def linesReceived(self, lines: list[bytes]) -> None:
        """``lineReceived`` for several lines at once (the listener's fast path)."""
        if self.lines is None:
            return
        self.size += sum(map(len, lines)) + 2 * len(lines)
        limit = self.settings.max_size
        if limit and self.size > limit:
            self.lines = None
            raise smtp.SMTPServerError(552, _reply(
                f"5.3.4 The message is larger than the limit of {limit} octets; nothing was queued."))
        self.lines.extend(lines)

    def eomReceived(self) -> "defer.Deferred[str]":
        lines, self.lines = self.lines, None
        if lines is None:
            return defer.fail(smtp.SMTPServerError(451, b"4.3.0 The message was discarded; try again."))
        raw = b"\r\n".join(lines) + b"\r\n" if lines else b""
        try:
            message = parse_submitted(raw, sender=self.txn.sender, recipients=self.txn.recipients)
        except BadMessage as e:
            return defer.fail(smtp.SMTPServerError(501, _reply(f"5.6.0 {e}")))
        message = replace(message, data=self.txn.received + message.data)
        d = self.settings.committer.submit(message)
        self.proto.commitStarted(d)
        d.addCallback(self._log_accepted, message)
        return d.addErrback(_spool_error)

    def _log_accepted(self, qid: str, message: NewMessage) -> str:
        """Log the committed message; never fails (the client must get its 250)."""
        try:
            self.settings.log_line(format_accepted(
                queue_id=qid, sender=message.sender, size=len(message.data), nrcpt=len(message.recipients),
                client=self.proto.client_ip, user=getattr(self.proto.delivery, "user", None)))
        except Exception:  # noqa: BLE001 - a log line must not turn a queued message into a 451
            log.failure("{qid}: could not log the accepted message", qid=qid)
        return qid

    def connectionLost(self) -> None:
        self.lines = None


def _spool_error(failure: Failure):
    """A failed commit as the SMTP reply for the end of DATA."""
    if failure.check(SpoolUnavailable):
        sentence = str(failure.value)
        log.warn("submission refused, spool trouble: {sentence}", sentence=sentence)
        if " full" in sentence.lower():
            raise smtp.SMTPServerError(452, b"4.3.1 The queue is full; nothing was queued, try again later.")
        raise smtp.SMTPServerError(451, b"4.3.0 The queue is unavailable; nothing was queued, try again later.")
    if failure.check(defer.CancelledError):
        raise smtp.SMTPServerError(451, b"4.3.0 Nothing was queued.")
    raise smtp.SMTPServerError(451, b"4.3.0 Local error; nothing was queued, try again later.")


# -- AUTH ------------------------------------------------------------------

@implementer(ICredentialsChecker)
class UsersChecker:
    """``submission.users`` (name -> password), compared in constant time."""

    credentialInterfaces = (cred_credentials.IUsernamePassword,)

    def __init__(self, users: Mapping[str, str]):
        self._users = {name.encode(): password.encode() for name, password in users.items()}

    def requestAvatarId(self, creds):
        name = creds.username if isinstance(creds.username, bytes) else str(creds.username or "").encode()
        given = creds.password if isinstance(creds.password, bytes) else str(creds.password or "").encode()
        expected = self._users.get(name)
        if expected is not None and hmac.compare_digest(expected, given):
            return defer.succeed(name.decode("utf-8", "replace"))
        return defer.fail(cred_error.UnauthorizedLogin())


@implementer(IRealm)
class SubmissionRealm:
    """A fresh ``SubmissionDelivery`` per login."""

    def __init__(self, settings: _Settings):
        self.settings = settings

    def requestAvatar(self, avatarId, mind, *interfaces):
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, SubmissionDelivery(self.settings, avatarId), lambda: None
        raise NotImplementedError("only IMessageDelivery is offered")


# -- the protocol ------------------------------------------------------------

class SubmissionProtocol(smtp.ESMTP):
    """``smtp.ESMTP`` with relay's envelope rules, SIZE/8BITMIME/PIPELINING and held input."""

    timeout = SESSION_TIMEOUT
    noisy = False

    def __init__(self, settings: _Settings, challengers):
        smtp.ESMTP.__init__(self, challengers, settings.tls)
        self.settings = settings
        self.host = settings.hostname
        self.esmtp = False
        self._held: deque[bytes] = deque()
        self._holding = False
        self._held_bytes = 0
        self._paused = False
        self._closed = False
        self._refused = False
        self._auth_failures = 0
        #: The client's IP address, for the log (set when connected).
        self.client_ip = "?"
        self._loopback = False
        #: Set by STARTTLS: the rest of the read it came in is plaintext to drop.
        self._drop_lines = False
        #: DATA: the last read ended inside a line over MAX_LENGTH (dataReceived).
        self._long_line = False
        #: The current transaction's MAIL had the SMTPUTF8 parameter (RFC 6531).
        self.smtputf8 = False
        self._commit: defer.Deferred | None = None
        self._closed_waiters: list[defer.Deferred] = []

    # connection ----------------------------------------------------------
    def connectionMade(self):
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", "?")
        self._loopback = is_loopback(getattr(peer, "host", ""))
        if not self.settings.requires_auth and not self._loopback:
            self._refused = True
            self.sendCode(554, b"5.7.1 This relay serves loopback clients only.")
            self.transport.loseConnection()
            return
        smtp.ESMTP.connectionMade(self)
        self.settings.sessions.add(self)

    def connectionLost(self, reason):
        self._closed = True
        self.settings.sessions.discard(self)
        if self._commit is not None:
            # The client will not see a reply: do not queue what it will send again.
            self.settings.committer.withdraw(self._commit)
            self._commit = None
        if self in self.settings.transactions:      # after the withdrawal: the recheck may start a commit
            self.settings.transactions.discard(self)
            self._left_transaction()
        self._held.clear()
        self._held_bytes = 0
        smtp.ESMTP.connectionLost(self, reason)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def whenClosed(self) -> defer.Deferred:
        """A Deferred that fires once the connection is closed."""
        d: defer.Deferred = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    def sendCode(self, code, message=b""):
        """A reply, in one write (Twisted's writes each line), with
        ``write_now`` (see relay/sendnow.py)."""
        key = (code, message)
        reply = _REPLIES.get(key)
        if reply is None:
            lines = message.splitlines() or [b""]
            prefix = b"%03d" % code
            out = [prefix + b"-" + line for line in lines[:-1]]
            out.append(prefix + b" " + lines[-1])
            out.append(b"")
            reply = b"\r\n".join(out)
            if b"queued as" not in message and len(_REPLIES) < 512:   # not the one-off replies
                _REPLIES[key] = reply
        write_now(self.transport, reply)

    def greeting(self):
        return self.host + b" ESMTP relay"

    def do_QUIT(self, rest):
        self.sendCode(221, b"See you later")
        close_now(self.transport)

    def extensions(self):
        ext = {b"PIPELINING": None, b"8BITMIME": None, b"SMTPUTF8": None,
               b"SIZE": [str(self.settings.max_size).encode()]}
        ext.update(smtp.ESMTP.extensions(self))   # AUTH (empty list: not shown), STARTTLS until started
        if self.needs_tls_first:
            del ext[b"AUTH"]
        return ext

    @property
    def needs_tls_first(self) -> bool:
        """True while AUTH and MAIL must wait for STARTTLS: TLS is configured,
        not started, and the client is not on loopback (``smtpd_tls_auth_only``)."""
        return self.ctx is not None and not self.startedTLS and not self._loopback

    def shutdown(self) -> None:
        """The listener stops: say 421 and close (mail not yet answered is not queued)."""
        if self._closed or self._holding:
            return
        self._closed = True
        self.sendCode(421, self.host + b" 4.3.2 Service shutting down; try again later.")
        self.transport.loseConnection()

    # input -----------------------------------------------------------------
    def dataReceived(self, data):
        """Message data in bulk: the lines of a chunk go to the message in one
        call (same rules as Twisted's line-by-line ``dataLineReceived``: dot
        unstuffing, the blank line before a body without headers, SIZE); the
        final dot and what follows it go the usual way.

        A data line longer than ``MAX_LENGTH`` (16 KiB, where Twisted would
        drop the connection) is read on to its end and left out, and the
        message gets 501 5.6.0 after its final dot, as a line over 998 octets
        does: the session goes on, in step with the client."""
        self._drop_lines = False        # a new read: after STARTTLS, it came through TLS
        if self.mode == smtp.DATA and not self._holding and not self._refused and (
                self._long_line or len(self._buffer) + len(data) > self.MAX_LENGTH):
            data, carry, self._long_line, dropped = drop_long_lines(
                self._buffer + data, self._long_line, self.MAX_LENGTH)
            self._buffer = b""
            if dropped:
                self._line_too_long()
            if self._long_line:         # ``data`` is whole lines, without the final dot
                if data:
                    self._data_received(data)
                self._buffer = carry
                return None
        return self._data_received(data)

    def _line_too_long(self) -> None:
        """A data line over ``MAX_LENGTH`` was left out: the message fails."""
        if self.datafailed:
            return
        self.datafailed = smtp.SMTPServerError(501, _LONG_LINE)
        for message in getattr(self, "_SMTP__messages", ()):
            message.connectionLost()
        self._left_transaction()

    def _data_received(self, data):
        if self.mode != smtp.DATA or self._holding or self._refused or self.datafailed:
            return smtp.ESMTP.dataReceived(self, data)
        messages = self._SMTP__messages
        if not all(hasattr(m, "linesReceived") for m in messages):
            return smtp.ESMTP.dataReceived(self, data)
        lines = (self._buffer + data).split(b"\r\n")
        partial = lines.pop()
        try:
            end = lines.index(b".")
        except ValueError:
            end = -1
        body = lines if end < 0 else lines[:end]      # no line over MAX_LENGTH: dataReceived took them out
        self.resetTimeout()
        if body:
            body = [line[1:] if line[:1] == b"." else line for line in body]
            if not self._SMTP__inheader and not self._SMTP__inbody:
                if b":" in body[0]:
                    self._SMTP__inheader = 1
                elif body[0]:
                    body.insert(0, b"")
                    self._SMTP__inbody = 1
            if b"" in body:
                self._SMTP__inbody = 1
            try:
                for message in messages:
                    message.linesReceived(body)
            except smtp.SMTPServerError as e:
                self.datafailed = e
                for message in messages:
                    message.connectionLost()
                self._left_transaction()
        if end < 0:
            self._buffer = partial
            return None
        self._buffer = b""
        self.lineReceived(b".")
        rest = b"\r\n".join(lines[end + 1:] + [partial])
        if rest and not self.transport.disconnecting:
            smtp.ESMTP.dataReceived(self, rest)
        return None

    def lineReceived(self, line):
        if self._refused or self._drop_lines:
            return None
        if self._holding:
            # Keep reading (so that a client hanging up is noticed) unless it
            # sends a lot before its reply: then stop reading until the reply.
            self._held.append(line)
            self._held_bytes += len(line) + 2
            if self._held_bytes > MAX_HELD_BYTES and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return None
        return smtp.ESMTP.lineReceived(self, line)

    def lineLengthExceeded(self, line):
        # A command line over 16 KiB (or a data line in the read that began
        # DATA, which only a client that did not wait for 354 sends): where
        # it ends is guesswork (the rest of it would be read as commands), so
        # close the connection.  The message, if any, is discarded by
        # connectionLost.  Long data lines otherwise: dataReceived.
        if self.mode == smtp.DATA:
            self.sendCode(501, _LONG_LINE)
        else:
            self.sendCode(500, b"5.5.2 Line too long.")
        self._buffer = b""
        self.transport.loseConnection()

    def lookupMethod(self, command):
        try:
            method = smtp.ESMTP.lookupMethod(self, command)
        except UnicodeError:
            return None
        if method is None and command.upper() in NOT_IMPLEMENTED:
            return self._not_implemented
        return method

    def _not_implemented(self, rest):
        self.sendCode(502, b"5.5.1 Command not implemented.")

    def do_UNKNOWN(self, rest):
        self.sendCode(500, b"5.5.2 Command not recognized.")

    def sendSyntaxError(self):
        self.sendCode(500, b"5.5.2 Syntax error: empty command.")

    @property
    def holding(self) -> bool:
        """True from the final dot until its reply is sent."""
        return self._holding and not self._closed

    def _hold(self) -> None:
        """Stop acting on input until the reply to the final dot is sent."""
        self._holding = True
        self.setTimeout(None)

    def _release(self) -> None:
        self._holding = False
        if self._closed:
            return
        self.setTimeout(self.timeout)
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        while self._held and not self._holding and not self._closed and not self.transport.disconnecting:
            line = self._held.popleft()
            self._held_bytes -= len(line) + 2
            smtp.ESMTP.lineReceived(self, line)

    def commitStarted(self, d: defer.Deferred) -> None:
        self._commit = d

    @property
    def mid_transaction(self) -> bool:
        """Between an accepted MAIL and the final dot of its DATA (a message
        is coming that a group commit may wait for)."""
        return not self._closed and (self._from is not None or (self.mode == smtp.DATA and not self.datafailed))

    def _left_transaction(self) -> None:
        """The transaction ended without a message: a commit held back for it may go."""
        self.settings.committer.recheck()

    def _cbFromValidate(self, fromEmail, code=250, msg=b"Sender address accepted"):
        smtp.ESMTP._cbFromValidate(self, fromEmail, code, msg)
        if self._from is not None:
            self.settings.transactions.add(self)

    # commands --------------------------------------------------------------
    def do_HELO(self, rest):
        if not rest.strip():
            self.sendCode(501, b"5.5.4 Syntax: HELO hostname")
            return
        self.esmtp = False
        smtp.ESMTP.do_HELO(self, rest)     # resets the transaction
        self._left_transaction()

    def do_EHLO(self, rest):
        if not rest.strip():
            self.sendCode(501, b"5.5.4 Syntax: EHLO hostname")
            return
        self.esmtp = True
        smtp.ESMTP.do_EHLO(self, rest)     # resets the transaction
        self._left_transaction()

    def do_NOOP(self, rest):
        self.sendCode(250, b"2.0.0 Ok")

    def do_VRFY(self, rest):
        self.sendCode(252, b"2.5.0 Cannot VRFY user; send mail and it will be tried")

    def do_MAIL(self, rest):
        if self.needs_tls_first:
            self.sendCode(530, _TLS_FIRST)
            return
        if self.settings.requires_auth and not self.authenticated:
            self.sendCode(530, b"5.7.0 Authentication required.")
            return
        if self._from is not None:
            self.sendCode(503, b"5.5.1 Sender already given; send RSET first.")
            return
        parts = self._command_parts(rest, _MAIL_RE,
                                    b"MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]")
        if parts is None:
            return
        params, text = parts
        utf8 = False
        size = 0
        for key, value in params:
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    self.sendCode(501, b"5.5.4 SIZE needs a number of octets.")
                    return
                size = int(value)
                limit = self.settings.max_size
                if limit and size > limit:
                    self.sendCode(552, _reply(f"5.3.4 The message is larger than the limit of "
                                              f"{limit} octets."))
                    return
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    self.sendCode(501, b"5.5.4 BODY must be 7BIT or 8BITMIME.")
                    return
            elif key == "SMTPUTF8":
                if value is not None:
                    self.sendCode(501, b"5.5.4 SMTPUTF8 takes no value.")
                    return
                utf8 = True
            elif key == "AUTH":    # RFC 4954 §5: accepted, not used
                continue
            else:
                self.sendCode(555, _reply(f"5.5.4 The MAIL parameter {key} is not supported."))
                return
        if text is None:
            text = self._utf8_path(rest, _MAIL_RE, utf8, _BAD_UTF8_SENDER)
            if text is None:
                return
        try:
            sender = validate_sender(text)
        except BadMessage as e:
            self.sendCode(553, _reply(f"5.1.7 {e}"))
            return
        if not self.settings.has_room(size):
            self.sendCode(452, b"4.3.1 Insufficient system storage; try again later.")
            return
        self._to = []
        self.smtputf8 = utf8
        self._answer(self._validate_from, (Path(sender),), self._cbFromValidate, self._ebFromValidate,
                     (250, b"2.1.0 Sender ok"))

    def do_RCPT(self, rest):
        if self._from is None:
            self.sendCode(503, b"5.5.1 Need MAIL before RCPT.")
            return
        parts = self._command_parts(rest, _RCPT_RE, b"RCPT TO:<address>")
        if parts is None:
            return
        params, text = parts
        if params:
            self.sendCode(555, _reply(f"5.5.4 The RCPT parameter {params[0][0]} is not supported."))
            return
        if text is None:
            text = self._utf8_path(rest, _RCPT_RE, self.smtputf8, _BAD_UTF8_RECIPIENT)
            if text is None:
                return
        try:
            address = validate_address(text, what="recipient address")
        except BadMessage as e:
            self.sendCode(553, _reply(f"5.1.3 {e}"))
            return
        if len(self._to) >= MAX_RECIPIENTS:
            self.sendCode(452, _reply(f"4.5.3 Too many recipients; at most {MAX_RECIPIENTS} per message."))
            return
        user = Recipient(dest=Path(address), helo=self._helo, protocol=self, orig=self._from)
        self._answer(self.validateTo, (user,), self._cbToValidate, self._ebToValidate,
                     (user, 250, b"2.1.5 Recipient ok"))

    def _validate_from(self, path: Path):
        """``validateFrom``, asking the delivery directly once there is one
        (Twisted's wraps even a synchronous answer in a Deferred)."""
        if self.delivery is not None and self.deliveryFactory is None:
            return self.delivery.validateFrom(self._helo, path)
        return self.validateFrom(self._helo, path)

    @staticmethod
    def _answer(validate, args: tuple, ok, failed, ok_args: tuple) -> None:
        """Run a validation and reply: at once when it answers synchronously
        (relay's own delivery does), through its Deferred otherwise."""
        try:
            result = validate(*args)
        except Exception:  # noqa: BLE001 - SMTPBadSender & co. are replies, as with maybeDeferred
            failed(Failure())
            return
        if isinstance(result, defer.Deferred):
            result.addCallbacks(ok, failed, callbackArgs=ok_args)
        else:
            ok(result, *ok_args)

    def _command_parts(self, rest: bytes, pattern, syntax: bytes):
        """MAIL's or RCPT's (parameters, ASCII path or None) -- or None after a
        501 for bad syntax or malformed parameters."""
        m = pattern.match(rest)
        if not m:
            self.sendCode(501, b"5.5.2 Syntax: " + syntax)
            return None
        try:
            params = _params(m.group("params"))
        except ValueError as e:
            self.sendCode(501, _reply(f"5.5.4 {e}"))
            return None
        return params, _ascii_path(m.group("path"))

    def _utf8_path(self, rest: bytes, pattern, utf8: bool, bad_utf8: bytes) -> str | None:
        """The non-ASCII path of MAIL or RCPT as text, when the transaction is
        SMTPUTF8 and it is UTF-8 -- or None after a 553 5.6.7 or a 501."""
        if not utf8:
            self.sendCode(553, _NON_ASCII)
            return None
        try:
            return pattern.match(rest).group("path").decode("utf-8")
        except UnicodeDecodeError:
            self.sendCode(501, bad_utf8)
            return None

    def do_RSET(self, rest):
        self._from = None
        self._to = []
        self.sendCode(250, b"2.0.0 Ok")
        self._left_transaction()

    def do_DATA(self, rest):
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 Need MAIL and RCPT before DATA.")
            return
        # One IMessage carries the whole transaction: the delivery keeps every
        # accepted recipient, so only the first recipient's factory is used.
        self._to = self._to[:1]
        smtp.ESMTP.do_DATA(self, rest)

    def state_DATA(self, line):
        if line == b"." and not self.datafailed:
            self._hold()
            messages = self._SMTP__messages
            if len(messages) == 1:
                # Twisted's end of data for the one IMessage of a transaction
                # (see do_DATA), without its DeferredList.
                self.mode = smtp.COMMAND
                del self._SMTP__messages
                messages[0].eomReceived().addCallbacks(
                    lambda qid: self._messageHandled([(True, qid)]),
                    lambda failure: self._messageHandled([(False, failure)]))
                if self._commit is None:        # refused (501), nothing submitted
                    self._left_transaction()
                return
        failed = self.datafailed
        smtp.ESMTP.dataLineReceived(self, line)
        if self.datafailed and not failed:      # 552: this message will not be submitted
            self._left_transaction()

    def _messageHandled(self, resultList):
        """The reply to the final dot (Twisted's says 250/550 only)."""
        self._commit = None
        if not isinstance(resultList, list) or not resultList:
            code, text = 451, b"4.3.0 Nothing was queued; try again."
        else:
            ok, result = resultList[0]
            if ok:
                code, text = 250, b"2.0.0 Ok: queued as " + str(result).encode("ascii")
            elif result.check(smtp.SMTPServerError):
                code, resp = result.value.code, result.value.resp
                text = resp if isinstance(resp, bytes) else _reply(str(resp))
            else:
                log.failure("submission failed", result)
                code, text = 451, b"4.3.0 Local error; nothing was queued, try again later."
        if not self._closed:
            self.sendCode(code, text)
        self._release()

    def ext_STARTTLS(self, rest):
        """RFC 3207.  Without TLS configured, 502: it is not offered."""
        if self.ctx is None:
            self.sendCode(502, b"5.5.1 STARTTLS is not offered here.")
            return
        if rest:
            self.sendCode(501, b"5.5.4 Syntax: STARTTLS")
            return
        if self.startedTLS:
            self.sendCode(503, b"5.5.1 TLS is already active.")
            return
        if not self.canStartTLS:
            self.sendCode(454, b"4.7.0 TLS not available due to local problem")
            return
        self.sendCode(220, b"2.0.0 Ready to start TLS")
        # RFC 3207 section 4.2, CVE-2011-0411: what the client sent after
        # STARTTLS before the handshake (the rest of this read, lines held
        # while a commit ran) was plaintext: drop it, never run it under TLS.
        # Twisted's LineOnlyReceiver has split the whole read into lines
        # already: the ones after this are dropped by lineReceived.
        self._drop_lines = True
        self._buffer = b""
        self._held.clear()
        self._held_bytes = 0
        self._new_session()
        flush_now(self.transport)       # the 220 in plaintext, before TLS starts
        self.transport.startTLS(self.ctx)
        self.startedTLS = True

    def _new_session(self) -> None:
        """Forget EHLO/HELO, the transaction and any AUTH (RFC 3207 section 4.2):
        the client starts again with EHLO."""
        peer = self.transport.getPeer()
        self._helo = (None, getattr(peer, "host", str(peer)))
        self.esmtp = False
        self._from = None
        self._to = []
        self._left_transaction()
        self.smtputf8 = False
        if self._onLogout is not None:
            logout, self._onLogout = self._onLogout, None
            logout()
        self.authenticated = False
        self.challenger = None
        self.deliveryFactory = None
        self.delivery = None if self.portal is not None else SubmissionDelivery(self.settings)

    # AUTH hardening: a malformed command or response is a 501, not a dropped connection.
    def ext_AUTH(self, rest):
        if not self.esmtp:      # RFC 4954: an extension, offered in the EHLO reply
            self.sendCode(503, b"5.5.1 Send EHLO first.")
            return
        if self.authenticated:
            self.sendCode(503, b"5.5.1 Already authenticated.")
            return
        if self.needs_tls_first:
            self.sendCode(530, _TLS_FIRST)
            return
        if not rest.split(None, 1):
            self.sendCode(501, b"5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        smtp.ESMTP.ext_AUTH(self, rest)

    def state_AUTH(self, response):
        if response == b"=":          # RFC 4954 §4: "=" is an empty initial response
            response = b""
        if response is not None and response != b"*":
            try:
                base64.b64decode(response, validate=True)
            except (TypeError, binascii.Error):
                self.sendCode(501, b"5.5.2 Cannot decode the response.")
                self.challenger = None
                self.mode = smtp.COMMAND
                return
        try:
            smtp.ESMTP.state_AUTH(self, response)
        except Exception:  # noqa: BLE001 - e.g. IllegalClientResponse for a malformed PLAIN
            self.sendCode(501, b"5.5.2 Malformed authentication response.")
            self.challenger = None
            self.mode = smtp.COMMAND

    def _ebAuthenticated(self, reason):
        """A failed login: 535 and a log line naming the user and the client
        (for fail2ban and the like); after AUTH_FAILURE_LIMIT in one session,
        421 and the connection is closed."""
        user = getattr(self.challenger, "username", None)
        self.challenger = None
        if not reason.check(cred_error.UnauthorizedLogin):
            log.failure("AUTH failed with a local error", reason)
            self.sendCode(454, b"4.7.0 Temporary authentication failure.")
            return
        self._auth_failures += 1
        if isinstance(user, bytes):
            user = user.decode("utf-8", "backslashreplace")
        # The client's address first, and the name it chose with spaces and
        # quotes replaced: a name must not be able to pose as another address.
        log.warn("AUTH failed from {client}: user '{user}' ({n} of {limit} allowed in this session)",
                 client=self.client_ip, user=_UNSAFE_IN_LOG.sub("?", user or "")[:64],
                 n=self._auth_failures, limit=AUTH_FAILURE_LIMIT)
        if self._auth_failures >= AUTH_FAILURE_LIMIT:
            self._closed = True
            self.sendCode(421, self.host + b" 4.7.0 Too many failed authentications; closing the connection.")
            self.transport.loseConnection()
            return
        self.sendCode(535, b"5.7.8 Authentication credentials invalid.")


def _ascii_path(path: bytes) -> str | None:
    try:
        return path.decode("ascii")
    except UnicodeDecodeError:
        return None


def _params(text: bytes) -> list[tuple[str, str | None]]:
    """ESMTP parameters ``KEY[=VALUE]`` separated by spaces, keys upper-cased."""
    out: list[tuple[str, str | None]] = []
    for item in text.split():
        m = _PARAM_RE.match(item)
        if not m:
            raise ValueError(f"The parameter {item.decode('ascii', 'backslashreplace')!r} is malformed.")
        value = m.group("value")
        out.append((m.group("key").decode("ascii").upper(), value.decode("ascii") if value is not None else None))
    return out


class SubmissionFactory(protocol.ServerFactory):
    """Builds a ``SubmissionProtocol`` per connection."""

    noisy = False

    def __init__(self, settings: _Settings, portal: Portal | None):
        self.settings = settings
        self.portal = portal

    def buildProtocol(self, addr):
        if self.portal is not None:
            p = SubmissionProtocol(self.settings, {b"LOGIN": LOGINCredentials, b"PLAIN": PLAINCredentials})
            p.portal = self.portal
        else:
            p = SubmissionProtocol(self.settings, {})
            p.delivery = SubmissionDelivery(self.settings)
        p.factory = self
        return p


class SubmissionService(StreamServerEndpointService):
    """The listener.  On stop: stop listening, answer the messages being
    committed, then say 421 to every session and wait (a few seconds at
    most) until their connections are closed."""

    close_timeout = 5.0

    def __init__(self, endpoint, factory: SubmissionFactory, settings: _Settings, reactor):
        StreamServerEndpointService.__init__(self, endpoint, factory)
        self.settings = settings
        self.committer = settings.committer
        self.reactor = reactor
        self.setName("submission")
        self._raiseSynchronously = True    # as strports.service does: a busy port fails startService

    def privilegedStartService(self) -> None:
        """Listen (twistd calls this before dropping privileges; startService
        otherwise); a busy port raises CannotListen in one sentence."""
        try:
            StreamServerEndpointService.privilegedStartService(self)
        except CannotListenError as e:
            raise CannotListen(f"submission.listen {e.interface or '*'}:{e.port}: cannot listen "
                               f"({e.socketError or e}).") from None

    def startService(self) -> None:
        try:
            StreamServerEndpointService.startService(self)
        except CannotListen:
            self.running = False
            raise
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        address = port.getHost()
        log.info("submission listener on {host}:{port}", host=address.host, port=address.port)
        return port

    @defer.inlineCallbacks
    def stopService(self):
        yield StreamServerEndpointService.stopService(self)
        sessions = self.settings.sessions
        closed = [s.whenClosed() for s in sessions]
        while True:
            for session in list(sessions):
                session.shutdown()          # every session not waiting for a commit
            if not any(session.holding for session in sessions):
                break
            yield self.committer.idle()     # the rest get their replies, then go round again
        if closed:
            waiting = defer.DeferredList(closed)
            timer = self.reactor.callLater(self.close_timeout, self._abort_all)
            yield waiting
            if timer.active():
                timer.cancel()

    def _abort_all(self) -> None:
        for session in list(self.settings.sessions):
            session.transport.abortConnection()


def _read_tls_file(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise ConfigError(f"{key} {path} cannot be read ({reason}).") from None


def load_submission_tls(config: Config) -> ssl.CertificateOptions | None:
    """``submission.tls_cert`` and ``submission.tls_key`` as the listener's TLS
    options (None when both are empty), read and checked now.

    The certificate file holds the server certificate first, then any
    intermediate certificates; the key file an unencrypted PEM private key
    that matches it.  Raises ConfigError, one sentence naming the file, when
    a file cannot be read, holds no certificate / key, or they do not match.
    """
    check_tls_pair(config)
    cert_path, key_path = config.submission_tls_cert, config.submission_tls_key
    if not cert_path:
        return None
    cert_pem = _read_tls_file(cert_path, "submission.tls_cert")
    key_pem = _read_tls_file(key_path, "submission.tls_key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"submission.tls_cert {cert_path} holds no valid PEM certificate.") from None
    try:
        # cryptography, not pyOpenSSL: for an encrypted key pyOpenSSL would
        # ask for a passphrase on the terminal.
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"submission.tls_key {key_path} is encrypted; relayd needs an unencrypted "
                          f"key (readable by relayd only).") from None
    except (ValueError, crypto.Error, SSL.Error):
        raise ConfigError(f"submission.tls_key {key_path} holds no valid PEM private key.") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise ConfigError(f"submission.tls_key {key_path} does not match the certificate in "
                          f"submission.tls_cert {cert_path}.")
    try:
        # pyOpenSSL takes cryptography's objects (its own X509/PKey are deprecated there).
        options = ssl.CertificateOptions(privateKey=key, certificate=chain[0], extraCertChain=list(chain[1:]))
        options.getContext()        # build the OpenSSL context now, so that any trouble shows at start-up
    except (ValueError, TypeError, crypto.Error, SSL.Error) as e:
        raise ConfigError(f"submission.tls_cert {cert_path} with submission.tls_key {key_path} "
                          f"cannot be used for TLS ({_reply(str(e)).decode()}).") from None
    return options


def check_submission_config(config: Config) -> ssl.CertificateOptions | None:
    """Validate ``submission.*`` before anything starts: the listener's TLS
    options, loaded (pass them to :func:`build_submission_service`), or None
    when the listener is off or has no TLS.

    Raises ConfigError for a non-loopback address without users
    (:data:`OPEN_RELAY`), a host that is not an IP address or ``localhost``,
    or TLS files that cannot be used (:func:`load_submission_tls`).
    """
    if _listen_address(config) is None:
        return None
    return load_submission_tls(config)


def _listen_address(config: Config) -> tuple[str, int] | None:
    if not config.submission_listen:
        return None
    host, _ = parse_hostport(config.submission_listen, "submission.listen")
    if not config.submission_users and not (host.lower() == "localhost" or is_loopback(host)):
        raise ConfigError(OPEN_RELAY)
    return parse_listen(config.submission_listen, "submission.listen")


def room_check(free_space) -> Callable[[int], bool]:
    """``free_space.has_room`` (a FreeSpaceFloor), logging a warning when the
    spool runs short of space and a line when it has room again (not one per
    refused client)."""
    short = False

    def has_room(size: int) -> bool:
        nonlocal short
        room = free_space.has_room(size)
        if room == short:
            short = not room
            if short:
                log.warn("submission: refusing new mail (452 4.3.1), less than {floor} would stay free "
                         "on the spool's file system (spool.min_free_space)", floor=human_size(free_space.floor))
            else:
                log.info("submission: the spool has room again; accepting new mail")
        return room
    return has_room


def build_submission_service(config: Config, spool, reactor, *,
                             on_enqueued: Callable[[], None] = lambda: None,
                             handoff=None, metrics=None,
                             tls: ssl.CertificateOptions | None = None,
                             log_line: Callable[[str], None] | None = None) -> service.Service | None:
    """The submission listener for ``config`` (None when ``submission.listen`` is empty).

    ``spool`` is the DeferredSpool; ``handoff`` (relayd's DrainService,
    optional) takes accepted mail already claimed (see GroupCommitter);
    ``on_enqueued`` runs after every commit that was not handed off (relayd
    passes ``DrainService.wake``); ``metrics`` (optional) gets
    ``submission_committed(n)`` per commit; ``tls`` (optional) the TLS
    options :func:`check_submission_config` loaded, else they are loaded
    here; ``log_line`` (optional) takes each queued message's log line
    instead of twisted.logger.  Raises ConfigError as :func:`check_submission_config`.
    """
    where = _listen_address(config)
    if where is None:
        return None
    host, port = where
    if tls is None:
        tls = load_submission_tls(config)

    def committed(n: int, handed_off: bool) -> None:
        if metrics is not None:
            try:
                metrics.submission_committed(n)
            except Exception:  # noqa: BLE001
                log.failure("metrics.submission_committed failed")
        if not handed_off:
            on_enqueued()

    transactions: set = set()
    committer = GroupCommitter(spool, reactor, on_committed=committed, handoff=handoff,
                               commit_delay=config.commit_delay, siblings=lambda: mid_transaction(transactions),
                               max_in_flight=commits_in_flight(config.spool_url))
    settings = _Settings(hostname=config.hostname, max_size=config.max_message_size, committer=committer,
                         requires_auth=bool(config.submission_users), tls=tls, transactions=transactions)
    if log_line is not None:
        settings.log_line = log_line
    free_space = getattr(spool, "free_space", None)
    if free_space is not None:
        settings.has_room = room_check(free_space)
    portal = None
    if config.submission_users:
        portal = Portal(SubmissionRealm(settings), [UsersChecker(config.submission_users)])
    if ":" in host:
        endpoint = endpoints.TCP6ServerEndpoint(reactor, port, interface=host)
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface=host)
    return SubmissionService(endpoint, SubmissionFactory(settings, portal), settings, reactor)
