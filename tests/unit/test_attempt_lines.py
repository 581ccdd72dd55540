"""relayd's attempt log: the same text as the twisted.logger path, one write per reactor turn."""

from __future__ import annotations

import io

from twisted.internet import task

from relay.daemon import AttemptLines


def test_lines_are_written_once_per_turn_in_the_log_format():
    clock, stream = task.Clock(), io.StringIO()
    writes = []
    stream.write = lambda text, _w=stream.write: (writes.append(text), _w(text))[1]
    lines = AttemptLines(clock, format_time=lambda t: "2026-11-21T12:00:00", stream=stream)
    lines("qid=A to=<a@x.test> status=delivered")
    lines("qid=B to=<b@x.test> status=deferred\nsecond line")
    assert stream.getvalue() == ""              # not before the end of this turn
    clock.advance(0)
    assert writes == [
        "2026-11-21T12:00:00 [relay#info] qid=A to=<a@x.test> status=delivered\n"
        "2026-11-21T12:00:00 [relay#info] qid=B to=<b@x.test> status=deferred\n\tsecond line\n"]
    lines("qid=C")
    lines.flush()                                # relayd flushes once more after the reactor stops
    assert writes[-1].endswith("[relay#info] qid=C\n") and len(writes) == 2
    clock.advance(0)
    assert len(writes) == 2
