"""``relayctl``: the command line over :mod:`relay.api` (SPEC "relayctl").

The shell is thin on purpose: :func:`build_parser` describes the commands,
each ``cmd_<verb>(relay, args, out)`` calls the library and prints, and
:func:`main` is the one error boundary that maps exception classes to
sysexits codes and one sentence on stderr::

    RelayError        its exit_code (UsageError/ConfigError 64, BadMessage 65,
                      InputNotFound 66, UnknownMessage 1, SpoolUnavailable and
                      MessageInFlight 75)
    argparse errors   64
    Ctrl-C            130, quietly
    stdout closed     141 (what a process killed by SIGPIPE reports), quietly
    anything else     70; the traceback only with RELAY_DEBUG=1

What a command prints is collected and written to stdout only when it
succeeds, so a failing command prints nothing on stdout.  The spool is opened
the first time a command asks for it, never for ``--help`` or a usage error.

Output choices where SPEC is silent: times in JSON are ISO-8601 UTC with
millisecond precision and a ``Z`` suffix (``2026-05-01T12:00:00.000Z``);
the null sender is ``""`` in JSON and ``<>`` in human output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy.exc import ArgumentError as SQLAlchemyArgumentError

import relay as relay_package
from relay import api
from relay.config import Config, load_config, parse_duration, redact_url
from relay.errors import BadMessage, ConfigError, InputNotFound, RelayError, UsageError
from relay.message import parse_message, read_mbox, validate_address, validate_sender
from relay.model import MessageInfo, NewMessage, SpoolStatus, State

PROG = "relayctl"
STATES = tuple(s.value for s in State)

EX_OK = 0
EX_SOFTWARE = 70
EX_INTERRUPTED = 130
EX_BROKEN_PIPE = 141

#: Seconds between two frames of ``status --watch``.
WATCH_INTERVAL = 1.0
#: Replaced by tests so that ``status --watch`` does not really wait.
sleep: Callable[[float], None] = time.sleep

_CLEAR_SCREEN = "\x1b[H\x1b[2J"
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# -- output ------------------------------------------------------------------


class StdoutClosed(Exception):
    """The reader of stdout went away (``relayctl list | head``)."""


class Output:
    """What a command prints, held back until the command has succeeded.

    ``flush()`` writes what was collected to the real stdout; ``main`` calls
    it after a command returns, and ``status --watch`` after every frame.
    """

    def __init__(self) -> None:
        self._parts: list[str] = []

    def write(self, text: str) -> None:
        self._parts.append(text)

    def line(self, text: str = "") -> None:
        self._parts.append(text + "\n")

    def json(self, value: Any) -> None:
        self._parts.append(json.dumps(value) + "\n")

    def discard(self) -> None:
        self._parts.clear()

    def isatty(self) -> bool:
        try:
            return sys.stdout.isatty()
        except (AttributeError, ValueError):
            return False

    def flush(self) -> None:
        text = "".join(self._parts)
        self._parts.clear()
        if not text:
            return
        stream = sys.stdout
        try:
            try:
                stream.write(text)
            except UnicodeEncodeError:
                encoding = getattr(stream, "encoding", None) or "utf-8"
                stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
            stream.flush()
        except BrokenPipeError:
            raise StdoutClosed() from None


def iso_time(t: float | None) -> str | None:
    """A POSIX time as ISO-8601 UTC, e.g. ``2026-05-01T12:00:00.000Z`` (None stays None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_time(t: float | None) -> str:
    """A POSIX time for people: ``2026-05-01 12:00:00 UTC``."""
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def human_age(seconds: float) -> str:
    """``42s``, ``5m 3s``, ``2h 4m``, ``3d 2h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def printable(text: str | None) -> str:
    """Text from a message or a remote server, safe to show on a terminal (no escape sequences)."""
    if text is None:
        return ""
    return _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def human_sender(sender: str) -> str:
    return "<>" if not sender else printable(sender)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# -- the spool, opened on first use -------------------------------------------


@contextmanager
def spool_url_errors(config: Config) -> Iterator[None]:
    """A spool URL SQLAlchemy cannot use at all (unknown driver...) is a configuration error."""
    try:
        yield
    except SQLAlchemyArgumentError as e:
        raise ConfigError(f"The spool URL {redact_url(config.spool_url)} cannot be used: "
                          f"{str(e).rstrip('.')}.") from e


class LazyRelay:
    """A :class:`relay.api.Relay` that opens the configured spool on first use.

    ``config`` is available without opening anything; every other attribute
    is the opened Relay's.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._relay: api.Relay | None = None

    def opened(self) -> api.Relay:
        if self._relay is None:
            with spool_url_errors(self.config):
                self._relay = api.open(self.config)
        return self._relay

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.opened(), name)

    def close(self) -> None:
        if self._relay is not None:
            relay, self._relay = self._relay, None
            relay.close()


# -- enqueue ------------------------------------------------------------------


def read_input(name: str) -> bytes:
    """The bytes of one input: a file, or stdin for ``-``."""
    if name == "-":
        stream = sys.stdin
        return stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
    try:
        with open(name, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InputNotFound(f"The input file {name} does not exist; nothing was queued.") from None
    except IsADirectoryError:
        raise InputNotFound(f"The input {name} is a directory, not a message file; nothing was queued.") from None
    except OSError as e:
        raise InputNotFound(f"The input file {name} cannot be read ({e.strerror}); nothing was queued.") from None


def _in_input(where: str, error: BadMessage) -> BadMessage:
    return BadMessage(f"{where}: {str(error).rstrip('.')}; nothing was queued.")


def check_enqueue_usage(args: argparse.Namespace) -> None:
    """Refuse combinations of inputs and flags that make no sense (64), before reading anything."""
    if args.mbox is not None:
        if args.files:
            raise UsageError("Give either --mbox FILE or message files, not both.")
        if args.idempotency_key is not None:
            raise UsageError("--idempotency-key names one message, so it cannot be used with --mbox.")
        return
    names = args.files or ["-"]
    if names.count("-") > 1:
        raise UsageError("Standard input (-) can be named only once.")
    if args.idempotency_key is not None and len(names) > 1:
        raise UsageError("--idempotency-key names one message, so it takes exactly one input.")


def read_mbox_messages(path: str) -> list[tuple[str, bytes]]:
    """(name for messages, raw bytes) of every message of an mbox file."""
    try:
        raws = list(read_mbox(path))
    except OSError as e:
        raise InputNotFound(f"The mbox file {path} cannot be read ({e.strerror}); nothing was queued.") from None
    if not raws and os.path.getsize(path) > 0:
        raise BadMessage(f"The file {path} is not an mbox (no message starts with a \"From \" line); "
                         f"nothing was queued.")
    return [(f"{path} message {n}", raw) for n, raw in enumerate(raws, start=1)]


def validated_messages(args: argparse.Namespace) -> list[NewMessage]:
    """Read and validate every input before anything is written (all or nothing)."""
    check_enqueue_usage(args)
    # The envelope given by flags is checked once, before any input is read.
    if args.sender is not None:
        validate_sender(args.sender)
    for address in args.to or ():
        validate_address(address, what="--to address")
    if args.mbox is not None:
        inputs = read_mbox_messages(args.mbox)
    else:
        # Every file is read (66 if one is missing) before any is parsed (65).
        inputs = [("standard input" if name == "-" else name, read_input(name))
                  for name in args.files or ["-"]]
    messages = []
    for source, raw in inputs:
        try:
            messages.append(parse_message(raw, sender=args.sender, recipients=args.to or None,
                                          idempotency_key=args.idempotency_key))
        except BadMessage as e:
            raise _in_input(source, e) from None
    return messages


def cmd_enqueue(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    messages = validated_messages(args)
    ids = relay.enqueue_many(messages) if messages else []
    if args.json:
        out.json(ids)
    else:
        for queue_id in ids:
            out.line(queue_id)
    return EX_OK


# -- status -------------------------------------------------------------------


def status_json(config: Config, status: SpoolStatus, now: float) -> dict[str, Any]:
    """SPEC's ``status --json`` object."""
    oldest = status.oldest_pending_at
    return {
        "spool": redact_url(config.spool_url),
        "messages": status.messages,
        "recipients": {state: int(status.recipients.get(state, 0)) for state in STATES},
        "oldest_pending_age_s": None if oldest is None else round(max(0.0, now - oldest), 3),
        "next_attempt_at": iso_time(status.next_attempt_at),
        "domains": [{"domain": d.domain, "queued": d.queued, "deferred": d.deferred,
                     "inflight": d.inflight} for d in status.domains],
    }


def status_text(config: Config, status: SpoolStatus, now: float) -> str:
    """The human ``status`` screen: the same numbers as the JSON, for people."""
    report = status_json(config, status, now)
    counts = report["recipients"]
    lines = [
        f"Spool            {report['spool']}",
        f"Messages         {report['messages']}",
        "Recipients       " + "  ".join(f"{state} {counts[state]}" for state in STATES),
    ]
    age = report["oldest_pending_age_s"]
    lines.append("Oldest pending   " + ("-" if age is None else f"{human_age(age)} ago"))
    next_at = status.next_attempt_at
    if next_at is None:
        lines.append("Next retry       -")
    else:
        when = "due now" if next_at <= now else f"in {human_age(next_at - now)}"
        lines.append(f"Next retry       {human_time(next_at)} ({when})")
    if report["domains"]:
        width = max(6, *(len(printable(d["domain"])) for d in report["domains"]))
        lines.append("Busiest domains")
        lines.append(f"  {'DOMAIN':<{width}}  {'QUEUED':>8}  {'DEFERRED':>8}  {'INFLIGHT':>8}")
        for d in report["domains"]:
            lines.append(f"  {printable(d['domain']):<{width}}  {d['queued']:>8}  {d['deferred']:>8}"
                         f"  {d['inflight']:>8}")
    else:
        lines.append("Busiest domains  - (nothing pending)")
    return "\n".join(lines) + "\n"


def cmd_status(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    def frame() -> None:
        status = relay.status()
        now = relay.clock()
        if args.json:
            out.json(status_json(relay.config, status, now))
        else:
            out.write(status_text(relay.config, status, now))

    if not args.watch:
        frame()
        return EX_OK
    clear = _CLEAR_SCREEN if out.isatty() and not args.json else ""
    try:
        first = True
        while True:
            if not args.json:
                out.write(clear if clear else ("" if first else "\n"))
            frame()
            out.flush()
            first = False
            sleep(WATCH_INTERVAL)
    except KeyboardInterrupt:
        return EX_OK


# -- list and show --------------------------------------------------------------


def list_json(messages: Sequence[MessageInfo]) -> list[dict[str, Any]]:
    return [{"id": m.id, "sender": m.sender, "created_at": iso_time(m.created_at), "size": m.size,
             "recipients": [{"address": r.address, "state": r.state.value} for r in m.recipients]}
            for m in messages]


def list_text(messages: Sequence[MessageInfo], filtered: bool) -> str:
    """``mailq``-like: id, size, arrival time and sender, then each recipient with its state."""
    if not messages:
        return "No message matches.\n" if filtered else "Mail queue is empty.\n"
    id_width = max(8, *(len(m.id) for m in messages))
    indent = " " * (id_width + 1 + 10 + 1 + 23 + 1)
    lines = [f"{'-Queue ID-':<{id_width}} {'--Size--':>10} {'----Arrival Time-------':<23} -Sender/Recipient-"]
    n_recipients = 0
    for m in messages:
        lines.append(f"{m.id:<{id_width}} {m.size:>10} {human_time(m.created_at):<23} {human_sender(m.sender)}")
        for r in m.recipients:
            n_recipients += 1
            detail = r.state.value
            if r.last_code is not None or r.last_response:
                reply = " ".join(str(x) for x in (r.last_code, printable(r.last_response)) if x)
                detail += f": {reply}"
            lines.append(f"{indent}{printable(r.address)} ({detail})")
        lines.append("")
    lines.append(f"-- {plural(len(messages), 'message')}, {plural(n_recipients, 'recipient')}.")
    return "\n".join(lines) + "\n"


def cmd_list(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    messages = relay.list(state=args.state, domain=args.domain, limit=args.limit)
    if args.json:
        out.json(list_json(messages))
    else:
        out.write(list_text(messages, filtered=bool(args.state or args.domain)))
    return EX_OK


def show_json(m: MessageInfo) -> dict[str, Any]:
    """SPEC's ``show --json`` object."""
    return {
        "id": m.id, "sender": m.sender, "size": m.size, "created_at": iso_time(m.created_at),
        "subject": m.subject, "message_id": m.message_id,
        "recipients": [{
            "address": r.address, "domain": r.domain, "state": r.state.value, "attempts": r.attempts,
            "next_attempt_at": iso_time(r.next_attempt_at), "last_code": r.last_code,
            "last_response": r.last_response,
            "history": [{"at": iso_time(a.at), "host": a.host, "code": a.code, "response": a.response}
                        for a in r.history],
        } for r in m.recipients],
    }


def show_text(m: MessageInfo) -> str:
    lines = [
        f"Queue ID:     {m.id}",
        f"Sender:       {human_sender(m.sender)}",
        f"Size:         {plural(m.size, 'byte')}",
        f"Queued:       {human_time(m.created_at)}",
        f"Subject:      {printable(m.subject) if m.subject is not None else '-'}",
        f"Message-ID:   {printable(m.message_id) if m.message_id is not None else '-'}",
        f"Recipients:   {len(m.recipients)}",
    ]
    for r in m.recipients:
        lines.append("")
        lines.append(f"  {printable(r.address)}")
        lines.append(f"    State:         {r.state.value}")
        lines.append(f"    Attempts:      {r.attempts}")
        lines.append(f"    Next attempt:  {human_time(r.next_attempt_at)}")
        if r.last_code is not None or r.last_response:
            lines.append(f"    Last reply:    {r.last_code if r.last_code is not None else ''} "
                         f"{printable(r.last_response)}".rstrip())
        if r.history:
            lines.append("    History:")
            for a in r.history:
                reply = " ".join(str(x) for x in (a.code, printable(a.response)) if x)
                lines.append(f"      {human_time(a.at)}  {printable(a.host) or '-'}  {reply or '-'}")
        else:
            lines.append("    History:       not tried yet")
    return "\n".join(lines) + "\n"


def cmd_show(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    message = relay.show(args.id)
    if args.json:
        out.json(show_json(message))
    else:
        out.write(show_text(message))
    return EX_OK


# -- administration ---------------------------------------------------------------


def cmd_retry(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    chosen = [x for x in (args.id is not None, args.domain is not None, args.all) if x]
    if len(chosen) != 1:
        raise UsageError("retry needs exactly one of ID, --domain DOMAIN or --all.")
    made_due = relay.retry(args.id, domain=args.domain)
    if args.json:
        out.json({"retried": made_due})
    else:
        out.line(f"{plural(made_due, 'recipient')} made due now.")
    return EX_OK


def cmd_hold(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    held = relay.hold(args.id)
    if args.json:
        out.json({"id": args.id, "held": held})
    else:
        out.line(f"Message {args.id}: {plural(held, 'recipient')} held.")
    return EX_OK


def cmd_release(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    released = relay.release(args.id)
    if args.json:
        out.json({"id": args.id, "released": released})
    else:
        out.line(f"Message {args.id}: {plural(released, 'recipient')} released.")
    return EX_OK


def cmd_delete(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    relay.delete(args.id)
    if args.json:
        out.json({"id": args.id, "deleted": True})
    else:
        out.line(f"Message {args.id} deleted.")
    return EX_OK


def cmd_purge(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    older_than = parse_duration(args.older_than, "--older-than")
    purged = relay.purge(older_than)
    if args.json:
        out.json({"purged": purged})
    else:
        out.line(f"{plural(purged, 'message')} purged.")
    return EX_OK


def cmd_db_upgrade(relay: LazyRelay, args: argparse.Namespace, out: Output) -> int:
    config = relay.config
    with spool_url_errors(config):
        before, after = api.upgrade_schema(config)
    where = redact_url(config.spool_url)
    if args.json:
        out.json({"spool": where, "before": before, "after": after, "upgraded": before != after})
    elif before == after:
        out.line(f"spool {where}: schema already at {after}")
    else:
        out.line(f"spool {where}: schema upgraded from {before or 'none'} to {after}")
    return EX_OK


# -- the parser -------------------------------------------------------------------


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a :class:`UsageError` (exit 64), not exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message.rstrip('.')}; see `{self.prog} --help`.")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not at least 1")
    return value


EXIT_STATUS = """\
exit status (sysexits):
  0   success
  1   unknown queue id
  64  usage error: bad flags or arguments, bad configuration
  65  bad message or address (nothing queued)
  66  input file not found or unreadable (nothing queued)
  70  internal error (RELAY_DEBUG=1 shows the traceback)
  75  spool unavailable or busy, or the message is in flight: try again
  130 interrupted

environment:
  RELAY_CONFIG     configuration file used when --config is not given
  RELAY_SPOOL_URL  overrides spool.url from any source
  XDG_STATE_HOME   the default SQLite spool is $XDG_STATE_HOME/relay/spool.db
                   (~/.local/state/relay/spool.db)

JSON output: times are ISO-8601 UTC ("2026-05-01T12:00:00.000Z"), sizes are
bytes, and the null sender is "" (shown as <> in human output).
"""


class ParagraphHelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description; keeps preformatted blocks (the epilog) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if "\n" in paragraph.strip("\n"):
                paragraphs.append(paragraph.strip("\n"))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


def _add_verb(verbs: argparse._SubParsersAction, name: str, common: argparse.ArgumentParser,
              summary: str, description: str, func: Callable[..., int]) -> argparse.ArgumentParser:
    parser = verbs.add_parser(name, parents=[common], help=summary, description=description,
                              formatter_class=ParagraphHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``relayctl`` argument parser (separate from :func:`main` for docs and tests)."""
    # Global flags go in a parent shared by every parser, with SUPPRESS defaults
    # so that a flag given before the verb is not reset by the verb's parser.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="read this TOML configuration file (default: $RELAY_CONFIG, "
                             "else built-in defaults)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print machine-readable JSON instead of text")

    parser = CommandLineParser(
        prog=PROG, parents=[common], formatter_class=ParagraphHelpFormatter,
        description="Queue mail for relayd and inspect or administer the relay spool.",
        epilog=EXIT_STATUS)
    parser.add_argument("--version", action="version", version=f"{PROG} {relay_package.__version__}")
    verbs = parser.add_subparsers(title="commands", dest="verb", metavar="COMMAND", required=True)

    p = _add_verb(
        verbs, "enqueue", common, "queue RFC 5322 messages from files, stdin or an mbox",
        "Queue RFC 5322 message(s) and print each new queue id on its own line, in input "
        "order.\n\n"
        "Without FILE (or with -) the message is read from standard input. Several FILEs "
        "are all read and validated first and then queued in one transaction: either every "
        "message is queued or none is. Line endings become CRLF; a line over 998 octets or "
        "an invalid address refuses the whole input (exit 65), nothing is repaired.\n\n"
        "Without --to, recipients come from the To, Cc and Bcc headers (like sendmail -t) "
        "and Bcc is removed from the stored message; without --from, the sender comes from "
        "the From header. With --json the ids are printed as one JSON array.",
        cmd_enqueue)
    p.add_argument("--from", dest="sender", metavar="ADDR",
                   help="envelope sender; '<>' is the null sender (default: the From header)")
    p.add_argument("--to", action="append", metavar="ADDR",
                   help="envelope recipient; repeat for several (default: To/Cc/Bcc headers)")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="queue the message only once: a repeated KEY prints the first message's "
                        "id and queues nothing new; takes exactly one input (one FILE or stdin), "
                        "a usage error (64) with several FILEs or --mbox")
    p.add_argument("--mbox", metavar="FILE",
                   help="queue every message of this mbox file (one id per message, one "
                        "transaction); --from and --to apply to each message")
    p.add_argument("files", nargs="*", metavar="FILE", help="message file, or - for standard input")

    p = _add_verb(
        verbs, "status", common, "show queue counts, ages and the busiest domains",
        "Show the spool URL (without its password), the number of messages, the number of "
        "recipients in each state, the age of the oldest pending recipient, the next retry "
        "time and the busiest destination domains.",
        cmd_status)
    p.add_argument("--watch", action="store_true",
                   help="redraw every second until interrupted (Ctrl-C); with --json, print one "
                        "object per line every second")

    p = _add_verb(
        verbs, "list", common, "list queued messages, like mailq",
        "List the queue, one message per entry like mailq: queue id, size, arrival time "
        "and sender, then each recipient with its state and last reply. Without --state, "
        "messages with a recipient still pending or held are listed.",
        cmd_list)
    p.add_argument("--state", choices=STATES, metavar="STATE",
                   help=f"only messages with a recipient in this state ({', '.join(STATES)})")
    p.add_argument("--domain", metavar="DOMAIN",
                   help="only messages with a recipient at this destination domain")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="list at most N messages, oldest first")

    p = _add_verb(
        verbs, "show", common, "show one message and every recipient's history",
        "Show one message: envelope sender, size, arrival time, Subject and Message-ID, "
        "then every recipient with its state, attempts, next attempt, last reply and full "
        "attempt history. An unknown ID exits 1.",
        cmd_show)
    p.add_argument("id", metavar="ID", help="queue id, as printed by enqueue or list")

    p = _add_verb(
        verbs, "retry", common, "make deferred recipients due now (postqueue -f / -s)",
        "Make queued and deferred recipients due now, like postqueue -i / -s / -f, and print "
        "how many were made due. Give exactly one of ID, --domain or --all.",
        cmd_retry)
    p.add_argument("id", nargs="?", metavar="ID", help="only the recipients of this message")
    p.add_argument("--domain", metavar="DOMAIN", help="only recipients at this destination domain")
    p.add_argument("--all", action="store_true", help="every queued and deferred recipient")

    p = _add_verb(
        verbs, "hold", common, "keep a message out of delivery",
        "Keep a message's pending recipients out of delivery until `relayctl release`. "
        "A message being delivered right now cannot be held (exit 75: try again).",
        cmd_hold)
    p.add_argument("id", metavar="ID", help="queue id")

    p = _add_verb(
        verbs, "release", common, "put a held message back into delivery",
        "Put a held message's recipients back into delivery, due now.",
        cmd_release)
    p.add_argument("id", metavar="ID", help="queue id")

    p = _add_verb(
        verbs, "delete", common, "remove a message that is not in flight",
        "Remove a message and its recipients from the spool without delivering or bouncing "
        "it. A message being delivered right now cannot be deleted (exit 75: try again).",
        cmd_delete)
    p.add_argument("id", metavar="ID", help="queue id")

    p = _add_verb(
        verbs, "purge", common, "remove finished messages older than a duration",
        "Remove messages whose every recipient is delivered or bounced and that were queued "
        "longer ago than DURATION; print how many were removed.",
        cmd_purge)
    p.add_argument("--older-than", required=True, metavar="DURATION",
                   help='seconds, or a number with a unit: "30s", "5m", "4h", "5d"')

    p = verbs.add_parser("db", parents=[common], help="spool database maintenance",
                         description="Spool database maintenance.")
    db_verbs = p.add_subparsers(title="actions", dest="db_verb", metavar="ACTION", required=True)
    _add_verb(db_verbs, "upgrade", common, "bring the spool schema to the newest revision",
              "Bring the spool schema to the newest Alembic revision (creating it in an "
              "empty database) and say what was done.",
              cmd_db_upgrade)
    return parser


# -- the error boundary ---------------------------------------------------------


def _error(sentence: str) -> None:
    print(f"{PROG}: {' '.join(sentence.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``relayctl`` command; return its exit status."""
    out = Output()
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:          # --help and --version
            return e.code if isinstance(e.code, int) else EX_OK
        args.json = getattr(args, "json", False)
        config = load_config(getattr(args, "config", None))
        relay = LazyRelay(config)
        try:
            status = args.func(relay, args, out)
        finally:
            relay.close()
        out.flush()
        return status
    except RelayError as e:
        out.discard()
        _error(str(e))
        return e.exit_code
    except StdoutClosed:
        _silence_stdout()
        return EX_BROKEN_PIPE
    except KeyboardInterrupt:
        out.discard()
        return EX_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the boundary: one sentence, not a traceback
        out.discard()
        if os.environ.get("RELAY_DEBUG") == "1":
            traceback.print_exc()
        detail = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else ""
        _error(f"Unexpected internal error ({type(e).__name__}{': ' + detail if detail else ''}); "
               f"run with RELAY_DEBUG=1 for the traceback.")
        return EX_SOFTWARE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
