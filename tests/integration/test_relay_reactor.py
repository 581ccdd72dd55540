"""relayd's reactor (relay.reactor) on real loopback connections: write_now
output leaves at the end of the reactor turn (or before the reactor waits,
when written by a timed call), in the order it was written (also behind
Twisted's own buffer, after a partial send, and around STARTTLS: what was
batched before it goes in plaintext, nothing after it does), close_now sends
what is batched before closing, an abort sends nothing, and an error in a
protocol is logged and drops only its connection.

Each test runs its own RelayReactor instance (not installed as the global
reactor) in the test's thread; the client is a blocking socket in a thread.
"""

from __future__ import annotations

import socket
import threading

from twisted.internet import protocol, ssl
from twisted.logger import globalLogPublisher

from relay.reactor import RelayReactor
from relay.sendnow import close_now, write_now

TIMEOUT = 10.0


class Script(protocol.Protocol):
    """On its first data: runs ``script(self)``; records the batch after it.
    ``sndbuf`` (optional) sets the connection's send buffer."""

    def __init__(self, script, sndbuf: int | None = None):
        self.script = script
        self.sndbuf = sndbuf
        self.batched_after: list[bytes] | None = None

    def connectionMade(self):
        if self.sndbuf:
            self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)

    def dataReceived(self, data):
        self.script(self)
        chunks = self.transport.reactor.output_batch.pending.get(self.transport)
        self.batched_after = list(chunks) if chunks else []


def run_with_client(reactor: RelayReactor, client) -> None:
    """Run ``reactor`` while ``client`` runs in a thread (it stops the
    reactor when done; TIMEOUT bounds both), then close the reactor's poller."""
    thread = threading.Thread(target=client, daemon=True)
    reactor.callWhenRunning(thread.start)
    reactor.callLater(TIMEOUT, reactor.stop)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        thread.join(TIMEOUT)
        reactor._poller.close()


def serve(script, client_sends: bytes = b"go\r\n", sndbuf: int | None = None,
          rcvbuf: int | None = None, quiet_after: float | None = None,
          wait_for: int = 0) -> tuple[bytes, Script, RelayReactor]:
    """Run a RelayReactor serving one connection with ``script``; the client
    sends ``client_sends`` and reads until the server closes, TIMEOUT, or
    (``quiet_after``) that many seconds without data once ``wait_for`` bytes
    have come (so a slow machine can delay what is expected without cutting
    it short; the quiet spell only looks for more)."""
    reactor = RelayReactor()
    server = Script(script, sndbuf)
    port = reactor.listenTCP(0, protocol.ServerFactory.forProtocol(lambda: server), interface="127.0.0.1")
    received = bytearray()

    def client():
        try:
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=TIMEOUT) as s:
                if rcvbuf:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                s.sendall(client_sends)
                while True:
                    if quiet_after and len(received) >= wait_for:
                        s.settimeout(quiet_after)
                    try:
                        data = s.recv(65536)
                    except socket.timeout:
                        break
                    if not data:
                        break
                    received.extend(data)
        except OSError:
            pass
        finally:
            reactor.callFromThread(reactor.stop)

    run_with_client(reactor, client)
    return bytes(received), server, reactor


def test_output_leaves_at_the_end_of_the_turn_in_one_piece():
    def script(p):
        write_now(p.transport, b"250-first\r\n")
        write_now(p.transport, b"250-second\r\n")
        write_now(p.transport, b"250 third\r\n")
        p.transport.loseConnection()   # after the turn: the batch goes first

    data, server, reactor = serve(script)
    assert server.batched_after == [b"250-first\r\n", b"250-second\r\n", b"250 third\r\n"]  # not sent yet
    assert data == b"250-first\r\n250-second\r\n250 third\r\n"
    assert reactor.output_batch.pending == {}


def test_order_is_kept_around_twisteds_own_buffer():
    def script(p):
        write_now(p.transport, b"one\r\n")
        p.transport.write(b"two\r\n")       # Twisted's buffer: after the batch
        write_now(p.transport, b"three\r\n")   # behind "two", not in the batch
        p.transport.loseConnection()   # after the turn: the batch goes first

    data, server, _ = serve(script)
    assert server.batched_after == [b"one\r\n"]
    assert data == b"one\r\ntwo\r\nthree\r\n"


def test_a_partial_send_keeps_its_rest_ahead_of_later_writes():
    big = bytes(range(256)) * (16 * 1024)      # 4 MiB: far more than the send buffer takes at once

    def script(p):
        write_now(p.transport, big)
        p.transport.write(b"after\r\n")
        p.transport.loseConnection()   # after the turn: the batch goes first

    data, _, _ = serve(script, sndbuf=64 * 1024, rcvbuf=64 * 1024)
    assert len(data) == len(big) + 7
    assert data[:len(big)] == big
    assert data.endswith(b"after\r\n")


def test_close_now_sends_the_batch_then_closes():
    def script(p):
        write_now(p.transport, b"221 bye\r\n")
        close_now(p.transport)

    data, server, reactor = serve(script)
    assert server.batched_after == []           # sent by close_now, not left for the turn's end
    assert data == b"221 bye\r\n"
    assert reactor.output_batch.pending == {}


def test_nothing_is_sent_after_an_abort():
    def script(p):
        write_now(p.transport, b"never\r\n")
        p.transport.abortConnection()

    data, _, _ = serve(script)
    assert data == b""


def test_an_error_in_a_protocol_drops_only_its_connection():
    calls = []

    def script(p):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    reactor = RelayReactor()
    factory = protocol.ServerFactory.forProtocol(lambda: Script(script))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    results: list[bytes] = []

    def client():
        try:
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=TIMEOUT) as s:
                    s.sendall(b"x")
                    s.settimeout(0.5 if results else TIMEOUT)
                    try:
                        results.append(s.recv(10))
                    except socket.timeout:
                        results.append(b"still open")
        finally:
            reactor.callFromThread(reactor.stop)

    run_with_client(reactor, client)
    assert results == [b"", b"still open"]     # the first was closed; the second was served
    assert calls == [1, 1]


def test_relayd_runs_on_relays_reactor(tmp_path):
    """relayd installs RelayReactor before anything imports Twisted's default
    reactor (twisted.mail.smtp does, at import)."""
    import subprocess
    import sys
    script = ("import sys\n"
              "from relay import daemon\n"
              "code = daemon.main(['--config', sys.argv[1]])\n"
              "print(code, type(sys.modules['twisted.internet.reactor']).__name__)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["64", "RelayReactor"], out.stderr


def tls_options(tmp_path) -> ssl.CertificateOptions:
    from test_submission import write_self_signed
    cert, key = write_self_signed(str(tmp_path))
    with open(cert, "rb") as c, open(key, "rb") as k:
        return ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()


def test_nothing_written_after_starttls_goes_out_in_plaintext(tmp_path):
    options = tls_options(tmp_path)

    def script(p):
        write_now(p.transport, b"220 go\r\n")
        p.transport.startTLS(options)
        write_now(p.transport, b"500 under TLS\r\n")    # for the TLS layer, after a handshake

    data, _, _ = serve(script, quiet_after=1.0, wait_for=len(b"220 go\r\n"))
    assert data == b"220 go\r\n"


def test_what_was_batched_before_starttls_goes_out_in_plaintext_whole(tmp_path):
    options = tls_options(tmp_path)
    big = bytes(range(256)) * (16 * 1024)      # the kernel takes only part at the end of the turn

    def script(p):
        write_now(p.transport, big)
        p.transport.startTLS(options)

    data, _, _ = serve(script, sndbuf=64 * 1024, rcvbuf=64 * 1024, quiet_after=1.0, wait_for=len(big))
    assert data == big


def test_output_of_a_timed_call_leaves_before_the_reactor_waits():
    def script(p):
        def later():
            write_now(p.transport, b"250 later\r\n")
            p.transport.loseConnection()   # after the turn: the batch goes first
        p.transport.reactor.callLater(0, later)

    # a batch left for the next event would wait for the reactor's TIMEOUT (10 s) stop
    data, _, _ = serve(script, quiet_after=5.0)
    assert data == b"250 later\r\n"


def test_an_error_while_disconnecting_is_logged_and_the_reactor_goes_on():
    """An error from connectionLost (after the client hung up) is logged by
    the reactor's dispatch, and the next client is served -- even one that
    is not an Exception (only KeyboardInterrupt stops the reactor)."""
    class Boom(BaseException):
        pass

    class Failing(protocol.Protocol):
        def dataReceived(self, data):
            write_now(self.transport, data)

        def connectionLost(self, reason):
            raise Boom("boom in connectionLost")

    reactor = RelayReactor()
    port = reactor.listenTCP(0, protocol.ServerFactory.forProtocol(Failing), interface="127.0.0.1")
    ours: list[dict] = []

    def observe(event):
        if "Unhandled error handling an event" in event.get("log_format", ""):
            ours.append(event)
            if len(ours) == 2:      # the second hang-up handled: done (TIMEOUT bounds the wait)
                reactor.stop()

    globalLogPublisher.addObserver(observe)
    echoed: list[bytes] = []

    def client():
        for n in range(2):
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=TIMEOUT) as c:
                c.sendall(b"ping%d" % n)
                echoed.append(c.recv(10))

    try:
        run_with_client(reactor, client)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert echoed == [b"ping0", b"ping1"]
    assert len(ours) == 2
    assert all("boom in connectionLost" in str(e["log_failure"].value) for e in ours)
