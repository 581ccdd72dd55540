"""One outbound SMTP connection that carries several transactions.

Built on :class:`twisted.mail.smtp.ESMTPClient` (Twisted pinned at 26.10.0),
with the traps documented in ``shared/notes/twisted.md`` fixed.

Public API
==========

``open_session(reactor, *, address, port, host_name, ehlo, tls,
connect_timeout, command_timeout, next_envelope, on_result,
credentials=None, trust_root=None) -> Deferred[SessionEnd]``

* Connects to ``address:port`` (an IP address; no name lookup) with
  ``reactor.connectTCP(..., timeout=connect_timeout)``.  The greeting must
  arrive within ``connect_timeout`` of the TCP connection; after it every
  reply must arrive within ``command_timeout`` (an idle timer, reset by every
  reply line and by every 16 KiB chunk of a large body the peer takes in).
* After the greeting, EHLO (HELO fallback), STARTTLS and AUTH, it calls
  ``next_envelope()`` whenever it is ready to send ``MAIL FROM`` and ``None``
  means QUIT.  ``next_envelope()`` may instead return a Deferred that fires
  with the envelope (or ``None``) later: the connection then stays open and
  idle, without the command timer, until it fires; if the connection is lost
  or the session cancelled meanwhile, the Deferred is cancelled (the caller
  keeps the envelope it has not handed over).  Every envelope it pulls gets exactly one
  ``on_result(envelope, results)`` call, ``results`` being one
  :class:`~relay.model.RecipientResult` per recipient in ``envelope.recipients``
  order, whatever happens (refusals, 421, lost connection, timeout, a bug in
  this module).  After a 421 reply or a lost connection nothing more is pulled.
* The Deferred fires with a :class:`SessionEnd` once the connection is
  closed.  ``SessionEnd.host_failure`` is a :class:`~relay.model.HostFailure`
  only when the host failed before any envelope was pulled; afterwards the
  envelopes' results carry the failure and ``SessionEnd.error`` says why the
  session ended early.  Cancelling the Deferred aborts the connection (the
  envelope in flight, if any, is reported as lost) and the Deferred fails with
  ``CancelledError``.

Results that are not SMTP replies
=================================

``peer`` below is ``host_name[address]:port``.

Host failures (``SessionEnd.host_failure``; nothing was pulled):

==========================================  ====  ===================================================  ========
situation                                   code  text                                                 next MX
==========================================  ====  ===================================================  ========
connection refused                          421   ``4.4.1 Connection refused by {peer}``               yes
TCP connect timed out                       421   ``4.4.1 Connection to {peer} timed out after Ns``    yes
other connect error                         421   ``4.4.1 Cannot connect to {peer}: {error}``          yes
no greeting within connect_timeout          421   ``4.4.1 No greeting from {peer} within Ns``          yes
greeting other than 220                     code  the greeting text                                    yes
EHLO (and HELO) refused; EHLO 421           code  the reply text                                       yes
timeout after the greeting                  421   ``4.4.2 Timed out after Ns waiting for {peer} ...``  yes
connection lost before ready                421   ``4.4.2 Connection to {peer} lost during ...``       yes
malformed reply                             421   ``4.5.0 Malformed reply from {peer}: ...``           yes
tls="required", no STARTTLS / EHLO refused  454   ``4.7.5 ...`` (never falls back to plaintext)        yes
tls="required", STARTTLS refused            454   ``4.7.5 {peer} refused STARTTLS: <reply>``           yes
tls="required", certificate/handshake fail  454   ``4.7.5 TLS with {peer} failed: <reason>``           yes
tls="opportunistic", handshake failure      454   ``4.7.0 TLS with {peer} failed: <reason>``           yes
AUTH refused (any code, 535 5.7.8 incl.)    454   ``4.7.0 Authentication to {peer} failed: <reply>``   no
AUTH not offered / no common mechanism      454   ``4.7.0 {peer} offers no usable AUTH ...``           no
internal error in this module               421   ``4.3.0 Internal error in the SMTP client: ...``     yes
==========================================  ====  ===================================================  ========

AUTH failures are always temporary (454 4.7.0), even for ``535 5.7.8``: a
wrong password is an operator's configuration error and must not bounce mail.
A failed opportunistic TLS handshake is a host failure; there is no plaintext
retry on the same host.  A STARTTLS *command* refused in opportunistic mode
continues in plaintext (RFC 3207 allows it).

Per-recipient results that are not SMTP replies (in ``on_result``):

===============================================  ====  ==============================================
situation                                        code  text
===============================================  ====  ==============================================
connection lost in a transaction                 451   ``4.4.2 Connection to {peer} lost ...``
no reply within command_timeout                  451   ``4.4.2 Timed out after Ns waiting for ...``
malformed reply                                  451   ``4.5.0 Malformed reply from {peer} ...``
reply while the body is still being written      4/5xx the reply (a 2xx/3xx: 451 ``4.5.0 ...``)
internal error in this module (a bug)            451   ``4.3.0 Internal error in the SMTP client: ...``
cancelled (the Deferred)                         451   ``4.4.2 Session with {peer} cancelled``
8-bit body, peer lacks 8BITMIME                  554   ``5.6.3 ...``  (nothing sent)
non-ASCII address, peer lacks SMTPUTF8           553   ``5.6.7 ...``  (that recipient; all if sender)
message larger than the peer's SIZE (n > 0)      552   ``5.3.4 ...``  (nothing sent)
address with CR/LF/NUL/space/<> (never queued)   553   ``5.1.3`` (recipient) / ``5.1.7`` (sender)
===============================================  ====  ==============================================

A lost connection or a timeout after the final dot was written and before
its reply sets ``possible_duplicate=True`` on the recipients whose RCPT was
accepted (SPEC duplicate window (a)); the text then says so.  A 421 reply to
any command ends the session: it decides every undecided recipient of the
envelope in flight with that 421.

Protocol details
================

* ``MAIL FROM:<sender> [SIZE=n] [BODY=8BITMIME] [SMTPUTF8]``: SIZE when
  offered, n being the RFC 1870 message size (CRLF form, without the
  stuffing dots and the final dot); BODY=8BITMIME for an 8-bit body;
  SMTPUTF8 when the sender or a recipient sent is non-ASCII.  MAIL and RCPT
  lines are pre-formatted from the validated addresses (``quoteaddr`` is not
  used: it rewrites malformed addresses and costs ~10 % CPU).
* The body goes out in wire form: every line starting with ``.`` gets
  another ``.`` (the first line included), then ``.\\r\\n``.  Bodies up to
  :data:`SINGLE_WRITE_MAX` go in one write; larger ones through
  ``FileSender`` in 16 KiB chunks with a no-op ``transformChunk`` that only
  resets the idle timer.  Data with a bare CR or LF (never produced by the
  spool) is normalised to CRLF first, so no bare-LF dot line can end DATA
  early.
* RSET is sent only when MAIL was accepted but no final reply to the data
  closed the transaction (all RCPTs refused, DATA refused); with PIPELINING
  also after a refused MAIL.  A refused RSET, HELO or EHLO ends the session
  instead of looping.
* PIPELINING (RFC 2920), when the EHLO reply offers it: ``MAIL FROM``, every
  ``RCPT TO`` and ``DATA`` go out in one write, and their replies are then
  read in order by the same states as without pipelining (which just do not
  send the next command); nothing else is sent before the reply to DATA.
  The per-recipient results are those of the unpipelined exchange, also on a
  421, a timeout or a lost connection at the same point.  Once the
  transaction has failed (MAIL refused, every RCPT refused) the replies
  still owed for the group are counted off and ignored (a 421 among them
  ends the session); a DATA answered 354 anyway gets a lone ``.`` whose
  reply is ignored too (no delivery); then RSET.
* STARTTLS: anything the peer sent after the ``220`` and before TLS is
  discarded (STARTTLS response injection); the EHLO capabilities are
  re-read over TLS.
* ``on_result`` and ``next_envelope`` raising is logged, never propagated:
  an exception from ``on_result`` does not stop the session, one from
  ``next_envelope`` ends it with QUIT and ``SessionEnd.error`` set.
* No LineLog (``debug = False``): AUTH secrets never land in a log.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Callable, Mapping

from twisted.internet import error as ierror
from twisted.internet import protocol, ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.config import TLS_MODES
from relay.model import Envelope, HostFailure, RecipientResult
from relay.sendnow import write_now

__all__ = ["SessionEnd", "open_session", "to_wire", "SINGLE_WRITE_MAX", "TLS_MODES"]

_log = Logger(namespace="relay.smtpclient")

#: Bodies (wire form, final dot included) up to this size are written in one
#: ``transport.write``; larger ones are streamed in 16 KiB chunks.
SINGLE_WRITE_MAX = 64 * 1024

_SUCCESS = smtp.SUCCESS  # dict of 200..299


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """How one SMTP session ended.

    ``host_failure`` is set only when the host failed before any envelope was
    pulled.  ``envelopes`` counts envelopes pulled (each got one
    ``on_result``); ``transactions`` counts those whose data got a final reply.
    ``error`` says why a session that had pulled envelopes ended early (421,
    lost connection, timeout ...), else ``None``.
    """

    host_failure: HostFailure | None
    envelopes: int = 0
    transactions: int = 0
    tls: bool = False
    authenticated: bool = False
    extensions: Mapping[str, str | None] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Config:
    address: str
    port: int
    host_name: str
    ehlo: bytes
    tls: str
    connect_timeout: float
    command_timeout: float
    next_envelope: Callable[[], Envelope | None]
    on_result: Callable[[Envelope, list[RecipientResult]], None]
    credentials: tuple[str, str] | None
    trust_root: Any
    peer: str


def _wire_form(data: bytes) -> tuple[bytes, int]:
    """Return (wire bytes ending in ``.\\r\\n``, RFC 1870 size) for ``data``."""
    n = data.count(b"\n")
    if n != data.count(b"\r") or n != data.count(b"\r\n"):
        # A bare CR or LF: never produced by the spool, but a bare LF before
        # "." could end DATA early on some peers (SMTP smuggling).
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    wire = data.replace(b"\r\n.", b"\r\n..")
    if wire[:1] == b".":
        wire = b"." + wire
    return wire + b".\r\n", len(data)


def to_wire(data: bytes) -> bytes:
    """Return ``data`` as DATA wire bytes: CRLF lines, dot-stuffed, then ``.\\r\\n``.

    ``data`` normally has CRLF line endings only (the spool guarantees it);
    a bare CR or LF is turned into CRLF so that no peer can see an
    end-of-data sequence we did not mean.  Every line that starts with
    ``.`` gets another ``.``, the first line included.
    """
    return _wire_form(data)[0]


def _address_ok(address: str) -> bool:
    """Refuse what must never reach a MAIL/RCPT line (defence in depth: the
    spool validates addresses at enqueue)."""
    return (
        address.isprintable()
        and " " not in address
        and "<" not in address
        and ">" not in address
    )


def _text(resp: bytes | str) -> str:
    """Reply text as a str, multi-line replies joined with a space."""
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    return resp.replace("\r", "").replace("\n", " ").strip()


def _describe(reason: Failure | BaseException | None) -> str:
    """A one-line description of an exception that never raises."""
    exc = reason.value if isinstance(reason, Failure) else reason
    if exc is None:
        return "unknown error"
    try:
        args = getattr(exc, "args", ())
        detail = ", ".join(a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a) for a in args)
    except Exception:  # pragma: no cover - defensive
        detail = ""
    name = type(exc).__name__
    return f"{name}: {detail}" if detail else name


@functools.cache
def _opportunistic_options() -> ssl.CertificateOptions:
    """One shared no-verification context for opportunistic STARTTLS."""
    return ssl.CertificateOptions()


def _platform_options(host_name: str) -> Any:
    """Verifying client TLS options against the platform trust store.

    Cached per host name because loading the trust store is not free; the
    key includes ``SSL_CERT_FILE``/``SSL_CERT_DIR``, which OpenSSL reads when
    the store is loaded.
    """
    return _cached_platform_options(host_name, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=256)
def _cached_platform_options(host_name: str, cert_file: str | None, cert_dir: str | None) -> Any:
    return ssl.optionsForClientTLS(host_name, trustRoot=ssl.platformTrust())


@implementer(IHandshakeListener)
class _RelayClient(smtp.ESMTPClient):
    """The ESMTPClient subclass behind :func:`open_session` (one connection)."""

    # No LineLog: it would hold AUTH secrets (notes §1) and costs CPU.
    debug = False

    #: Overridable in tests to exercise the chunked body path.
    single_write_max = SINGLE_WRITE_MAX

    # ESMTPClient.__setattr__ is a Python-level shim for the deprecated
    # ``tlsMode`` attribute that runs on every attribute store (~2 % client
    # CPU, notes §8).  We never touch ``tlsMode``, so store attributes directly.
    __setattr__ = object.__setattr__  # type: ignore[assignment]

    def __init__(self, cfg: _Config, reactor: Any, factory: _SessionFactory) -> None:
        secret = cfg.credentials[1].encode("utf-8") if cfg.credentials else None
        smtp.ESMTPClient.__init__(self, secret, None, cfg.ehlo, 1)
        self._cfg = cfg
        self._reactor = reactor
        self.factory = factory
        # SMTPClient.timeout is applied by connectionMade: the greeting timer.
        self.timeout = cfg.connect_timeout
        self.requireAuthentication = cfg.credentials is not None
        self.requireTransportSecurity = cfg.tls == "required"
        if cfg.credentials is not None:
            user = cfg.credentials[0].encode("utf-8")
            # Fresh authenticators per connection: LOGINAuthenticator keeps
            # state and breaks on a second connection (notes §5).
            self.registerAuthenticator(smtp.PLAINAuthenticator(user))
            self.registerAuthenticator(smtp.LOGINAuthenticator(user))
        self.extensions: dict[str, str | None] = {}
        self._stage = "connect"
        self._closing = False
        self._finished = False
        self._host_failure: HostFailure | None = None
        self._error: str | None = None
        self._envelopes = 0
        self._transactions = 0
        self._tls_started = False
        self._tls_up = False
        self._authenticated = False
        self._waiting: Deferred | None = None
        #: Replies still due for the pipelined MAIL/RCPT/DATA group sent
        #: (the current reply included while it is handled); 0 unpipelined.
        self._owed = 0
        self._reset_transaction()

    # -- plumbing -----------------------------------------------------------

    def callLater(self, period: float, func: Callable[[], Any]) -> Any:
        # TimeoutMixin.callLater imports the global reactor; use the injected one.
        return self._reactor.callLater(period, func)

    def sendLine(self, line: bytes) -> None:
        # SMTPClient.sendLine appends to the LineLog when debug is on; we
        # never log (secrets) and skip the extra call.
        write_now(self.transport, line + b"\r\n")

    def _reset_transaction(self) -> None:
        self._env: Envelope | None = None
        self._results: list[tuple[int, str, bool] | None] = []
        self._sending: list[int] = []
        self._rcpt_lines: list[bytes] = []
        self._rcpt_pos = 0
        self._mail_accepted = False
        self._pipelined = False
        self._dot_sent = False
        self._wire = b""
        self._body_left = 0
        # ESMTPClient state kept for sentMail(); ``addresses`` entries are
        # (recipient index, code, resp).
        self.toAddressesResult = []
        self.successAddresses = []

    def connectionMade(self) -> None:
        try:
            # Nagle + delayed ACK costs ~40 ms per message (notes §0.1).
            set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
            if set_nodelay is not None:
                set_nodelay(True)
            smtp.ESMTPClient.connectionMade(self)
            self._stage = "greeting"
        except Exception:
            self._internal_error(Failure())

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would just close: report it as the protocol error it is.
        self._protocol_error(line)

    def lineReceived(self, line: bytes) -> None:
        # Replaces SMTPClient.lineReceived: no LineLog, strict reply syntax,
        # and no exception may escape into the reactor.
        if self._closing:
            return
        self.resetTimeout()
        try:
            if len(line) < 3 or not line[:3].isdigit() or line[:1] not in b"2345" or line[3:4] not in (b" ", b"-", b""):
                self._protocol_error(line)
                return
            self.resp.append(line[4:])
            if line[3:4] == b"-":
                return
            code = int(line[:3])
            resp = b"\n".join(self.resp)
            self.resp = []
            if self._owed:
                self._owed -= 1
            if code in self._expected:
                self._okresponse(code, resp)
            else:
                self._failresponse(code, resp)
        except Exception:
            self._internal_error(Failure())

    def handshakeCompleted(self) -> None:
        """TLS is up (IHandshakeListener): drop any plaintext still buffered."""
        self.clearLineBuffer()
        self.resp = []

    # -- greeting, EHLO/HELO, STARTTLS, AUTH ----------------------------------

    def smtpConnectionFailed(self, code: int, resp: bytes) -> None:
        # The greeting was not 220 (421, 5xx ...).
        self._end(code, _text(resp), try_next=True, quit=True)

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        # Replaces ESMTPClient.esmtpState_ehlo: our own refusal handling
        # (HELO fallback without the endless loop, 421, TLS/AUTH needs).
        if self._stage == "greeting":
            self.setTimeout(self._cfg.command_timeout)
        self._stage = "EHLO"
        self._expected = _SUCCESS
        self._okresponse = self.esmtpState_serverConfig
        self._failresponse = self._ehlo_refused
        self.sendLine(b"EHLO " + self.identity)

    def _ehlo_refused(self, code: int, resp: bytes) -> None:
        if self._tls_started:
            self._tls_up = True  # a reply came through TLS
        text = _text(resp)
        if code == 421:
            self._end(code, text, try_next=True, quit=True)
        elif self.requireTransportSecurity and not self._tlsMode:
            self._end(
                454,
                f"4.7.5 {self._cfg.peer} refused EHLO ({code} {text}), so STARTTLS "
                "is impossible and TLS is required",
                try_next=True,
                quit=True,
            )
        elif self.requireAuthentication:
            self._end(code, text, try_next=True, quit=True)  # AUTH needs ESMTP
        else:
            self.smtpState_helo(code, resp)

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        # Replaces SMTPClient.smtpState_helo, which left _failresponse pointing
        # at itself: a refused HELO was re-sent forever (notes §3).
        self._stage = "HELO"
        self.extensions = {}
        self._expected = _SUCCESS
        self._okresponse = self.smtpState_from
        self._failresponse = self._helo_refused
        self.sendLine(b"HELO " + self.identity)

    def _helo_refused(self, code: int, resp: bytes) -> None:
        self._end(code, _text(resp), try_next=True, quit=True)

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        # Replaces ESMTPClient.esmtpState_serverConfig, which threw the
        # capabilities away and matched them case-sensitively (notes §3, §4).
        if self._tls_started:
            self._tls_up = True
        ext: dict[str, str | None] = {}
        for raw in resp.split(b"\n")[1:]:  # the first line is the server's name
            parts = raw.decode("utf-8", "replace").split(None, 1)
            if parts:
                ext[parts[0].upper()] = parts[1].strip() if len(parts) > 1 else None
        self.extensions = ext
        self.tryTLS(code, resp, ext)

    def tryTLS(self, code: int, resp: bytes, items: Any) -> None:
        # Replaces ESMTPClient.tryTLS: our three TLS modes and lazily built
        # contexts (self.context is not used).
        mode = self._cfg.tls
        if self._tlsMode or mode == "none":
            self._authenticate(code, resp)
        elif "STARTTLS" in self.extensions:
            self._stage = "STARTTLS"
            self._expected = [220]
            self._okresponse = self.esmtpState_starttls
            self._failresponse = self._starttls_refused
            self.sendLine(b"STARTTLS")
        elif mode == "required":
            self._end(
                454,
                f"4.7.5 {self._cfg.peer} does not offer STARTTLS and TLS is required",
                try_next=True,
                quit=True,
            )
        else:
            self._authenticate(code, resp)

    def _starttls_refused(self, code: int, resp: bytes) -> None:
        text = _text(resp)
        if code == 421:
            self._end(code, text, try_next=True, quit=True)
        elif self._cfg.tls == "required":
            self._end(454, f"4.7.5 {self._cfg.peer} refused STARTTLS: {code} {text}", try_next=True, quit=True)
        else:
            # Opportunistic: RFC 3207 lets the client go on in plaintext.
            self._authenticate(code, resp)

    def _tls_options(self) -> Any:
        cfg = self._cfg
        if cfg.tls == "required":
            if cfg.trust_root is None:
                return _platform_options(cfg.host_name)
            return ssl.optionsForClientTLS(cfg.host_name, trustRoot=cfg.trust_root)
        return _opportunistic_options()

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        # Replaces ESMTPClient.esmtpState_starttls.  STARTTLS response
        # injection: bytes the peer sent after "220" in plaintext are still in
        # LineReceiver's buffer and would be read as replies after TLS starts.
        # Drop them (clearLineBuffer also ends LineReceiver.dataReceived's loop).
        self.clearLineBuffer()
        self.resp = []
        self._stage = "TLS handshake"
        try:
            options = self._tls_options()
            self.transport.startTLS(options)
        except Exception as exc:
            _log.failure("STARTTLS could not start", Failure())
            status = "4.7.5" if self._cfg.tls == "required" else "4.7.0"
            self._end(454, f"{status} TLS with {self._cfg.peer} failed: {_describe(exc)}", try_next=True, abort=True)
            return
        self._tls_started = True
        # ESMTPClient's private flag: "the transport is TLS" (read by our
        # _ehlo_refused and tryTLS, and by ESMTPClient itself).
        self._tlsMode = True
        self.extensions = {}
        self.esmtpState_ehlo(code, resp)

    def _authenticate(self, code: int, resp: bytes) -> None:
        if self._cfg.credentials is None:
            self.smtpState_from(code, resp)
            return
        if not self._tlsMode and self._cfg.tls != "none":
            # Opportunistic TLS did not happen (not offered, or refused): the
            # password stays home, as with Postfix's default
            # smtp_sasl_security_options = noplaintext.  tls = "none" on the
            # route sends it in plaintext (SPEC "TLS").
            self._end(
                454,
                f"4.7.0 {self._cfg.peer} did not start TLS, and credentials are not sent "
                'in plaintext unless the route says tls = "none"',
                try_next=True,
                quit=True,
            )
            return
        self._stage = "AUTH"
        auth = self.extensions.get("AUTH")
        # ESMTPClient.authenticate reads bytes keys (b"AUTH") and falls back
        # to esmtpAUTHRequired when nothing matches (requireAuthentication).
        items = {b"AUTH": auth.encode("ascii", "replace")} if auth else {}
        self.authenticate(code, resp, items)

    def esmtpAUTHRequired(self, code: int = -1, resp: bytes | None = None) -> None:
        self._end(
            454,
            f"4.7.0 {self._cfg.peer} offers no usable AUTH mechanism "
            f"(we have PLAIN, LOGIN; it offers {self.extensions.get('AUTH') or 'none'})",
            try_next=False,
            quit=True,
        )

    def _auth_failed(self, code: int, resp: bytes | None) -> None:
        reply = f"{code} {_text(resp or b'')}".strip()
        self._end(454, f"4.7.0 Authentication to {self._cfg.peer} failed: {reply}", try_next=False, quit=True)

    def esmtpAUTHDeclined(self, code: int = -1, resp: bytes | None = None) -> None:
        self._auth_failed(code, resp)

    def esmtpAUTHServerError(self, code: int = -1, resp: bytes | None = None) -> None:
        self._auth_failed(code, resp)

    def esmtpAUTHMalformedChallenge(self, code: int = -1, resp: bytes | None = None) -> None:
        self._auth_failed(code, b"malformed AUTH challenge")

    def esmtpEHLORequired(self, code: int = -1, resp: bytes | None = None) -> None:  # pragma: no cover
        self._end(code if code > 0 else 421, _text(resp or b"EHLO refused"), try_next=True, quit=True)

    def esmtpTLSRequired(self, code: int = -1, resp: bytes | None = None) -> None:  # pragma: no cover
        self._end(454, f"4.7.5 {self._cfg.peer} does not offer STARTTLS and TLS is required", quit=True)

    def esmtpTLSFailed(self, code: int = -1, resp: bytes | None = None) -> None:  # pragma: no cover
        self._starttls_refused(code, resp or b"")

    # -- transactions -------------------------------------------------------

    def smtpState_from(self, code: int, resp: bytes) -> None:
        # Replaces SMTPClient.smtpState_from: the session is ready; pull the
        # next envelope and send MAIL FROM with our parameters, or QUIT.
        if self._stage == "AUTH":
            self._authenticated = True
        while True:
            env = self._pull()
            if isinstance(env, Deferred):
                self._wait_for_envelope(env)
                return
            if env is None:
                self._quit()
                return
            if self._begin(env):
                return

    def _pull(self) -> Envelope | Deferred | None:
        try:
            env = self._cfg.next_envelope()
        except Exception:
            _log.failure("next_envelope() raised; ending the session", Failure())
            self._error = "4.3.0 next_envelope() raised"
            return None
        if env is not None and not isinstance(env, Deferred):
            self._envelopes += 1
        return env

    def _wait_for_envelope(self, d: Deferred) -> None:
        """Idle on the open connection until ``d`` gives an envelope or None."""
        self._stage = "idle"
        self._waiting = d
        self._expected = ()
        self._failresponse = self._idle_reply
        self.setTimeout(None)
        d.addBoth(self._envelope_ready, d)

    def _idle_reply(self, code: int, resp: bytes) -> None:
        # The peer spoke while we were idle (typically 421 before it closes).
        self._close(quit=code != 421)

    def _envelope_ready(self, env: Any, d: Deferred) -> None:
        if self._waiting is not d:
            return None
        self._waiting = None
        try:
            if isinstance(env, Failure):
                if not env.check(CancelledError):
                    _log.failure("next_envelope() failed; ending the session", env)
                    self._error = "4.3.0 next_envelope() failed"
                env = None
            if self._closing:
                return None     # cannot happen with env set: losing the connection cancels d
            self.setTimeout(self._cfg.command_timeout)
            if env is None:
                self._quit()
                return None
            self._envelopes += 1
            if not self._begin(env):
                self.smtpState_from(250, b"")
        except Exception:
            self._internal_error(Failure())
        return None

    def _stop_waiting(self) -> None:
        d, self._waiting = self._waiting, None
        if d is not None:
            d.cancel()

    def _begin(self, env: Envelope) -> bool:
        """Start a transaction; False when every recipient was decided locally."""
        self._reset_transaction()
        self._env = env
        msg = env.message
        ext = self.extensions
        peer = self._cfg.peer
        recipients = env.recipients
        results: list[tuple[int, str, bool] | None] = [None] * len(recipients)
        self._results = results
        sender = msg.sender
        # The flag comes from the spool; isascii() is a cheap cross-check.
        eight_bit = msg.eight_bit or not msg.data.isascii()
        utf8 = "SMTPUTF8" in ext
        need_utf8 = False
        reject: tuple[int, str] | None = None
        wire = b""
        size = 0
        if sender and not _address_ok(sender):
            reject = (553, "5.1.7 Bad sender address syntax")
        elif not sender.isascii():
            if utf8:
                need_utf8 = True
            else:
                reject = (553, f"5.6.7 Sender <{sender}> is non-ASCII and {peer} does not offer SMTPUTF8")
        if reject is None and eight_bit and "8BITMIME" not in ext:
            reject = (554, f"5.6.3 Message has 8-bit content and {peer} does not offer 8BITMIME")
        if reject is None:
            wire, size = _wire_form(msg.data)
            limit = ext.get("SIZE")
            if limit and limit.isascii() and limit.isdigit() and 0 < int(limit) < size:
                reject = (552, f"5.3.4 Message size {size} exceeds the {limit} octets {peer} accepts")
        if reject is not None:
            for i in range(len(recipients)):
                results[i] = (reject[0], reject[1], False)
            self._deliver()
            return False
        sending = self._sending
        lines = self._rcpt_lines
        for i, rcpt in enumerate(recipients):
            address = rcpt.address
            if not _address_ok(address):
                results[i] = (553, "5.1.3 Bad recipient address syntax", False)
            elif address.isascii():
                sending.append(i)
                lines.append(b"RCPT TO:<" + address.encode("ascii") + b">")
            elif utf8:
                need_utf8 = True
                sending.append(i)
                lines.append(b"RCPT TO:<" + address.encode("utf-8") + b">")
            else:
                results[i] = (553, f"5.6.7 <{address}> is non-ASCII and {peer} does not offer SMTPUTF8", False)
        if not sending:
            self._deliver()
            return False
        mail = b"MAIL FROM:<" + sender.encode("utf-8") + b">"
        if "SIZE" in ext:
            mail += b" SIZE=%d" % size
        if eight_bit:
            mail += b" BODY=8BITMIME"
        if need_utf8:
            mail += b" SMTPUTF8"
        self._wire = wire
        self._stage = "MAIL FROM"
        self._expected = _SUCCESS
        self._okresponse = self.smtpState_to
        self._failresponse = self.smtpState_msgSent  # refused MAIL: sentMail with addresses == []
        if "PIPELINING" in ext:
            # RFC 2920: the whole group in one write; smtpState_to and
            # smtpState_toOrData then only read the replies, in order.
            self._pipelined = True
            self._owed = len(lines) + 2
            write_now(self.transport, b"\r\n".join([mail, *lines, b"DATA", b""]))
        else:
            self.sendLine(mail)
        return True

    def smtpState_to(self, code: int, resp: bytes) -> None:
        # Replaces SMTPClient.smtpState_to: pre-formatted RCPT lines.
        self._mail_accepted = True
        self._stage = "RCPT TO"
        self._expected = _SUCCESS
        self._okresponse = self.smtpState_toOrData
        self._failresponse = self.smtpState_toOrData
        if not self._pipelined:
            self.sendLine(self._rcpt_lines[0])

    def smtpState_toOrData(self, code: int, resp: bytes) -> None:
        # Replaces SMTPClient.smtpState_toOrData (quoteaddr, no 421 handling).
        index = self._sending[self._rcpt_pos]
        if code == 421:
            self._results[index] = (421, _text(resp), False)
            self._end(421, _text(resp), quit=True)
            return
        self.toAddressesResult.append((index, code, resp))
        if code in _SUCCESS:
            self.successAddresses.append(index)
        self._rcpt_pos += 1
        if self._rcpt_pos < len(self._rcpt_lines):
            if not self._pipelined:
                self.sendLine(self._rcpt_lines[self._rcpt_pos])
        elif self.successAddresses:
            self._stage = "DATA"
            self._expected = [354]
            self._okresponse = self.smtpState_data
            self._failresponse = self._data_refused
            if not self._pipelined:
                self.sendLine(b"DATA")
        else:
            # Stock quirk kept: code is the last RCPT's, resp a str.  When
            # pipelined, the DATA reply is still owed (smtpState_msgSent).
            self.smtpState_msgSent(code, "No recipients accepted")

    def smtpState_data(self, code: int, resp: bytes) -> None:
        # Replaces SMTPClient.smtpState_data: the body is already in wire form
        # (notes §2), written at once when small, else streamed.
        wire, self._wire = self._wire, b""
        self._stage = "message body"
        self._expected = _SUCCESS
        self._okresponse = self._early_reply
        self._failresponse = self._early_reply
        transport = self.transport
        if len(wire) <= self.single_write_max or getattr(transport, "producer", None) is not None:
            write_now(transport, wire)
            self._dot_written()
            return
        self._body_left = len(wire)
        sender = basic.FileSender()
        d = sender.beginFileTransfer(BytesIO(wire), transport, self.transformChunk)
        d.addErrback(self._body_stopped)

    def transformChunk(self, chunk: bytes) -> bytes:
        # Replaces SMTPClient.transformChunk, whose per-chunk dot-stuffing is
        # unsafe (SMTP smuggling, notes §2): the data is already wire form.
        # Keep its idle-timer reset so a slow but live peer is not cut off.
        self.resetTimeout()
        self._body_left -= len(chunk)
        if self._body_left <= 0 and not self._dot_sent:
            self._dot_written()
        return chunk

    def _body_stopped(self, failure: Failure) -> None:
        # FileSender errbacks when the transport stops it (connection lost);
        # connectionLost reports the envelope.
        return None

    def _dot_written(self) -> None:
        self._dot_sent = True
        self._stage = "end of data"
        self._okresponse = self.smtpState_msgSent
        self._failresponse = self.smtpState_msgSent

    def _early_reply(self, code: int, resp: bytes) -> None:
        """A reply arrived while the body was still being written."""
        text = _text(resp)
        if code >= 400:
            self._end(code, text, abort=True)
        else:
            self._end(451, f"4.5.0 {self._cfg.peer} replied {code} {text} before the end of the data", abort=True)

    def _data_refused(self, code: int, resp: bytes) -> None:
        """DATA not answered 354.  A 4xx/5xx ends the transaction with that reply;
        anything else (a 2xx, say) is no acceptance of a body that was never
        sent, so the recipients are deferred, never recorded as delivered."""
        if code < 400:
            text = f"4.5.0 {self._cfg.peer} replied {code} {_text(resp)} to DATA instead of 354"
            code, resp = 451, text.encode("utf-8", "replace")
        self.smtpState_msgSent(code, resp)

    def smtpState_msgSent(self, code: int, resp: bytes | str) -> None:
        # Replaces SMTPClient.smtpState_msgSent: no RSET after a completed
        # transaction (RFC 5321 allows it, notes §3), a refused RSET ends the
        # session instead of looping, and a 421 ends it at once.
        # Pipelined, a refused MAIL also gets RSET: the replies still owed
        # for the group are skipped first.
        final = self._dot_sent
        needs_rset = (self._mail_accepted or self._pipelined) and not final
        self.sentMail(code, resp, len(self.successAddresses), self.toAddressesResult, self.log)
        if final:
            self._transactions += 1
        if code == 421:
            self._error = f"421 {_text(resp)}"
            self._close(quit=True)
        elif needs_rset:
            self._skip_owed()
        else:
            self.smtpState_from(code, resp)

    def _skip_owed(self) -> None:
        """Count off the replies still owed for a failed pipelined group, then RSET."""
        if not self._owed:
            self._rset()
            return
        self._stage = "pipelined commands"
        self._expected = ()
        self._okresponse = self._skipped_reply
        self._failresponse = self._skipped_reply

    def _skipped_reply(self, code: int, resp: bytes) -> None:
        # A reply to a command of a failed pipelined group: not a result.
        if code == 421:
            self._error = f"421 {_text(resp)}"
            self._close(quit=True)
        elif self._owed:
            return
        elif code == 354 and self._stage == "pipelined commands":
            # DATA accepted although MAIL or every RCPT was refused (RFC 2920
            # says it must not be): end the empty message and ignore its reply.
            self._stage = "end of data (no recipients)"
            self._owed = 1
            write_now(self.transport, b".\r\n")
        elif code == 354:
            self._error = f"{code} {_text(resp)} in reply to the end of data"
            self._close()
        else:
            self._rset()

    def _rset(self) -> None:
        self._stage = "RSET"
        self._expected = _SUCCESS
        self._okresponse = self.smtpState_from
        self._failresponse = self._rset_refused
        self.sendLine(b"RSET")

    def _rset_refused(self, code: int, resp: bytes) -> None:
        self._error = f"RSET refused: {code} {_text(resp)}"
        self._close(quit=code != 421)

    def sentMail(self, code: int, resp: bytes | str, numOk: int, addresses: list, log: Any) -> None:
        """Turn the transaction's replies into one result per recipient.

        ``addresses`` holds ``(recipient index, code, resp)`` in RCPT order.
        Quirks kept from ESMTPClient (notes §1): ``addresses == []`` means MAIL
        FROM was refused (``numOk`` is not to be trusted); when every RCPT was
        refused ``code`` is the last RCPT's and ``resp`` a str.
        """
        text = _text(resp)
        if not 200 <= code < 600 or 300 <= code < 400:
            text = f"4.5.0 Unexpected reply {code} {text} from {self._cfg.peer}"
            code = 451
        results = self._results
        if not addresses:
            for index in self._sending:
                results[index] = (code, text, False)
        else:
            for index, rcode, rresp in addresses:
                if rcode in _SUCCESS:
                    results[index] = (code, text, False)
                else:
                    results[index] = (rcode, _text(rresp), False)
        self._deliver()

    def _deliver(self) -> None:
        """Call on_result for the envelope in flight (exactly once)."""
        env = self._env
        if env is None:
            return
        self._env = None
        fallback = (451, "4.3.0 Internal error in the SMTP client: recipient left undecided", False)
        results = [
            RecipientResult(rcpt, *(res or fallback))
            for rcpt, res in zip(env.recipients, self._results)
        ]
        try:
            self._cfg.on_result(env, results)
        except Exception:
            _log.failure("on_result raised", Failure())

    # -- ending -------------------------------------------------------------

    def _quit(self) -> None:
        self._stage = "QUIT"
        self._expected = range(0, 1000)
        self._okresponse = self._quit_reply
        self._failresponse = self._quit_reply
        self.sendLine(b"QUIT")

    def _quit_reply(self, code: int, resp: bytes) -> None:
        self._close()

    def _close(self, *, abort: bool = False, quit: bool = False) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_waiting()
        transport = self.transport
        if abort:
            transport.abortConnection()
            return
        if quit:
            transport.write(b"QUIT\r\n")
        # If the peer never reads, the idle timer (still running) aborts.
        transport.loseConnection()

    def _end(
        self,
        code: int,
        text: str,
        *,
        try_next: bool = True,
        abort: bool = False,
        quit: bool = False,
        possible_duplicate: bool | None = None,
    ) -> None:
        """End the session: defer the envelope in flight with (code, text),
        or record a host failure if nothing was pulled yet, then close."""
        if self._env is not None:
            dup = self._dot_sent if possible_duplicate is None else possible_duplicate
            self._defer_undecided(code, text, dup)
        elif self._envelopes == 0 and self._host_failure is None and self._stage != "QUIT":
            self._host_failure = HostFailure(code, text, try_next)
        if self._error is None and self._envelopes:
            self._error = f"{code} {text}"
        self._close(abort=abort, quit=quit)

    def _defer_undecided(self, code: int, text: str, dup: bool) -> None:
        """Decide every recipient still open with (code, text) and report."""
        results = self._results
        rcpt = {index: (c, r) for index, c, r in self.toAddressesResult}
        for index in range(len(results)):
            if results[index] is not None:
                continue
            got = rcpt.get(index)
            if got is not None and got[0] not in _SUCCESS:
                results[index] = (got[0], _text(got[1]), False)  # its RCPT reply decided it
            else:
                results[index] = (code, text, dup and got is not None)
        self._deliver()

    def _protocol_error(self, line: bytes) -> None:
        shown = line[:80].decode("ascii", "backslashreplace")
        peer = self._cfg.peer
        if self._env is not None:
            self._end(451, f"4.5.0 Malformed reply from {peer} to {self._stage}: {shown!r}", abort=True)
        else:
            self._end(421, f"4.5.0 Malformed reply from {peer} to {self._stage}: {shown!r}", abort=True)

    def _internal_error(self, failure: Failure) -> None:
        _log.failure("SMTP client error talking to {peer}", failure, peer=self._cfg.peer)
        text = f"4.3.0 Internal error in the SMTP client ({self._stage}): {_describe(failure)}"
        try:
            self._end(451 if self._env is not None else 421, text, abort=True)
        except Exception:
            _log.failure("SMTP client could not end the session cleanly", Failure())
            self._closing = True
            try:
                self.transport.abortConnection()
            except Exception:
                pass

    def timeoutConnection(self) -> None:
        # Replaces SMTPClient.timeoutConnection (sendError, then a close that
        # may wait for a peer that does not read).
        try:
            if self._closing or self._stage == "QUIT":
                self._closing = True
                self.transport.abortConnection()
                return
            peer = self._cfg.peer
            if self._stage == "greeting":
                self._end(421, f"4.4.1 No greeting from {peer} within {self._cfg.connect_timeout:g}s", abort=True)
                return
            if self._tls_started and not self._tls_up:
                status = "4.7.5" if self._cfg.tls == "required" else "4.7.0"
                self._end(454, f"{status} TLS with {peer} failed: no answer within "
                          f"{self._cfg.command_timeout:g}s", abort=True)
                return
            text = f"4.4.2 Timed out after {self._cfg.command_timeout:g}s waiting for {peer} to answer {self._stage}"
            if self._env is not None and self._dot_sent:
                text += "; the message may have been delivered"
            self._end(451 if self._env is not None else 421, text, abort=True)
        except Exception:
            self._internal_error(Failure())

    def sendError(self, exc: BaseException) -> None:
        # Only reached from ESMTPClient code paths we did not replace.
        if isinstance(exc, smtp.SMTPClientError) and exc.code and exc.code > 0:
            code, text = exc.code, _text(exc.resp or b"")
        else:
            code, text = (451 if self._env is not None else 421), f"4.3.0 {_describe(exc)}"
        self._end(code, text, abort=True)

    def cancel(self) -> None:
        """Abort the session (the drain is stopping)."""
        if not self._closing:
            self._end(451, f"4.4.2 Session with {self._cfg.peer} cancelled", abort=True, possible_duplicate=False)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        try:
            self._stop_waiting()
            if not self._closing and self._stage != "QUIT":
                self._lost(reason)
        except Exception:
            _log.failure("SMTP client error in connectionLost", Failure())
        finally:
            try:
                if self._env is not None:
                    self._defer_undecided(451, f"4.4.2 Connection to {self._cfg.peer} lost", self._dot_sent)
            except Exception:
                _log.failure("SMTP client could not report an envelope", Failure())
            self._closing = True
            smtp.ESMTPClient.connectionLost(self, reason)
            self._finish()

    def _lost(self, reason: Failure) -> None:
        cfg = self._cfg
        peer = cfg.peer
        self._closing = True  # the transport is gone: _end must not touch it
        if self._stage == "idle":
            return            # the peer closed a connection we were keeping open: no error
        if self._tls_started and not self._tls_up:
            status = "4.7.5" if cfg.tls == "required" else "4.7.0"
            self._end(454, f"{status} TLS with {peer} failed: {_describe(reason)}", try_next=True)
            return
        if self._env is not None:
            text = f"4.4.2 Connection to {peer} lost during {self._stage}"
            if self._dot_sent:
                text += " after the final dot; the message may have been delivered"
            self._end(451, text)
            return
        self._end(421, f"4.4.2 Connection to {peer} lost during {self._stage}", try_next=True)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.factory.finish(
            SessionEnd(
                host_failure=self._host_failure,
                envelopes=self._envelopes,
                transactions=self._transactions,
                tls=self._tls_up,
                authenticated=self._authenticated,
                extensions=dict(self.extensions),
                error=self._error,
            )
        )


class _SessionFactory(protocol.ClientFactory):
    """Builds the one protocol of a session and fires its Deferred."""

    noisy = False

    def __init__(self, reactor: Any, cfg: _Config) -> None:
        self._reactor = reactor
        self._cfg = cfg
        self.deferred: Deferred[SessionEnd] = Deferred(self._cancel)
        self.protocol_instance: _RelayClient | None = None
        self.connector: Any = None

    def buildProtocol(self, addr: Any) -> _RelayClient:
        proto = _RelayClient(self._cfg, self._reactor, self)
        self.protocol_instance = proto
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        peer = self._cfg.peer
        if reason.check(ierror.ConnectionRefusedError):
            text = f"4.4.1 Connection refused by {peer}"
        elif reason.check(ierror.TimeoutError):
            text = f"4.4.1 Connection to {peer} timed out after {self._cfg.connect_timeout:g}s"
        else:
            text = f"4.4.1 Cannot connect to {peer}: {_describe(reason)}"
        self.finish(SessionEnd(host_failure=HostFailure(421, text, True)))

    def finish(self, end: SessionEnd) -> None:
        if not self.deferred.called:
            self.deferred.callback(end)

    def _cancel(self, d: Deferred[SessionEnd]) -> None:
        proto = self.protocol_instance
        if proto is not None:
            proto.cancel()
        elif self.connector is not None:
            try:
                self.connector.stopConnecting()
            except ierror.NotConnectingError:
                pass


def open_session(
    reactor: Any,
    *,
    address: str,
    port: int,
    host_name: str,
    ehlo: str,
    tls: str,
    connect_timeout: float,
    command_timeout: float,
    next_envelope: Callable[[], Envelope | None],
    on_result: Callable[[Envelope, list[RecipientResult]], None],
    credentials: tuple[str, str] | None = None,
    trust_root: Any = None,
) -> Deferred[SessionEnd]:
    """Open one SMTP session to ``address:port`` and carry envelopes over it.

    ``host_name`` is the MX name (for certificate checks and messages),
    ``ehlo`` our EHLO name, ``tls`` one of :data:`TLS_MODES`.
    ``next_envelope()`` is called whenever the session can start a
    transaction (``None`` ends it); ``on_result(envelope, results)`` is
    called exactly once per envelope pulled.  ``credentials`` is
    ``(username, password)`` for AUTH PLAIN/LOGIN (required when given).
    ``trust_root`` (an ``IOpenSSLTrustRoot``) replaces the platform trust
    store for ``tls="required"``.  See the module docstring for the results.
    """
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    if connect_timeout <= 0 or command_timeout <= 0:
        raise ValueError("connect_timeout and command_timeout must be > 0")
    try:
        ehlo_bytes = ehlo.encode("ascii")
    except UnicodeEncodeError:
        ehlo_bytes = ehlo.encode("idna")
    peer = f"{host_name}[{address}]:{port}"
    cfg = _Config(
        address=address,
        port=port,
        host_name=host_name,
        ehlo=ehlo_bytes,
        tls=tls,
        connect_timeout=connect_timeout,
        command_timeout=command_timeout,
        next_envelope=next_envelope,
        on_result=on_result,
        credentials=credentials,
        trust_root=trust_root,
        peer=peer,
    )
    factory = _SessionFactory(reactor, cfg)
    factory.connector = reactor.connectTCP(address, port, factory, timeout=connect_timeout)
    return factory.deferred
