"""Free space kept on a SQLite spool's file system (Postfix's ``queue_minfree``).

New mail stops being accepted while the file system holding the spool has
less than ``spool.min_free_space`` available, so that relayd can still
record what it delivers and queue its bounce messages (a spool that filled
up with new mail could do neither).  By default the floor is one and a half
times ``submission.max_message_size``, as Postfix's ``smtpd`` requires.

Only new mail is refused: ``enqueue`` and ``enqueue_claimed`` raise
SpoolUnavailable with a sentence that says the spool is full (the listener
answers 452 4.3.1, ``relayctl enqueue`` exits 75); ``record`` (outcomes and
bounce messages) is never refused for space.  On PostgreSQL the server's
disk cannot be seen from here; a full one fails the write, with the same
replies.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from relay.config import redact_url
from relay.errors import SpoolUnavailable
from relay.spool.engine import sqlite_path

#: How long a reading of the free space serves :meth:`FreeSpaceFloor.has_room`.
READING_MAX_AGE = 1.0


def human_size(n: int) -> str:
    """``37500000`` -> ``"37.5 MB"`` (decimal units, as ``max_message_size = "25MB"``)."""
    for unit, scale in (("GB", 10 ** 9), ("MB", 10 ** 6), ("kB", 10 ** 3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class FreeSpaceFloor:
    """The free space that must stay on the file system of ``directory``.

    ``statvfs`` and ``clock`` are injectable for tests.  :meth:`check` reads
    the file system each time (it runs on a spool thread, next to a commit);
    :meth:`has_room` (the listener's early check at MAIL, on the reactor
    thread) reuses a reading for up to READING_MAX_AGE seconds.
    """

    def __init__(self, directory: str, floor: int, *, url: str = "",
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 clock: Callable[[], float] = time.monotonic):
        self.directory = directory
        self.floor = floor
        self.url = url
        self._statvfs = statvfs
        self._clock = clock
        self._reading: tuple[float, int] | None = None

    def free(self) -> int:
        """Bytes available to this (unprivileged) process now."""
        st = self._statvfs(self.directory)
        free = st.f_bavail * st.f_frsize
        self._reading = (self._clock(), free)
        return free

    def recent_free(self) -> int:
        """``free()``, or a reading at most READING_MAX_AGE seconds old."""
        reading = self._reading
        if reading is None or self._clock() - reading[0] >= READING_MAX_AGE:
            return self.free()
        return reading[1]

    def has_room(self, incoming: int = 0) -> bool:
        """Whether ``incoming`` more bytes leave the floor free (a recent
        reading; True with a floor of 0, or when the file system cannot be
        read: the commit's own check, or the write itself, will tell)."""
        if not self.floor:
            return True
        try:
            return self.recent_free() - incoming >= self.floor
        except OSError:
            return True

    def check(self, incoming: int) -> None:
        """SpoolUnavailable ("... is full ...") unless ``incoming`` more bytes
        leave the floor free.  A file system that cannot be read is not a
        refusal: the write itself will fail if it must.  A floor of 0
        refuses nothing."""
        if not self.floor:
            return
        try:
            free = self.free()
        except OSError:
            return
        if free - incoming < self.floor:
            raise SpoolUnavailable(
                f"The spool {self.url} is full: {human_size(free)} free on its file system, and "
                f"{human_size(self.floor)} is kept free for delivery (spool.min_free_space); "
                f"nothing was queued.")


def floor_for_sqlite(url: str, floor: int) -> FreeSpaceFloor | None:
    """The floor for the file of a ``sqlite:///PATH`` spool (its file system
    is measured for /metrics even with a floor of 0), or None for a database
    in memory."""
    path = sqlite_path(url)
    if path is None:
        return None
    return FreeSpaceFloor(os.path.dirname(os.path.realpath(path)) or ".", floor, url=redact_url(url))
