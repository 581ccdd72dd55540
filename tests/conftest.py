"""Shared fixtures: one spool URL fixture parametrized over both dialects.

``spool_url`` yields the URL of a fresh, empty spool database:
- ``sqlite``: a file in the test's tmp_path;
- ``postgresql``: a fresh schema in the ``test`` database on 127.0.0.1:5432
  (``$RELAY_TEST_PG_URL`` overrides the server URL), selected through
  ``search_path`` so each test is isolated and dropped afterwards.

When PostgreSQL cannot be reached, its tests are skipped on a developer's
machine but FAIL when ``$CI`` is set: CI must never pass without them.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote

import pytest

PG_SERVER_URL = os.environ.get("RELAY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

_pg_state: dict[str, object] = {}


@pytest.fixture(autouse=True)
def _clean_relay_environment(monkeypatch, tmp_path):
    """No test reads the developer's own relay configuration or default spool."""
    for name in ("RELAY_CONFIG", "RELAY_SPOOL_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def _pg_engine():
    """A shared engine on the PostgreSQL server, or a skip/fail when it is down."""
    if "engine" in _pg_state:
        return _pg_state["engine"]
    if "error" in _pg_state:
        _unavailable(_pg_state["error"])
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_SERVER_URL, connect_args={"connect_timeout": 3}, isolation_level="AUTOCOMMIT",
                           pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "no server"
        _pg_state["error"] = f"PostgreSQL at {PG_SERVER_URL} is unreachable: {exc.__class__.__name__}"
        engine.dispose()
        _unavailable(_pg_state["error"])
    _pg_state["engine"] = engine
    return engine


def _unavailable(reason):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI requires PostgreSQL; start it with "
                    f"`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`)")
    pytest.skip(str(reason))


def pg_schema_url(schema: str) -> str:
    """The server URL with ``search_path`` set to ``schema``."""
    sep = "&" if "?" in PG_SERVER_URL else "?"
    return f"{PG_SERVER_URL}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL schema's URL (dropped after the test)."""
    from sqlalchemy import text

    engine = _pg_engine()
    schema = f"relay_test_{uuid.uuid4().hex[:12]}"
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield pg_schema_url(schema)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def sqlite_url(tmp_path):
    """A fresh SQLite spool file's URL."""
    return f"sqlite:///{tmp_path / 'spool.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_url(request):
    """The URL of a fresh, empty spool, once per dialect."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def spool(spool_url):
    """An opened (schema created) spool on each dialect."""
    from relay.spool import open_spool

    s = open_spool(spool_url, busy_timeout=2.0)
    yield s
    s.close()


# -- a per-dialect count at the end of the run (CI must show PostgreSQL ran) --

_DIALECT_COUNTS: dict[str, dict[str, int]] = {}
_DIALECT_OF: dict[str, str] = {}


def pytest_collection_modifyitems(items):
    for item in items:
        dialect = _dialect_of_item(item)
        if dialect is not None:
            _DIALECT_OF[item.nodeid] = dialect


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    dialect = _DIALECT_OF.get(report.nodeid)
    if dialect is None:
        return
    counts = _DIALECT_COUNTS.setdefault(dialect, {"passed": 0, "failed": 0, "skipped": 0})
    counts[report.outcome] = counts.get(report.outcome, 0) + 1


def _dialect_of_item(item) -> str | None:
    """The spool a test runs on: its ``spool_url`` parameter, else the
    fixture it takes (``pg_url``, ``sqlite_url``), else what its id says
    (trial test cases per dialect, the test classes of the PostgreSQL-only
    modules), read before any parameter id: a parameter that merely names a
    database (a URL to redact, say) does not make a spool test."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("spool_url") in ("sqlite", "postgresql"):
        return callspec.params["spool_url"]
    names = getattr(item, "fixturenames", ())
    if "pg_url" in names:
        return "postgresql"
    if "sqlite_url" in names:
        return "sqlite"
    low = item.nodeid.split("[", 1)[0].lower()
    if "postgres" in low or (getattr(item, "cls", None) is not None and "/test_pg_" in low):
        return "postgresql"
    if "sqlite" in low:
        return "sqlite"
    return None


def pytest_terminal_summary(terminalreporter):
    if not _DIALECT_COUNTS:
        return
    terminalreporter.section("spool dialects")
    for dialect in ("sqlite", "postgresql"):
        c = _DIALECT_COUNTS.get(dialect, {"passed": 0, "failed": 0, "skipped": 0})
        terminalreporter.write_line(
            f"{dialect} spool tests passed: {c['passed']} (failed {c['failed']}, skipped {c['skipped']})")
