"""spool.min_free_space: the floor's arithmetic, its cached reading, the config default
and the listener's log lines, with an injected statvfs and clock (no disk is filled)."""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from relay.config import ConfigError, load_config
from relay.errors import SpoolUnavailable
from relay.spool.space import FreeSpaceFloor, floor_for_sqlite, human_size
from relay.submission import room_check

MB = 10 ** 6


class FakeFS:
    """statvfs for one file system whose free space a test sets; counts the calls."""

    def __init__(self, free: int, block: int = 1000):
        self.free, self.block, self.calls = free, block, 0

    def __call__(self, path: str) -> os.statvfs_result:
        self.calls += 1
        if self.free is None:
            raise PermissionError(13, "Permission denied", path)
        blocks = self.free // self.block
        #          bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax
        return os.statvfs_result((self.block, self.block, 10 ** 9, blocks + 100, blocks, 0, 0, 0, 0, 255))


def floor_with(free: int, floor: int = 10 * MB):
    fs, clock = FakeFS(free), Clock()
    return FreeSpaceFloor("/var/lib/relay", floor, url="sqlite:////var/lib/relay/spool.db",
                          statvfs=fs, clock=clock.seconds), fs, clock


def test_check_refuses_what_would_eat_into_the_floor():
    """Free space minus the incoming bytes must stay at or above the floor (f_bavail, not root's reserve)."""
    floor, fs, _ = floor_with(12 * MB)
    floor.check(2 * MB)                         # leaves exactly the floor
    with pytest.raises(SpoolUnavailable) as caught:
        floor.check(2 * MB + 1)
    assert str(caught.value) == ("The spool sqlite:////var/lib/relay/spool.db is full: 12.0 MB free on its file "
                                 "system, and 10.0 MB is kept free for delivery (spool.min_free_space); "
                                 "nothing was queued.")
    assert fs.calls == 2                        # check() reads every time


def test_has_room_reuses_a_reading_for_a_second():
    floor, fs, clock = floor_with(11 * MB)
    assert floor.has_room(0) and not floor.has_room(2 * MB)
    assert fs.calls == 1
    fs.free = 5 * MB
    clock.advance(0.9)
    assert floor.has_room(0)                    # the reading is 0.9 s old
    clock.advance(0.1)
    assert not floor.has_room(0) and fs.calls == 2


def test_an_unreadable_file_system_is_not_a_refusal():
    """statvfs failing (permissions, a vanished directory) refuses nothing: the write itself will tell."""
    floor, fs, _ = floor_with(None)
    floor.check(MB)
    assert floor.has_room(MB)


def test_floor_for_sqlite_measures_every_spool_file(tmp_path):
    """A file-backed SQLite spool always gets a FreeSpaceFloor (for /metrics); a floor of 0 refuses nothing."""
    db = tmp_path / "spool.db"
    made = floor_for_sqlite(f"sqlite:///{db}", 5)
    assert (made.directory, made.floor) == (str(tmp_path), 5)
    assert made.free() > 0                      # a real statvfs of the test's directory
    off = floor_for_sqlite(f"sqlite:///{db}", 0)
    assert off.floor == 0 and off.free() > 0
    off.check(10 ** 18)
    assert off.has_room(10 ** 18)
    assert floor_for_sqlite("sqlite://", 5) is None
    assert floor_for_sqlite("sqlite:///:memory:", 5) is None


def test_human_size():
    assert [human_size(n) for n in (512, 37_500_000, 2_500_000_000, 1500)] == [
        "512 bytes", "37.5 MB", "2.5 GB", "1.5 kB"]


def test_config_default_is_one_and_a_half_message_sizes(tmp_path):
    """Postfix's rule: 1.5 x submission.max_message_size; an explicit size or 0 (off) wins."""
    def load(text: str):
        path = tmp_path / "relay.toml"
        path.write_text(text)
        return load_config(path, environ={})

    assert load_config(None, environ={}).min_free_space == 37_500_000
    assert load('[submission]\nmax_message_size = "10MB"\n').min_free_space == 15_000_000
    assert load('[submission]\nmax_message_size = 0\n').min_free_space == 37_500_000   # no limit: the default's
    assert load('[spool]\nmin_free_space = "1GB"\n').min_free_space == 10 ** 9
    assert load('[spool]\nmin_free_space = 0\n').min_free_space == 0
    with pytest.raises(ConfigError, match=r"^spool.min_free_space must be a size like"):
        load('[spool]\nmin_free_space = "lots"\n')


def test_listener_logs_when_space_runs_short_and_when_it_is_back():
    """One warning when MAIL starts being refused, one line when there is room again -- not one per client."""
    floor, fs, clock = floor_with(20 * MB)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        has_room = room_check(floor)
        results = [has_room(0)]
        fs.free = 5 * MB
        clock.advance(1)
        results += [has_room(0), has_room(0), has_room(0)]
        fs.free = 30 * MB
        clock.advance(1)
        results += [has_room(0), has_room(0)]
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert results == [True, False, False, False, True, True]
    lines = [e for e in seen if "spool" in e.get("log_format", "")]
    assert [e["log_level"].name for e in lines] == ["warn", "info"]
    assert "10.0 MB would stay free" in lines[0]["log_format"].format(**lines[0])
