"""The Alembic migrations against ``relay.spool.schema.metadata``, on SQLite and PostgreSQL.

``upgrade head`` must build exactly the tables the code describes (an empty
``compare_metadata`` diff), every revision must walk down to base and back up,
and every opener (``ensure_schema``) must initialise an empty spool, even when
two of them start at once, and refuse one at a revision it cannot use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from relay.errors import SpoolUnavailable
from relay.spool import migrate, open_spool
from relay.spool.engine import create_spool_engine
from relay.spool.schema import metadata

REPO = Path(__file__).resolve().parents[2]
TABLES = {"messages", "recipients", "attempts"}


@pytest.fixture
def engine(spool_url):
    """An engine on a fresh, empty database (a PostgreSQL schema selected by search_path)."""
    engine = create_spool_engine(spool_url, busy_timeout=5.0)
    yield engine
    engine.dispose()


def schema_diff(engine) -> list:
    """What autogenerate would change to make the database match the metadata."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
        return compare_metadata(context, metadata)


def revision(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def tables(engine) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def test_upgrade_head_matches_metadata(engine, spool_url):
    """upgrade head on an empty database builds exactly the schema in relay.spool.schema."""
    assert tables(engine) == set()
    before, after = migrate.upgrade(engine, spool_url)
    assert (before, after) == (None, migrate.head_revision())
    assert tables(engine) == TABLES | {"alembic_version"}
    assert schema_diff(engine) == []


def test_walk_down_to_base_and_up_again(engine, spool_url):
    """Every revision can be stepped down to base and back up, ending at the same schema."""
    migrate.upgrade(engine, spool_url)
    script = ScriptDirectory.from_config(migrate.alembic_config())
    newest_first = list(script.walk_revisions())
    for rev in newest_first:
        migrate.downgrade(engine, spool_url, rev.down_revision or "base")
        assert revision(engine) == rev.down_revision
    assert tables(engine) <= {"alembic_version"}
    for rev in reversed(newest_first):
        migrate.upgrade(engine, spool_url, rev.revision)
        assert revision(engine) == rev.revision
    assert revision(engine) == migrate.head_revision()
    assert schema_diff(engine) == []


def test_ensure_schema_initialises_empty_database(engine, spool_url):
    """Opening an empty database creates the schema at head; opening it again changes nothing."""
    open_spool(spool_url).close()
    assert revision(engine) == migrate.head_revision()
    assert schema_diff(engine) == []
    spool = open_spool(spool_url)
    spool.ping()
    spool.close()


@pytest.fixture
def newer_scripts(tmp_path, monkeypatch):
    """Make relay's migrations a copy with one more revision, 9999, on top of head."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.script_location(), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    head = migrate.head_revision()
    (scripts / "versions" / "9999_probe.py").write_text(textwrap.dedent(f'''\
        """A revision newer than relay's head, for the tests."""
        from alembic import op
        import sqlalchemy as sa

        revision = "9999"
        down_revision = "{head}"
        branch_labels = None
        depends_on = None


        def upgrade() -> None:
            op.create_table("upgrade_probe", sa.Column("id", sa.Integer, primary_key=True))


        def downgrade() -> None:
            op.drop_table("upgrade_probe")
        '''))
    monkeypatch.setattr(migrate, "script_location", lambda: str(scripts))
    return "9999"


def test_ensure_schema_refuses_older_revision(engine, spool_url, newer_scripts):
    """A spool behind this relay's head is refused with `relayctl db upgrade`, which then fixes it."""
    with pytest.MonkeyPatch.context() as mp:        # created by the real scripts, at their head
        mp.setattr(migrate, "script_location", lambda: str(REPO / "migrations"))
        open_spool(spool_url).close()
    old = revision(engine)
    with pytest.raises(SpoolUnavailable, match=rf"revision {old} but this relay needs 9999; "
                                               r"run `relayctl db upgrade`"):
        open_spool(spool_url)
    assert migrate.upgrade(engine, spool_url) == (old, "9999")   # what `relayctl db upgrade` runs
    open_spool(spool_url).close()
    assert "upgrade_probe" in tables(engine)


@pytest.mark.parametrize("prepare, message", [
    # stamped by a newer relay: a revision these scripts do not know
    ("UPDATE alembic_version SET version_num = 'fffffffffff0'",
     r"revision fffffffffff0, which is newer than this relay knows; upgrade relay"),
    # relay tables but no version row: not something relay created
    ("DELETE FROM alembic_version", r"has tables but no relay schema version"),
])
def test_ensure_schema_refuses_unknown_revision(engine, spool_url, prepare, message):
    """A spool at a revision this relay cannot use is refused with SpoolUnavailable and left alone."""
    open_spool(spool_url).close()
    with engine.begin() as conn:
        conn.execute(text(prepare))
    with pytest.raises(SpoolUnavailable, match=message):
        open_spool(spool_url)
    assert tables(engine) == TABLES | {"alembic_version"}


def test_ensure_schema_without_initialise(engine, spool_url):
    """An empty database opened with initialise=False is refused with `relayctl db upgrade`, not created."""
    with pytest.raises(SpoolUnavailable, match=r"no relay schema yet; run `relayctl db upgrade`"):
        open_spool(spool_url, initialise=False)
    assert tables(engine) == set()


def _open_in_threads(urls: list[str], n: int) -> list:
    """Open each database from ``n`` threads at once (one round per URL); "ok" or the error per thread."""
    results: list = ["ok"] * n
    start = threading.Barrier(n)

    def opener(i: int) -> None:
        for url in urls:
            start.wait()
            try:
                open_spool(url).close()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                results[i] = e
                start.abort()
                return

    threads = [threading.Thread(target=opener, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# A child opens one database per line it reads on stdin: the parent writes
# "go" to every child at once, so their opens start together.
_OPENER = """
import sys
from relay.spool import open_spool
print("ready", flush=True)
for url in sys.argv[1:]:
    sys.stdin.readline()
    open_spool(url).close()
    print("ok", flush=True)
"""


def _open_in_processes(urls: list[str], n: int) -> list:
    """Open each database from ``n`` processes at once (one round per URL); "ok" or stderr per process."""
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, *urls], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.communicate(timeout=60)[1]
        for _url in urls:
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            if not all(p.stdout.readline().strip() == "ok" for p in procs):
                break
        results = []
        for p in procs:
            _out, err = p.communicate(timeout=60)
            results.append("ok" if p.returncode == 0 else err)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_initialisation(spool_url, tmp_path, how):
    """Two openers initialising the same empty database at once both succeed, with one schema."""
    # The race is short, so SQLite gets several rounds, each on a new file.
    urls = ([f"sqlite:///{tmp_path / f'spool{n}.db'}" for n in range(10)]
            if spool_url.startswith("sqlite") else [spool_url])
    if how == "threads":
        results = _open_in_threads(urls, 2)
    else:
        results = _open_in_processes(urls, 2)
    assert results == ["ok", "ok"]
    for url in urls:
        engine = create_spool_engine(url)
        try:
            assert revision(engine) == migrate.head_revision()
            assert schema_diff(engine) == []
        finally:
            engine.dispose()


@pytest.mark.parametrize("how", ["open_spool", "alembic command line"])
def test_schema_work_waits_for_another_upgrade_past_the_lock_timeout(pg_url, tmp_path, how):
    """PostgreSQL: the spool's sessions give up on a lock after spool.busy_timeout,
    but initialising or upgrading the schema waits for another process's upgrade
    (the migration lock) as long as it takes, from relay and from `alembic`."""
    import os
    import time

    import psycopg

    from sqlalchemy.engine import make_url

    server = make_url(pg_url).set(drivername="postgresql", query={})
    holder = psycopg.connect(server.render_as_string(hide_password=False), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (migrate._ADVISORY_LOCK,))
    # pg_locks shows a bigint advisory key as its high and low 32 bits.
    key = (migrate._ADVISORY_LOCK >> 32, migrate._ADVISORY_LOCK & 0xFFFFFFFF)
    result: list = []
    if how == "open_spool":
        def work():
            try:
                open_spool(pg_url, busy_timeout=0.2).close()
                result.append("ok")
            except BaseException as e:  # noqa: BLE001 - reported by the test
                result.append(e)
    else:
        config = tmp_path / "relay.toml"
        config.write_text('[spool]\nbusy_timeout = "0.2s"\n')
        env = {**os.environ, "RELAY_CONFIG": str(config), "RELAY_SPOOL_URL": pg_url}

        def work():
            done = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=60)
            result.append("ok" if done.returncode == 0 else done.stderr)
    opener = threading.Thread(target=work)
    try:
        opener.start()
        deadline = time.monotonic() + 30
        while not holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                 "AND classid = %s AND objid = %s AND objsubid = 1", key).fetchone()[0]:
            assert time.monotonic() < deadline and opener.is_alive(), result
            time.sleep(0.02)
        time.sleep(1.0)         # five lock timeouts: it is still waiting
        assert opener.is_alive(), result
    finally:
        holder.execute("SELECT pg_advisory_unlock(%s)", (migrate._ADVISORY_LOCK,))
        opener.join(60)
        holder.close()
    assert result == ["ok"]
    engine = create_spool_engine(pg_url)
    try:
        assert revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()
