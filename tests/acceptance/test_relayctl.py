"""relayctl as real subprocesses: the SPEC done-when flows, exit codes and stream discipline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SAMPLE = (b"From: Alice <alice@example.com>\r\n"
          b"To: bob@example.org\r\n"
          b"Cc: carol@example.net\r\n"
          b"Subject: Hello from a subprocess\r\n"
          b"Message-ID: <acceptance-1@example.com>\r\n"
          b"\r\n"
          b"Hi.\r\n")


def relayctl_env(**extra: str) -> dict[str, str]:
    """The test's environment (no RELAY_*, XDG_STATE_HOME in tmp) with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def relayctl(*argv: str, env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli", *argv], input=stdin, env=env,
                          capture_output=True, timeout=60, cwd=REPO)


def test_default_sqlite_spool_needs_no_configuration(tmp_path):
    """With no config file and no RELAY_SPOOL_URL, enqueue and status work on $XDG_STATE_HOME/relay/spool.db."""
    state = tmp_path / "xdg-state"
    env = relayctl_env(XDG_STATE_HOME=str(state))
    message = tmp_path / "hello.eml"
    message.write_bytes(SAMPLE)

    queued = relayctl("enqueue", str(message), env=env)
    assert queued.returncode == 0, queued.stderr
    assert queued.stderr == b""
    queue_id = queued.stdout.decode().strip()
    assert len(queue_id) == 20

    spool_file = state / "relay" / "spool.db"
    assert spool_file.is_file()
    status = relayctl("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["spool"] == f"sqlite:///{spool_file}"
    assert report["messages"] == 1
    assert report["recipients"]["queued"] == 2
    human = relayctl("status", env=env)
    assert f"sqlite:///{spool_file}".encode() in human.stdout


def test_postgresql_flow(pg_url):
    """On PostgreSQL: db upgrade, enqueue from stdin, status, list and show all work."""
    env = relayctl_env(RELAY_SPOOL_URL=pg_url)
    upgraded = relayctl("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.decode() == f"spool {pg_url}: schema upgraded from none to 0001\n"

    queued = relayctl("enqueue", "--idempotency-key", "acceptance-1", env=env, stdin=SAMPLE)
    assert queued.returncode == 0, queued.stderr
    queue_id = queued.stdout.decode().strip()
    again = relayctl("enqueue", "--idempotency-key", "acceptance-1", env=env, stdin=SAMPLE)
    assert again.stdout.decode().strip() == queue_id

    report = json.loads(relayctl("--json", "status", env=env).stdout)
    assert report["messages"] == 1 and report["recipients"]["queued"] == 2
    assert [d["domain"] for d in report["domains"]] == ["example.net", "example.org"]

    listed = json.loads(relayctl("list", "--json", env=env).stdout)
    assert [m["id"] for m in listed] == [queue_id]
    assert listed[0]["recipients"] == [{"address": "bob@example.org", "state": "queued"},
                                       {"address": "carol@example.net", "state": "queued"}]

    shown = json.loads(relayctl("show", queue_id, "--json", env=env).stdout)
    assert shown["subject"] == "Hello from a subprocess"
    assert shown["message_id"] == "<acceptance-1@example.com>"
    assert [(r["attempts"], r["history"]) for r in shown["recipients"]] == [(0, []), (0, [])]

    human = relayctl("show", queue_id, env=env)
    assert human.returncode == 0 and b"Subject:      Hello from a subprocess" in human.stdout


@pytest.mark.parametrize(("argv", "extra_env", "code"), [
    (["show", "0000000000000NOSUCH"], {}, 1),                                   # unknown id
    (["retry"], {}, 64),                                                        # usage error
    (["enqueue", "/nonexistent/message.eml"], {}, 66),                          # missing input
    (["status"], {"RELAY_SPOOL_URL": "postgresql+psycopg://relay:pw@127.0.0.1:1/relay"}, 75),  # no server
], ids=["unknown-id", "usage", "missing-file", "unreachable-spool"])
def test_error_prints_one_line_on_stderr_and_nothing_on_stdout(tmp_path, argv, extra_env, code):
    """A failing relayctl exits with its sysexits code, one stderr line, empty stdout, no traceback."""
    result = relayctl(*argv, env=relayctl_env(**extra_env))
    assert result.returncode == code, result.stderr
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relayctl: ") and lines[0].endswith(".")
    assert b"Traceback" not in result.stderr


def test_status_watch_stops_cleanly_on_ctrl_c(sqlite_url):
    """status --watch --json prints an object per second and exits 0 on SIGINT."""
    env = relayctl_env(RELAY_SPOOL_URL=sqlite_url)
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "status", "--watch", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        frames = [json.loads(proc.stdout.readline()) for _ in range(2)]
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err == b""
    assert all(frame["messages"] == 0 for frame in frames)
    assert all(json.loads(line)["messages"] == 0 for line in rest.splitlines())


def test_installed_console_script_prints_help():
    """The installed `relayctl` console script runs and prints its help."""
    executable = shutil.which("relayctl")
    if executable is None:
        pytest.skip("relayctl is not installed (pip install -e .)")
    started = time.monotonic()
    result = subprocess.run([executable, "--help"], capture_output=True, timeout=60, env=relayctl_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"usage: relayctl")
    assert b"enqueue" in result.stdout and b"db" in result.stdout
    assert time.monotonic() - started < 30
