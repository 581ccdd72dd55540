"""In-process tests of relayctl (relay.cli.main): output formats, exit codes, all-or-nothing enqueue.

Every test that touches a spool runs on SQLite and on PostgreSQL (the
``spool_url`` fixture).  Each test checks stdout, stderr and the exit status,
and, for refused input, that nothing reached the spool.
"""

from __future__ import annotations

import io
import json
import mailbox
import re
import sqlite3
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

import relay
from relay import api, cli
from relay.config import load_config
from relay.model import Outcome, State

REPO = Path(__file__).resolve().parents[2]
QUEUE_ID = re.compile(r"^[0-9A-F]{20}$")
NODE = "test-node"

SAMPLE = (b"From: Alice <alice@example.com>\n"
          b"To: Bob <bob@example.org>\n"
          b"Cc: carol@example.net\n"
          b"Bcc: dave@example.org,\n"
          b"  erin@example.org\n"
          b"Subject: Quarterly report\n"
          b"Message-ID: <report-1@example.com>\n"
          b"\n"
          b"Numbers attached.\n")

STATUS_KEYS = {"spool", "messages", "recipients", "oldest_pending_age_s", "next_attempt_at", "domains"}
SHOW_KEYS = {"id", "sender", "size", "created_at", "subject", "message_id", "recipients"}
SHOW_RECIPIENT_KEYS = {"address", "domain", "state", "attempts", "next_attempt_at", "last_code",
                       "last_response", "history"}
LIST_KEYS = {"id", "sender", "created_at", "size", "recipients"}


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def relayctl(capsys, monkeypatch):
    """Call ``relay.cli.main`` with argv (and optional stdin bytes); return code, stdout, stderr."""
    def run(*argv: str, stdin: bytes = b"") -> Run:
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)
    return run


@pytest.fixture
def url(spool_url, monkeypatch):
    """A fresh spool on each dialect, named by $RELAY_SPOOL_URL as an operator would."""
    monkeypatch.setenv("RELAY_SPOOL_URL", spool_url)
    return spool_url


def open_relay(spool_url: str) -> api.Relay:
    return api.open(load_config(None, environ={}), spool_url=spool_url)


def message_count(spool_url: str) -> int:
    with open_relay(spool_url) as r:
        return r.status().messages


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def message(subject: str = "Hello", to: str = "bob@example.org", sender: str = "alice@example.com") -> bytes:
    return f"From: {sender}\nTo: {to}\nSubject: {subject}\n\nBody of {subject}.\n".encode()


def enqueue(relayctl, tmp_path, data: bytes = SAMPLE, *flags: str) -> str:
    result = relayctl("enqueue", *flags, write(tmp_path / f"m{time.monotonic_ns()}.eml", data))
    assert result.code == 0, result.err
    return result.out.strip()


def assert_failed(result: Run, code: int) -> None:
    """The exit status is ``code``, stdout is empty and stderr is one relayctl sentence."""
    assert result.code == code, (result.code, result.err)
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("relayctl: "), result.err
    assert "Traceback" not in result.err


def defer_all(spool_url: str, *, response: str = "4.3.0 try later", host: str = "mx.example.org",
              next_in: float = 3600.0) -> int:
    """Claim every due recipient and record a 451 deferral for it, as relayd would."""
    with open_relay(spool_url) as r:
        now = time.time()
        claimed = r.spool.claim(NODE, now, 600, 1000)
        outcomes = [Outcome(rc.id, State.DEFERRED, code=451, response=response, host=host,
                            next_attempt_at=now + next_in)
                    for m in claimed for rc in m.recipients]
        r.spool.record(NODE, now, outcomes)
        return len(outcomes)


def deliver_all(spool_url: str) -> None:
    """Claim every due recipient and record it delivered."""
    with open_relay(spool_url) as r:
        now = time.time()
        claimed = r.spool.claim(NODE, now, 600, 1000)
        r.spool.record(NODE, now, [Outcome(rc.id, State.DELIVERED, code=250, response="2.0.0 ok",
                                           host="mx.example.org")
                                   for m in claimed for rc in m.recipients])


# -- enqueue -------------------------------------------------------------------


def test_enqueue_file_prints_the_new_id(relayctl, url, tmp_path):
    """enqueue FILE prints one queue id and the message is in the spool."""
    result = relayctl("enqueue", write(tmp_path / "m.eml", SAMPLE))
    assert result.code == 0 and result.err == ""
    assert QUEUE_ID.match(result.out.strip()) and result.out.count("\n") == 1
    assert message_count(url) == 1


@pytest.mark.parametrize("argv", [[], ["-"]], ids=["no-file", "dash"])
def test_enqueue_reads_stdin(relayctl, url, argv):
    """Without FILE, or with -, enqueue reads the message from standard input."""
    result = relayctl("enqueue", *argv, stdin=SAMPLE)
    assert result.code == 0, result.err
    qid = result.out.strip()
    assert relayctl("show", "--json", qid).json()["subject"] == "Quarterly report"


def test_enqueue_takes_recipients_from_headers_and_strips_bcc(relayctl, url, tmp_path):
    """Without --to, To/Cc/Bcc are the recipients (sendmail -t) and Bcc is gone from the stored data."""
    qid = enqueue(relayctl, tmp_path)
    shown = relayctl("show", qid, "--json").json()
    assert [r["address"] for r in shown["recipients"]] == [
        "bob@example.org", "carol@example.net", "dave@example.org", "erin@example.org"]
    assert shown["sender"] == "alice@example.com"
    with open_relay(url) as r:
        data = r.show(qid, include_data=True).data
    assert b"Bcc" not in data and b"dave@" not in data and b"erin@" not in data
    assert b"To: Bob <bob@example.org>\r\nCc: carol@example.net\r\n" in data


def test_enqueue_flags_replace_the_header_envelope(relayctl, url, tmp_path):
    """--from and repeated --to replace the header sender and recipients."""
    qid = enqueue(relayctl, tmp_path, SAMPLE, "--from", "bounces@example.com",
                  "--to", "x@example.io", "--to", "y@example.io")
    shown = relayctl("--json", "show", qid).json()
    assert shown["sender"] == "bounces@example.com"
    assert [r["address"] for r in shown["recipients"]] == ["x@example.io", "y@example.io"]


def test_enqueue_null_sender(relayctl, url, tmp_path):
    """--from '<>' queues with the null sender: "" in JSON, <> in human output."""
    qid = enqueue(relayctl, tmp_path, SAMPLE, "--from", "<>")
    assert relayctl("show", qid, "--json").json()["sender"] == ""
    assert relayctl("list", "--json").json()[0]["sender"] == ""
    assert re.search(r"^Sender:\s+<>$", relayctl("show", qid).out, re.M)
    assert f"{qid} " in relayctl("list").out and " <>\n" in relayctl("list").out


def test_idempotency_key_returns_the_first_id(relayctl, url, tmp_path):
    """A repeated --idempotency-key prints the first id and queues nothing new."""
    first = enqueue(relayctl, tmp_path, SAMPLE, "--idempotency-key", "order-42")
    again = relayctl("enqueue", "--idempotency-key", "order-42", stdin=message("other"))
    assert again.code == 0 and again.out.strip() == first
    assert relayctl("status", "--json").json()["messages"] == 1


def test_several_files_queue_in_input_order(relayctl, url, tmp_path):
    """Several FILEs print one id per line in input order."""
    files = [write(tmp_path / f"{n}.eml", message(f"number {n}")) for n in range(3)]
    result = relayctl("enqueue", *files)
    assert result.code == 0, result.err
    ids = result.out.splitlines()
    assert len(ids) == 3 and len(set(ids)) == 3
    assert [relayctl("show", "--json", i).json()["subject"] for i in ids] == [
        "number 0", "number 1", "number 2"]


def test_enqueue_json_prints_an_array_of_ids(relayctl, url, tmp_path):
    """enqueue --json prints the new ids as one JSON array."""
    files = [write(tmp_path / f"{n}.eml", message(f"n{n}")) for n in range(2)]
    ids = relayctl("--json", "enqueue", *files).json()
    assert isinstance(ids, list) and len(ids) == 2 and all(QUEUE_ID.match(i) for i in ids)


def test_idempotency_key_with_several_inputs_is_a_usage_error(relayctl, url, tmp_path):
    """--idempotency-key names one message, so two FILEs are refused with 64 and nothing queued."""
    files = [write(tmp_path / f"{n}.eml", message()) for n in range(2)]
    assert_failed(relayctl("enqueue", "--idempotency-key", "k", *files), 64)
    assert message_count(url) == 0


def test_one_bad_file_queues_none_of_them(relayctl, url, tmp_path):
    """When the second of three files is bad, enqueue exits 65 and queues none."""
    good = write(tmp_path / "good.eml", message())
    bad = write(tmp_path / "bad.eml", message(to="not an address"))
    result = relayctl("enqueue", good, bad, good)
    assert_failed(result, 65)
    assert "bad.eml" in result.err
    assert message_count(url) == 0


def test_missing_file_queues_nothing(relayctl, url, tmp_path):
    """A missing input file exits 66 and the good files before it are not queued."""
    good = write(tmp_path / "good.eml", message())
    result = relayctl("enqueue", good, str(tmp_path / "missing.eml"))
    assert_failed(result, 66)
    assert "missing.eml" in result.err
    assert message_count(url) == 0


@pytest.mark.parametrize("data", [
    message(to="bob@@example.org"),                        # malformed To
    message(sender="alice at example.com"),                # malformed From
    b"From: alice@example.com\nTo: <bob@example.org\n\nx\n",  # unterminated angle bracket
    b"From: alice@example.com\nTo: bob@example.org<eve@example.net>\n\nx\n",  # not split into two
], ids=["to", "from", "unterminated-angle", "glued-addresses"])
def test_malformed_header_address_exits_65(relayctl, url, tmp_path, data):
    """A malformed address in the headers exits 65 and queues nothing."""
    assert_failed(relayctl("enqueue", write(tmp_path / "m.eml", data)), 65)
    assert message_count(url) == 0


BAD_ADDRESSES = [
    "bob\r@example.org",                                # CR
    "bob\n@example.org",                                # LF
    "bob@example.org\r\nRCPT TO:<eve@example.net>",    # a smuggled SMTP command
    "bob\x00@example.org",                              # NUL
    "bob smith@example.org",                            # space
    "<bob>@example.org",                                # angle brackets inside
    "bob@exa<mple.org",                                 # < in the domain
    "bob@example.org>",                                 # unbalanced >
    "bob",                                              # no domain
    "@example.org",                                     # no local part
]


@pytest.mark.parametrize("flag", ["--to", "--from"])
def test_bad_envelope_address_exits_65(relayctl, url, tmp_path, flag):
    """An address with CR, LF, NUL, space or <> inside (or no valid syntax) exits 65, never repaired."""
    good = write(tmp_path / "m.eml", message())
    for address in BAD_ADDRESSES:
        result = relayctl("enqueue", flag, address, good)
        assert result.code == 65 and result.out == "", address
        assert len(result.err.splitlines()) == 1, address
    assert message_count(url) == 0


def test_no_recipient_exits_65(relayctl, url, tmp_path):
    """A message without --to and without To/Cc/Bcc exits 65."""
    data = b"From: alice@example.com\nSubject: nobody\n\nx\n"
    result = relayctl("enqueue", write(tmp_path / "m.eml", data))
    assert_failed(result, 65)
    assert "recipient" in result.err
    assert message_count(url) == 0


def test_line_over_998_octets_exits_65(relayctl, url, tmp_path):
    """A 999-octet line is refused with 65; a 998-octet line is accepted."""
    head = b"From: alice@example.com\nTo: bob@example.org\n\n"
    assert_failed(relayctl("enqueue", write(tmp_path / "long.eml", head + b"x" * 999 + b"\n")), 65)
    assert message_count(url) == 0
    assert relayctl("enqueue", write(tmp_path / "ok.eml", head + b"x" * 998 + b"\n")).code == 0
    assert message_count(url) == 1


def test_empty_stdin_exits_65(relayctl, url):
    """An empty message on stdin exits 65."""
    assert_failed(relayctl("enqueue", stdin=b""), 65)
    assert message_count(url) == 0


def make_mbox(path: Path, messages: list[bytes]) -> str:
    box = mailbox.mbox(str(path))
    for data in messages:
        box.add(data)
    box.flush()
    box.close()
    return str(path)


def test_enqueue_mbox_queues_every_message(relayctl, url, tmp_path):
    """enqueue --mbox prints one id per message, in order, and --to applies to each."""
    box = make_mbox(tmp_path / "box", [message(f"m{n}") for n in range(3)])
    result = relayctl("enqueue", "--mbox", box, "--to", "ops@example.net")
    assert result.code == 0, result.err
    ids = result.out.splitlines()
    assert len(ids) == 3
    shown = [relayctl("show", "--json", i).json() for i in ids]
    assert [s["subject"] for s in shown] == ["m0", "m1", "m2"]
    assert all([r["address"] for r in s["recipients"]] == ["ops@example.net"] for s in shown)


def test_enqueue_mbox_with_a_bad_message_queues_nothing(relayctl, url, tmp_path):
    """One bad message in an mbox exits 65 and queues none of them."""
    box = make_mbox(tmp_path / "box", [message("a"), message("b", to="bad address"), message("c")])
    result = relayctl("enqueue", "--mbox", box)
    assert_failed(result, 65)
    assert "message 2" in result.err
    assert message_count(url) == 0


def test_enqueue_mbox_that_is_not_an_mbox_exits_65(relayctl, url, tmp_path):
    """A non-empty file without a single "From " line is not an mbox: 65; an empty mbox queues nothing."""
    assert_failed(relayctl("enqueue", "--mbox", write(tmp_path / "m.eml", message())), 65)
    empty = relayctl("enqueue", "--mbox", write(tmp_path / "empty", b""))
    assert (empty.code, empty.out, empty.err) == (0, "", "")
    assert message_count(url) == 0


def test_enqueue_mbox_missing_exits_66(relayctl, url, tmp_path):
    """A missing mbox exits 66."""
    assert_failed(relayctl("enqueue", "--mbox", str(tmp_path / "nope")), 66)
    assert message_count(url) == 0


@pytest.mark.parametrize("extra", [["--idempotency-key", "k"], ["other.eml"]], ids=["key", "files"])
def test_enqueue_mbox_refuses_conflicting_flags(relayctl, url, tmp_path, extra):
    """--mbox with --idempotency-key or with FILEs is a usage error (64)."""
    box = make_mbox(tmp_path / "box", [message()])
    assert_failed(relayctl("enqueue", "--mbox", box, *extra), 64)
    assert message_count(url) == 0


# -- unknown ids, unavailable spools ---------------------------------------------


@pytest.mark.parametrize("argv", [["show"], ["retry"], ["hold"], ["release"], ["delete"]])
def test_unknown_id_exits_1(relayctl, url, argv):
    """Every verb that takes an id exits 1 for an unknown one."""
    result = relayctl(*argv, "0000000000000NOSUCH")
    assert_failed(result, 1)
    assert "0000000000000NOSUCH" in result.err


def test_locked_sqlite_spool_exits_75(relayctl, sqlite_url, tmp_path):
    """A SQLite spool locked by another process exits 75 after spool.busy_timeout, writing nothing."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\nurl = "{sqlite_url}"\nbusy_timeout = "0.2s"\n')
    enqueue(relayctl, tmp_path, SAMPLE, "--config", str(config))
    locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        result = relayctl("--config", str(config), "enqueue", stdin=message())
        assert time.monotonic() - started < 3
        assert_failed(result, 75)
        assert "locked" in result.err
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert message_count(sqlite_url) == 1


def test_sqlite_spool_short_of_space_exits_75(relayctl, sqlite_url, tmp_path):
    """Below spool.min_free_space enqueue exits 75 with the "full" sentence and queues nothing;
    status and the other verbs go on working."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\nurl = "{sqlite_url}"\nmin_free_space = {10 ** 18}\n')
    result = relayctl("--config", str(config), "enqueue", stdin=message())
    assert_failed(result, 75)
    assert "is full:" in result.err and "spool.min_free_space" in result.err
    assert relayctl("--config", str(config), "status").code == 0
    assert message_count(sqlite_url) == 0


def test_unreachable_postgresql_exits_75(relayctl, monkeypatch, tmp_path):
    """A PostgreSQL spool that refuses connections exits 75 without showing the password."""
    monkeypatch.setenv("RELAY_SPOOL_URL", "postgresql+psycopg://relay:hunter2@127.0.0.1:1/relay")
    result = relayctl("enqueue", write(tmp_path / "m.eml", message()))
    assert_failed(result, 75)
    assert "hunter2" not in result.err and "127.0.0.1:1" in result.err
    assert_failed(relayctl("status"), 75)


def test_unknown_spool_driver_is_a_usage_error(relayctl, monkeypatch):
    """A spool URL naming a driver SQLAlchemy does not have exits 64, not 70."""
    monkeypatch.setenv("RELAY_SPOOL_URL", "postgresql+nosuchdriver://relay@localhost/relay")
    assert_failed(relayctl("status"), 64)


# -- status ----------------------------------------------------------------------


def test_status_json_on_an_empty_spool(relayctl, url):
    """status --json on an empty spool has every SPEC key, zero counts and nulls."""
    report = relayctl("status", "--json").json()
    assert set(report) == STATUS_KEYS
    assert report["messages"] == 0
    assert report["recipients"] == {s.value: 0 for s in State}
    assert report["oldest_pending_age_s"] is None and report["next_attempt_at"] is None
    assert report["domains"] == []


def test_status_json_shape(relayctl, url, tmp_path):
    """status --json counts messages, recipients per state and domains, with typed ages and times."""
    enqueue(relayctl, tmp_path)                       # 4 recipients: 3 at example.org, 1 at example.net
    defer_all(url)
    enqueue(relayctl, tmp_path, message(to="zoe@example.org"))
    report = relayctl("status", "--json").json()
    assert set(report) == STATUS_KEYS
    assert report["spool"] == url
    assert report["messages"] == 2
    assert report["recipients"] == {"queued": 1, "deferred": 4, "inflight": 0, "delivered": 0,
                                    "bounced": 0, "held": 0}
    assert isinstance(report["oldest_pending_age_s"], float) and report["oldest_pending_age_s"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", report["next_attempt_at"])
    assert report["domains"] == [
        {"domain": "example.org", "queued": 1, "deferred": 3, "inflight": 0},
        {"domain": "example.net", "queued": 0, "deferred": 1, "inflight": 0},
    ]


def test_status_human(relayctl, url, tmp_path):
    """status prints the spool URL, counts per state, oldest age, next retry and busiest domains."""
    enqueue(relayctl, tmp_path)
    defer_all(url)
    result = relayctl("status")
    assert result.code == 0 and result.err == ""
    assert f"Spool            {url}\n" in result.out
    assert "Messages         1\n" in result.out
    assert "queued 0  deferred 4  inflight 0  delivered 0  bounced 0  held 0" in result.out
    assert re.search(r"Oldest pending   \d+s ago", result.out)
    assert re.search(r"Next retry       \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in 59m \d+s\)", result.out)
    assert re.search(r"^  example\.org\s+0\s+3\s+0$", result.out, re.M)


def test_status_hides_the_spool_password(relayctl, pg_url, monkeypatch):
    """status shows the PostgreSQL URL with its password replaced by ***."""
    url = pg_url.replace("postgres@", "postgres:hunter2@", 1)
    monkeypatch.setenv("RELAY_SPOOL_URL", url)
    report = relayctl("status", "--json").json()
    assert "hunter2" not in report["spool"] and "postgres:***@127.0.0.1" in report["spool"]
    assert "hunter2" not in relayctl("status").out


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_status_watch_redraws_until_interrupted(relayctl, url, monkeypatch, json_flag):
    """status --watch prints a frame per second and exits 0 on Ctrl-C."""
    naps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(cli, "sleep", fake_sleep)
    result = relayctl("status", "--watch", *json_flag)
    assert result.code == 0 and result.err == ""
    assert naps == [1.0, 1.0, 1.0]
    if json_flag:
        frames = [json.loads(line) for line in result.out.splitlines()]
        assert len(frames) == 3 and all(set(f) == STATUS_KEYS for f in frames)
    else:
        assert result.out.count("Spool            ") == 3


# -- list and show ---------------------------------------------------------------


def test_show_json_shape_before_any_attempt(relayctl, url, tmp_path):
    """show --json has exactly SPEC's keys; a recipient not tried yet has attempts 0 and history []."""
    qid = enqueue(relayctl, tmp_path)
    shown = relayctl("show", qid, "--json").json()
    assert set(shown) == SHOW_KEYS
    assert shown["id"] == qid and shown["subject"] == "Quarterly report"
    assert shown["message_id"] == "<report-1@example.com>"
    assert isinstance(shown["size"], int) and shown["size"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", shown["created_at"])
    first = shown["recipients"][0]
    assert set(first) == SHOW_RECIPIENT_KEYS
    assert first == {"address": "bob@example.org", "domain": "example.org", "state": "queued",
                     "attempts": 0, "next_attempt_at": first["next_attempt_at"], "last_code": None,
                     "last_response": None, "history": []}


def test_show_json_after_a_deferral(relayctl, url, tmp_path):
    """After a 451, show --json gives attempts, next attempt, last reply and a history entry."""
    qid = enqueue(relayctl, tmp_path, message())
    defer_all(url, response="4.3.0 try later", host="mx1.example.org")
    rcpt = relayctl("show", qid, "--json").json()["recipients"][0]
    assert rcpt["state"] == "deferred" and rcpt["attempts"] == 1
    assert rcpt["last_code"] == 451 and rcpt["last_response"] == "4.3.0 try later"
    assert rcpt["next_attempt_at"].endswith("Z")
    assert len(rcpt["history"]) == 1
    entry = rcpt["history"][0]
    assert set(entry) == {"at", "host", "code", "response"}
    assert (entry["host"], entry["code"], entry["response"]) == ("mx1.example.org", 451, "4.3.0 try later")


def test_show_human(relayctl, url, tmp_path):
    """show prints the envelope, subject, message-id and every recipient with its history."""
    qid = enqueue(relayctl, tmp_path, SAMPLE)
    defer_all(url, response="4.2.2 mailbox full\x1b[2J", host="mx1.example.org")
    out = relayctl("show", qid).out
    assert f"Queue ID:     {qid}\n" in out
    assert "Sender:       alice@example.com\n" in out
    assert "Subject:      Quarterly report\n" in out
    assert "Message-ID:   <report-1@example.com>\n" in out
    assert "    State:         deferred\n    Attempts:      1\n" in out
    assert "Last reply:    451 4.2.2 mailbox full\\x1b[2J" in out     # no terminal escapes
    assert "\x1b" not in out
    assert re.search(r"^      \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  mx1\.example\.org  451 4\.2\.2", out, re.M)


def test_list_json_filters(relayctl, url, tmp_path):
    """list --json has SPEC's keys and filters by --state, --domain and --limit."""
    first = enqueue(relayctl, tmp_path, message("one", to="a@one.example"))
    second = enqueue(relayctl, tmp_path, message("two", to="b@two.example"))
    third = enqueue(relayctl, tmp_path, message("three", to="c@two.example"))
    assert relayctl("hold", third).code == 0
    everything = relayctl("list", "--json").json()
    assert [m["id"] for m in everything] == [first, second, third]
    assert all(set(m) == LIST_KEYS for m in everything)
    assert everything[0]["recipients"] == [{"address": "a@one.example", "state": "queued"}]
    assert isinstance(everything[0]["size"], int) and everything[0]["created_at"].endswith("Z")
    assert [m["id"] for m in relayctl("list", "--json", "--state", "held").json()] == [third]
    assert [m["id"] for m in relayctl("list", "--json", "--domain", "two.example").json()] == [second, third]
    assert [m["id"] for m in relayctl("list", "--json", "--limit", "2").json()] == [first, second]
    assert relayctl("list", "--json", "--state", "delivered").json() == []


def test_list_human(relayctl, url, tmp_path):
    """list prints mailq-like entries: id, size, time, sender, then recipients with state and reason."""
    assert relayctl("list").out == "Mail queue is empty.\n"
    qid = enqueue(relayctl, tmp_path, message(to="bob@example.org"))
    defer_all(url)
    out = relayctl("list").out
    assert re.search(rf"^{qid}\s+\d+ \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC alice@example\.com$", out, re.M)
    assert re.search(r"^\s+bob@example\.org \(deferred: 451 4\.3\.0 try later\)$", out, re.M)
    assert out.endswith("-- 1 message, 1 recipient.\n")
    assert relayctl("list", "--state", "bounced").out == "No message matches.\n"


@pytest.mark.parametrize("argv", [["list", "--state", "lost"], ["list", "--limit", "0"],
                                  ["list", "--limit", "many"]])
def test_list_bad_filters_exit_64(relayctl, url, argv):
    """An unknown state or a limit that is not a positive number exits 64."""
    assert_failed(relayctl(*argv), 64)


# -- administration ---------------------------------------------------------------


def test_retry_counts_what_it_made_due(relayctl, url, tmp_path):
    """retry ID / --domain / --all make queued and deferred recipients due and print how many."""
    a = enqueue(relayctl, tmp_path, message("a", to="x@one.example, y@two.example"))
    b = enqueue(relayctl, tmp_path, message("b", to="z@two.example"))
    assert defer_all(url) == 3
    assert relayctl("retry", a, "--json").json() == {"retried": 2}
    assert relayctl("--json", "retry", "--domain", "two.example").json() == {"retried": 2}
    assert relayctl("retry", "--all").out == "3 recipients made due now.\n"
    now = time.time()
    for qid in (a, b):
        for r in relayctl("show", "--json", qid).json()["recipients"]:
            due = cli.datetime.fromisoformat(r["next_attempt_at"].replace("Z", "+00:00")).timestamp()
            assert due <= now


@pytest.mark.parametrize("argv", [["retry"], ["retry", "X", "--all"], ["retry", "--all", "--domain", "d"]],
                         ids=["none", "id-and-all", "all-and-domain"])
def test_retry_needs_exactly_one_selector(relayctl, url, argv):
    """retry without a selector, or with two, exits 64."""
    assert_failed(relayctl(*argv), 64)


def test_hold_and_release(relayctl, url, tmp_path):
    """hold keeps a message's recipients out of delivery; release puts them back, with counts."""
    qid = enqueue(relayctl, tmp_path)
    result = relayctl("hold", qid)
    assert result.out == f"Message {qid}: 4 recipients held.\n"
    assert {r["state"] for r in relayctl("show", "--json", qid).json()["recipients"]} == {"held"}
    assert relayctl("status", "--json").json()["recipients"]["held"] == 4
    assert relayctl("release", qid, "--json").json() == {"id": qid, "released": 4}
    assert {r["state"] for r in relayctl("show", "--json", qid).json()["recipients"]} == {"queued"}
    assert relayctl("--json", "hold", qid).json() == {"id": qid, "held": 4}


def test_delete_removes_the_message(relayctl, url, tmp_path):
    """delete removes a message; show then exits 1."""
    keep = enqueue(relayctl, tmp_path, message("keep"))
    gone = enqueue(relayctl, tmp_path, message("gone"))
    assert relayctl("delete", gone).out == f"Message {gone} deleted.\n"
    assert_failed(relayctl("show", gone), 1)
    assert [m["id"] for m in relayctl("list", "--json").json()] == [keep]
    assert relayctl("--json", "delete", keep).json() == {"id": keep, "deleted": True}


@pytest.mark.parametrize("verb", ["delete", "hold"])
def test_message_in_flight_exits_75(relayctl, url, tmp_path, verb):
    """delete or hold of a message claimed by a relayd exits 75 and changes nothing."""
    qid = enqueue(relayctl, tmp_path, message())
    with open_relay(url) as r:
        assert r.spool.claim(NODE, time.time(), 600, 10)
    result = relayctl(verb, qid)
    assert_failed(result, 75)
    assert "try again" in result.err
    assert relayctl("show", "--json", qid).json()["recipients"][0]["state"] == "inflight"


def test_purge_removes_only_finished_old_messages(relayctl, url, tmp_path):
    """purge --older-than removes delivered messages older than that and prints the count."""
    enqueue(relayctl, tmp_path, message("done"))
    deliver_all(url)
    pending = enqueue(relayctl, tmp_path, message("pending"))
    assert relayctl("purge", "--older-than", "1d").out == "0 messages purged.\n"
    assert relayctl("purge", "--older-than", "0s", "--json").json() == {"purged": 1}
    assert relayctl("status", "--json").json()["messages"] == 1
    assert relayctl("show", "--json", pending).json()["subject"] == "pending"


@pytest.mark.parametrize("argv", [
    ["frobnicate"],                                   # unknown verb
    [],                                               # no verb
    ["retry"],                                        # no selector
    ["list", "--state", "bogus"],                     # bad state
    ["purge", "--older-than", "soon"],                # bad duration
    ["purge", "--older-than", "-5m"],                 # negative duration
    ["purge"],                                        # missing --older-than
    ["show"],                                         # missing ID
    ["db"],                                           # missing action
    ["status", "--bogus"],                            # unknown flag
], ids=["unknown-verb", "no-verb", "retry-no-selector", "bad-state", "bad-duration", "negative-duration",
        "purge-no-duration", "show-no-id", "db-no-action", "unknown-flag"])
def test_usage_errors_exit_64(relayctl, url, argv):
    """Bad command lines exit 64 with one sentence on stderr and nothing on stdout."""
    result = relayctl(*argv)
    assert_failed(result, 64)
    assert message_count(url) == 0


def test_unknown_config_key_exits_64(relayctl, tmp_path):
    """A configuration file with an unknown key exits 64 naming the key."""
    config = tmp_path / "relay.toml"
    config.write_text("[delivery]\nconcurency = 5\n")
    result = relayctl("--config", str(config), "status")
    assert_failed(result, 64)
    assert "delivery.concurency" in result.err


def test_missing_config_file_exits_64(relayctl, tmp_path, monkeypatch):
    """--config naming a missing file, or such a $RELAY_CONFIG, exits 64."""
    assert_failed(relayctl("status", "--config", str(tmp_path / "nope.toml")), 64)
    monkeypatch.setenv("RELAY_CONFIG", str(tmp_path / "nope.toml"))
    assert_failed(relayctl("status"), 64)


def test_config_file_sets_the_spool(relayctl, spool_url, tmp_path):
    """--config given after the verb selects the spool named in the file."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\nurl = "{spool_url}"\n')
    qid = relayctl("enqueue", "--config", str(config), stdin=message()).out.strip()
    assert relayctl("show", qid, "--config", str(config), "--json").json()["id"] == qid
    assert message_count(spool_url) == 1


DATA_VERBS = [
    ["status"], ["list"], ["list", "--state", "held"], ["show", "ID"], ["retry", "--all"], ["retry", "ID"],
    ["hold", "ID"], ["release", "ID"], ["purge", "--older-than", "1d"], ["db", "upgrade"], ["delete", "ID"],
]


def test_json_on_every_data_verb(relayctl, url, tmp_path):
    """--json, before or after the verb, makes every data verb print one valid JSON value."""
    qid = enqueue(relayctl, tmp_path, message())
    for n, verb in enumerate(DATA_VERBS):
        argv = [qid if a == "ID" else a for a in verb]
        for result in (relayctl("--json", *argv), relayctl(*argv, "--json")):
            assert result.code == 0, (verb, result.err)
            assert isinstance(json.loads(result.out), (dict, list)), verb
            assert result.out.count("\n") == 1, verb
            if verb == ["delete", "ID"]:   # the second delete finds nothing to delete
                break
    assert relayctl("--json", "enqueue", stdin=message()).code == 0


# -- db upgrade, help, the error boundary ---------------------------------------------


def test_db_upgrade(relayctl, url):
    """db upgrade creates the schema of an empty spool, then reports it is already current."""
    first = relayctl("db", "upgrade")
    assert first.code == 0, first.err
    assert first.out == f"spool {url}: schema upgraded from none to 0001\n"
    assert relayctl("db", "upgrade").out == f"spool {url}: schema already at 0001\n"
    assert relayctl("db", "upgrade", "--json").json() == {"spool": url, "before": "0001",
                                                          "after": "0001", "upgraded": False}


def test_default_spool_is_created_under_xdg_state_home(relayctl, tmp_path):
    """With no configuration at all, the spool is the SQLite file $XDG_STATE_HOME/relay/spool.db."""
    spool_file = tmp_path / "state" / "relay" / "spool.db"
    assert not spool_file.exists()
    assert relayctl("enqueue", stdin=message()).code == 0
    assert spool_file.exists()
    assert relayctl("status", "--json").json()["spool"] == f"sqlite:///{spool_file}"


@pytest.mark.parametrize("verb", [[], ["enqueue"], ["status"], ["list"], ["show"], ["retry"], ["hold"],
                                  ["release"], ["delete"], ["purge"], ["db"], ["db", "upgrade"]])
def test_help_never_touches_the_spool(relayctl, monkeypatch, tmp_path, verb):
    """--help on every verb exits 0 with a description, even when the spool is unreachable."""
    monkeypatch.setenv("RELAY_SPOOL_URL", "postgresql+psycopg://relay@127.0.0.1:1/relay")
    result = relayctl(*verb, "--help")
    assert result.code == 0 and result.err == ""
    assert result.out.startswith(f"usage: relayctl {' '.join(verb)}".rstrip() + " ")
    assert "--config PATH" in result.out and "--json" in result.out
    assert not (tmp_path / "state").exists()


def test_top_level_help_lists_exit_codes(relayctl):
    """relayctl --help lists every verb and the exit codes."""
    out = relayctl("--help").out
    for verb in ("enqueue", "status", "list", "show", "retry", "hold", "release", "delete", "purge", "db"):
        assert re.search(rf"^    {verb}\s+\S", out, re.M), verb
    for code in ("64", "65", "66", "75"):
        assert re.search(rf"^  {code}\s+\S", out, re.M), code


def test_version(relayctl):
    """relayctl --version prints the package version."""
    result = relayctl("--version")
    assert result.code == 0 and result.out == f"relayctl {relay.__version__}\n"


def test_unexpected_error_is_one_sentence_exit_70(relayctl, monkeypatch):
    """An unexpected exception exits 70 with one sentence, and a traceback only with RELAY_DEBUG=1."""
    def broken(*args, **kwargs):
        raise RuntimeError("kaboom\nsecond line")
    monkeypatch.setattr(cli.api, "open", broken)
    result = relayctl("status")
    assert_failed(result, 70)
    assert "RuntimeError: kaboom" in result.err and "RELAY_DEBUG=1" in result.err
    monkeypatch.setenv("RELAY_DEBUG", "1")
    debug = relayctl("status")
    assert debug.code == 70 and "Traceback" in debug.err and debug.out == ""


def test_ctrl_c_exits_130_quietly(relayctl, monkeypatch):
    """Ctrl-C outside status --watch exits 130 with nothing on stdout or stderr."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.api, "open", interrupted)
    result = relayctl("list")
    assert (result.code, result.out, result.err) == (130, "", "")


def test_closed_stdout_exits_quietly(monkeypatch, capsys, url):
    """When the reader of stdout has gone (| head), relayctl exits 141 without an error message."""
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = cli.main(["status"])
    assert code == 141
    assert capsys.readouterr().err == ""


def test_nothing_on_stdout_when_a_command_fails_late(relayctl, url, monkeypatch):
    """A command that fails after producing output prints none of it."""
    def fail_after_output(relay_, args, out):
        out.line("partial")
        raise relay.SpoolUnavailable("The spool went away.")
    monkeypatch.setattr(cli, "cmd_status", fail_after_output)
    # The parser binds cmd_status when it is built, so build it after patching.
    result = relayctl("status")
    assert_failed(result, 75)


# -- etc/relay.toml ----------------------------------------------------------------


def test_shipped_config_loads_and_equals_the_defaults():
    """etc/relay.toml loads without error and sets every value to its built-in default."""
    shipped = load_config(REPO / "etc" / "relay.toml", environ={})
    defaults = load_config(None, environ={})
    for f in fields(shipped):
        if f.name != "source":
            assert getattr(shipped, f.name) == getattr(defaults, f.name), f.name


def test_shipped_config_documents_every_key():
    """etc/relay.toml mentions every configuration key config.py knows."""
    from relay.config import _KEYS
    text = (REPO / "etc" / "relay.toml").read_text()
    sections = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^#?\s*\[([a-z]+)(?:\.([a-z_]+))?\]\s*$", line)
        if m:
            current = m.group(1)
            sections.setdefault(current, set())
            if m.group(2):                     # a sub-table such as [submission.users]
                sections[current].add(m.group(2))
            continue
        m = re.match(r"^#?\s*([a-z_]+)\s*=", line)
        if m and current:
            sections.setdefault(current, set()).add(m.group(1))
    for key in _KEYS:
        section, name = key.split(".")
        assert name in sections.get(section, set()), key
    assert "routes" in sections


def test_shipped_config_examples_load_when_uncommented(tmp_path):
    """The commented [routes] and [submission.users] examples are valid once uncommented."""
    text = (REPO / "etc" / "relay.toml").read_text()
    text = re.sub(r'^# ("\*"|"example\.org") =', r"\1 =", text, flags=re.M)
    text = re.sub(r"^# (\[submission\.users\]|app =|billing =)", r"\1", text, flags=re.M)
    path = tmp_path / "relay.toml"
    path.write_text(text)
    config = load_config(path, environ={})
    assert config.routes["*"].host == "smtp.provider.example" and config.routes["*"].tls == "required"
    assert config.routes["example.org"].port == 25
    assert set(config.submission_users) == {"app", "billing"}
