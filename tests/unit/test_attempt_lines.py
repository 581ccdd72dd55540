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


def test_lines_match_the_twisted_logger_format():
    """The same text as relayd's twisted.logger observer writes for log.info("{line}", line=...)
    from the "relay" namespace (the path the drain takes without AttemptLines)."""
    from twisted.logger import LogLevel, formatEventAsClassicLogText

    stamp = "2026-11-21T12:00:00"
    line = "qid=B to=<b@x.test> status=deferred\nsecond line"
    event = {"log_format": "{line}", "line": line, "log_namespace": "relay", "log_level": LogLevel.info,
             "log_time": 1.0}
    clock, stream = task.Clock(), io.StringIO()
    lines = AttemptLines(clock, format_time=lambda t: stamp, stream=stream)
    lines(line)
    lines.flush()
    assert stream.getvalue() == formatEventAsClassicLogText(event, formatTime=lambda t: stamp)
