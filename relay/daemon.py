"""``relayd``: the relay daemon in the foreground, logging to stderr.

SIGTERM or SIGINT stop it gracefully (SPEC "Graceful stop"): it stops
claiming, lets transactions in progress finish, releases what it did not
start and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time

from relay import __version__
from relay.errors import RelayError


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE) with one sentence, as relayctl's and
    relayd's configuration errors do, not argparse's 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(64, f"relayd: {message.rstrip('.')}; see `relayd --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="relayd",
        description="Deliver the relay spool: claim due recipients, look up MX hosts, "
                    "deliver over SMTP, retry temporary failures and bounce permanent ones. "
                    "Runs in the foreground and logs one line per recipient per attempt to stderr; "
                    "SIGTERM or SIGINT stop it gracefully.")
    p.add_argument("--config", metavar="PATH",
                   help="configuration file (TOML); default $RELAY_CONFIG, else built-in defaults "
                        "with an SQLite spool under $XDG_STATE_HOME/relay")
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    return p


def _start_logging():
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner
    from twisted.logger import formatEventAsClassicLogText

    stamp: list = [None, ""]

    def format_time(t) -> str:
        """``%Y-%m-%dT%H:%M:%S`` local time, formatted once per second."""
        second = int(t)
        if stamp[0] != second:
            stamp[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))]
        return stamp[1]

    def to_stderr(event):
        text = formatEventAsClassicLogText(event, formatTime=format_time)
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(to_stderr, [predicate])],
                                     redirectStandardIO=False)
    return format_time


class AttemptLines:
    """The drain's one line per recipient per attempt, written to stderr as
    ``to_stderr`` would write a ``log.info("{line}", line=...)`` event from
    the ``relay`` namespace, without the logging pipeline: lines are gathered
    and written once per reactor turn (one write for a whole batch)."""

    def __init__(self, reactor, format_time, stream=None):
        self.reactor = reactor
        self.format_time = format_time
        self.stream = stream if stream is not None else sys.stderr
        self._lines: list[str] = []
        self._flush_call = None

    def __call__(self, line: str) -> None:
        self._lines.append(f"{self.format_time(time.time())} [relay#info] {line.replace(chr(10), chr(10) + chr(9))}\n")
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._flush_call = None
        lines, self._lines = self._lines, []
        if lines:
            self.stream.write("".join(lines))
            self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before anything imports twisted.internet.reactor (twisted.mail.smtp does).
    from relay.reactor import install_unless_installed
    install_unless_installed()
    from relay.config import load_config
    from relay.tap import build_service, describe, tune_garbage_collector

    try:
        config = load_config(args.config)
        from twisted.internet import reactor
        attempt_lines = AttemptLines(reactor, format_time=None)
        top = build_service(config, reactor, attempt_log=attempt_lines)
    except RelayError as e:
        # One sentence and the sysexits code; the sentence names the spool
        # when it is the spool that failed, so no start-up line before it.
        print(f"relayd: {e}", file=sys.stderr)
        return e.exit_code
    print(describe(config), file=sys.stderr, flush=True)
    attempt_lines.format_time = _start_logging()
    tune_garbage_collector()
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    attempt_lines.flush()
    if top.start_error is not None:     # logged when it happened
        return top.start_error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
