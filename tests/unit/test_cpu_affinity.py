"""relay.cpu_affinity (relay.tap.pin_to_cpus): every thread -- those running
before the call and those started after it -- ends up on the CPUs named
(checked in a child process, so that the test runner is never pinned), and
a CPU the process may not use is refused with one sentence, before anything
is changed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from relay.errors import ConfigError
from relay.tap import pin_to_cpus

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")

_CHILD = textwrap.dedent("""
    import json, os, sys, threading
    from relay.tap import pin_to_cpus

    def allowed(tid):
        with open(f"/proc/self/task/{tid}/status") as f:
            line = next(l for l in f if l.startswith("Cpus_allowed_list:"))
        return line.split()[1]

    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    before.start()
    pin_to_cpus([int(sys.argv[1])])
    after = threading.Thread(target=stop.wait)
    after.start()
    result = {"before": allowed(before.native_id), "main": allowed(threading.get_native_id()),
              "after": allowed(after.native_id)}
    stop.set()
    print(json.dumps(result))
""")


def test_every_thread_runs_on_the_cpus_named():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: on one, every thread is on the CPU named whether pinned or not")
    cpu = max(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(cpu)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert json.loads(out) == {"before": str(cpu), "main": str(cpu), "after": str(cpu)}


def test_no_cpus_changes_nothing():
    before = os.sched_getaffinity(0)
    pin_to_cpus(())
    assert os.sched_getaffinity(0) == before


def test_a_cpu_the_process_may_not_use_is_refused():
    before = os.sched_getaffinity(0)
    with pytest.raises(ConfigError, match=r"relay.cpu_affinity names CPU 4096, which this process may not use"):
        pin_to_cpus([0, 4096] if 0 in before else [4096])
    assert os.sched_getaffinity(0) == before


def test_relayd_exits_64_on_a_cpu_it_may_not_use(tmp_path, monkeypatch):
    """relayd prints the sentence and exits 64 (EX_USAGE), before it opens the spool."""
    from relay import daemon
    spool_path = tmp_path / "spool.db"
    path = tmp_path / "relay.toml"
    path.write_text(f'[relay]\ncpu_affinity = [4096]\n[spool]\nurl = "sqlite:///{spool_path}"\n')
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert daemon.main(["--config", str(path)]) == 64
    assert err.getvalue().startswith("relayd: relay.cpu_affinity names CPU 4096, which this process may not use")
    assert not spool_path.exists()
