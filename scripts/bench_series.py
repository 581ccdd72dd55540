#!/usr/bin/env python3
"""An interleaved series: stock Postfix and relayd variants, round by round,
with each relayd rate as a ratio to the mean of Postfix's runs in the same series.

These VMs change speed by tens of percent within an hour, so a relayd figure
means little without Postfix measured beside it.  Each round runs
``scripts/bench_postfix.py`` then ``scripts/bench_e2e.py`` once per
``--relayd`` variant (its flags), and Postfix runs once more after the last
round.  Every run is one subprocess with ``--json``; a failed run is reported
and the series goes on.

    python scripts/bench_series.py --relayd= --relayd=--pg
    python scripts/bench_series.py --rounds 3 --relayd= --relayd="--commit-delay 0" \\
        --common="--cpu-affinity 1 --python /tmp/venv-deb/bin/python"
    python scripts/bench_series.py -m 2000 --samples 5 --relayd=   # a quick check

Write the flags with ``=`` (``--relayd=--pg``): argparse would take a bare
``--pg`` for an option of this script.  ``--common`` flags go to every
bench_e2e run; the load and run options (-m, -s, -l, --reuse, --samples,
--warmup, --gap, --timeout, --poll) go to every run of both scripts, so
that Postfix and relayd always get the same load.  A run that takes longer
than ``--run-timeout`` is sent SIGTERM (the scripts then stop what they
started) and killed a minute later.  It prints a table per variant and,
with ``--json``, one JSON object with every run's result.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from bench_e2e import add_load_arguments, add_run_arguments  # noqa: E402


def run_bench(script: str, flags: list[str], timeout: float) -> dict:
    """One benchmark run: its JSON result, or ``{"error": sentence}``."""
    cmd = [sys.executable, str(SCRIPTS / script), *flags, "--json"]
    started = time.time()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()                # the scripts stop relayd / Postfix and clean up on SIGTERM
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        return {"error": f"timed out after {timeout:g} s", "argv": cmd, "started": started}
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}", "argv": cmd, "started": started}
    result["argv"] = cmd
    result["started"] = started
    if proc.returncode != 0:
        result["error"] = f"exit {proc.returncode}"
    return result


def rate(result: dict) -> float | None:
    tp = result.get("throughput") if "error" not in result else None
    return tp["rate"] if tp else None


def latency(result: dict) -> float | None:
    lat = result.get("latency") if "error" not in result else None
    return lat["median_ms"] if lat else None


def stolen(result: dict) -> str:
    """", 3.2 s stolen": the CPU time the hypervisor took during the run
    (also when none: "0.0 s"); empty when the run did not measure it."""
    steal = (result.get("throughput") or {}).get("steal")
    return f", {steal:.1f} s stolen" if steal is not None else ""


def per_commit(result: dict) -> float | None:
    tp = result.get("throughput") or {}
    return tp["committed"] / tp["commits"] if tp.get("commits") else None


def cell(value: float | None, fmt: str) -> str:
    return "failed" if value is None else format(value, fmt)


def report(postfix: list[dict], variants: dict[str, list[dict]]) -> list[str]:
    """The text report: Postfix's runs, then a row per variant with rates, ratios and latencies."""
    rates = [r for r in map(rate, postfix) if r is not None]
    mean = statistics.fmean(rates) if rates else None
    lines = ["postfix:  " + ", ".join(f"{cell(rate(r), ',.0f')} msgs/s ({cell(latency(r), '.2f')} ms{stolen(r)})"
                                      for r in postfix)
             + (f"; mean {mean:,.0f} msgs/s" if mean else "")]
    for label, runs in variants.items():
        parts = []
        for r in runs:
            x = rate(r)
            if x is None:
                parts.append("failed")
                continue
            ratio = f", {x / mean:.2f}x" if mean else ""
            commits = per_commit(r)
            grouped = f", {commits:.1f}/commit" if commits else ""
            parts.append(f"{x:,.0f} msgs/s{ratio} ({cell(latency(r), '.2f')} ms{grouped}{stolen(r)})")
        lines.append(f"relayd {label or '(defaults)'}: " + "; ".join(parts))
        for r in runs:
            if "error" in r:
                lines.append(f"  failed: {r['error']} ({' '.join(shlex.quote(a) for a in r['argv'])})")
    for r in postfix:
        if "error" in r:
            lines.append(f"  postfix failed: {r['error']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relayd", action="append", metavar="FLAGS", required=True,
                        help='bench_e2e.py flags of one relayd variant, written --relayd= or --relayd=--pg (repeatable)')
    parser.add_argument("--common", default="", metavar="FLAGS",
                        help='flags for every bench_e2e.py run, e.g. --common="--cpu-affinity 1"')
    parser.add_argument("--rounds", type=int, default=2, help="rounds (2); Postfix runs once more at the end")
    parser.add_argument("--run-timeout", type=float, default=900.0, help="bound of each run, seconds (900)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    shared = parser.add_argument_group("passed to every run of both scripts (default: the scripts' own)")
    add_load_arguments(shared)
    add_run_arguments(shared)
    for action in shared._group_actions:
        action.default = argparse.SUPPRESS          # only what was given is passed on
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    load: list[str] = []
    for action in shared._group_actions:
        if hasattr(args, action.dest):
            value = getattr(args, action.dest)
            if action.nargs == 0:                   # a switch (--reuse)
                load += [action.option_strings[0]] if value else []
            else:
                load += [action.option_strings[0], str(value)]
    common = shlex.split(args.common)
    postfix: list[dict] = []
    variants: dict[str, list[dict]] = {label: [] for label in args.relayd}

    def note(what: str, result: dict) -> None:
        if not args.json:
            text = (f"{result['error']}" if "error" in result
                    else f"{cell(rate(result), ',.0f')} msgs/s, {cell(latency(result), '.2f')} ms{stolen(result)}")
            print(f"  {what}: {text}", file=sys.stderr, flush=True)

    for n in range(1, args.rounds + 1):
        if not args.json:
            print(f"round {n} of {args.rounds}", file=sys.stderr, flush=True)
        postfix.append(run_bench("bench_postfix.py", load, args.run_timeout))
        note("postfix", postfix[-1])
        for label in args.relayd:
            variants[label].append(run_bench("bench_e2e.py", [*load, *common, *shlex.split(label)], args.run_timeout))
            note(f"relayd {label or '(defaults)'}", variants[label][-1])
    postfix.append(run_bench("bench_postfix.py", load, args.run_timeout))
    note("postfix", postfix[-1])

    if args.json:
        print(json.dumps({"postfix": postfix, "relayd": variants, "common": args.common}))
    else:
        print("\n".join(report(postfix, variants)))
    failed = any("error" in r for r in postfix) or any("error" in r for runs in variants.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
