"""Helpers for the relayd subprocess tests: configs, processes, spool snapshots, bounded waits.

Every daemon started here logs to a file (never a pipe that could fill up and
stall it) and is killed at cleanup if a test left it running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[2]


def relay_env(**extra: str) -> dict[str, str]:
    """The test's environment without RELAY_* variables, with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate()`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)       # a TOML basic string is a JSON string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, *, spool_url: str, node: str, route_port: int | None = None,
                 route_host: str = "127.0.0.1", extra: dict[str, dict] | None = None) -> Path:
    """A relayd TOML file: small timeouts, fast polling, TLS off, and a ``"*"`` route when given a port."""
    sections: dict[str, dict] = {
        "relay": {"hostname": "relay.test", "node": node},
        "spool": {"url": spool_url, "busy_timeout": "5s"},
        "delivery": {"tls": "none", "connect_timeout": "2s", "command_timeout": "10s",
                     "lease": "5m", "poll_interval": "0.2s", "batch_size": 200},
        "retry": {"initial": "5m", "maximum": "1h"},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    if route_port is not None:
        lines.append("[routes]")
        lines.append(f'"*" = {{ host = "{route_host}", port = {route_port}, tls = "none" }}')
    path.write_text("\n".join(lines) + "\n")
    return path


class Proc:
    """A child process whose stdout and stderr go to files; killed by ``cleanup``."""

    def __init__(self, argv: list[str], *, log_dir: Path, name: str, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.out_path = log_dir / f"{name}.stdout"
        self.err_path = log_dir / f"{name}.stderr"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
                                      env=env if env is not None else relay_env(), cwd=cwd or REPO)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.out_path.read_bytes().decode("utf-8", "replace")

    def stderr(self) -> str:
        return self.err_path.read_bytes().decode("utf-8", "replace")

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_output(self, pattern: str, timeout: float) -> re.Match:
        """The first match of ``pattern`` in stdout+stderr; fails if the process exits first."""
        rx = re.compile(pattern, re.M)

        def found():
            m = rx.search(self.output())
            if m is None and not self.alive():
                raise AssertionError(f"{self.name} exited with {self.popen.returncode} before printing "
                                     f"{pattern!r}:\n{self.output()[-3000:]}")
            return m
        return wait_until(found, timeout, f"{self.name} to print {pattern!r}")

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout}s:\n{self.output()[-3000:]}")

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._out.close()
        self._err.close()


class Processes:
    """Starts relayd, relayctl and helper processes for one test; kills leftovers at the end."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def start(self, argv: list[str], name: str, **kwargs) -> Proc:
        proc = Proc(argv, log_dir=self.tmp_path, name=f"{name}-{len(self.procs)}", **kwargs)
        self.procs.append(proc)
        return proc

    def relayd(self, config: Path, name: str = "relayd") -> Proc:
        return self.start([sys.executable, "-m", "relay.daemon", "--config", str(config)], name)

    def dns(self, zones: dict) -> int:
        """Start ``python -m relay.testing_dns`` on the zones; return its port."""
        zones_file = self.tmp_path / "zones.json"
        zones_file.write_text(json.dumps(zones))
        proc = self.start([sys.executable, "-m", "relay.testing_dns", "--port", "0", "--zones", str(zones_file)],
                          "dns")
        m = proc.wait_for_output(r"^(\d+)$", timeout=15)
        return int(m.group(1))

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.cleanup()


def relayctl(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli", *argv], env=relay_env(), capture_output=True,
                          timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)


def status_json(config: Path) -> dict:
    """``relayctl --config PATH --json status``, parsed."""
    done = relayctl("--config", str(config), "--json", "status")
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def message_bytes(n: int, to: str, tag: str) -> bytes:
    """A small message whose Message-ID ``<tag-n@relay-tests>`` identifies it."""
    return (f"From: app@sender.test\r\nTo: {to}\r\nSubject: {tag} {n}\r\n"
            f"Message-ID: <{tag}-{n}@relay-tests>\r\n\r\nBody of {tag} {n}.\r\n").encode()


def write_mbox(path: Path, messages: Iterable[bytes]) -> Path:
    with open(path, "wb") as f:
        for raw in messages:
            f.write(b"From app@sender.test Thu Jan  1 00:00:00 2026\n")
            f.write(raw.replace(b"\r\n", b"\n"))
            f.write(b"\n")
    return path


def message_id_of(data: bytes) -> str:
    return (BytesHeaderParser().parsebytes(data)["Message-ID"] or "").strip()


@dataclass(frozen=True)
class RecipientRow:
    message_id: str          # the Message-ID header of its message
    address: str
    state: str
    lease_owner: str | None
    attempts: int
    queue_id: str            # its message's queue id (the spool's message id)


class SpoolReader:
    """A read-only look at a spool relayd is using (a second connection, as relayctl has)."""

    def __init__(self, spool_url: str):
        from relay.spool import open_spool
        self.spool = open_spool(spool_url, busy_timeout=5.0, pool_size=1)

    def counts(self) -> dict[str, int]:
        """Recipients per state."""
        return dict(self.spool.status(time.time()).recipients)

    def rows(self) -> list[RecipientRow]:
        """Every recipient with its message's Message-ID, state, lease owner and queue id."""
        from sqlalchemy import select
        from relay.spool.schema import messages as M, recipients as R
        with self.spool.engine.connect() as conn:
            rows = conn.execute(select(M.c.message_id_header, R.c.address, R.c.state, R.c.lease_owner,
                                       R.c.attempts, M.c.id).join(M, M.c.id == R.c.message_id)).all()
        return [RecipientRow(*row) for row in rows]

    def close(self) -> None:
        self.spool.close()


SIGTERM = signal.SIGTERM
SIGKILL = signal.SIGKILL
