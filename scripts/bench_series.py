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
bench_e2e run; the load options (-m, -s, -l,
--samples) go to every run of both scripts.  It prints a table per variant
and, with ``--json``, one JSON object with every run's result.
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


def run_bench(script: str, flags: list[str], timeout: float) -> dict:
    """One benchmark run: its JSON result, or ``{"error": sentence}``."""
    cmd = [sys.executable, str(SCRIPTS / script), *flags, "--json"]
    started = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s", "argv": cmd}
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0]}", "argv": cmd}
    result["argv"] = cmd
    result["started"] = started
    if done.returncode != 0:
        result["error"] = f"exit {done.returncode}"
    return result


def rate(result: dict) -> float | None:
    tp = result.get("throughput") if "error" not in result else None
    return tp["rate"] if tp else None


def latency(result: dict) -> float | None:
    lat = result.get("latency") if "error" not in result else None
    return lat["median_ms"] if lat else None


def per_commit(result: dict) -> float | None:
    tp = result.get("throughput") or {}
    return tp["committed"] / tp["commits"] if tp.get("commits") else None


def cell(value: float | None, fmt: str) -> str:
    return "failed" if value is None else format(value, fmt)


def report(postfix: list[dict], variants: dict[str, list[dict]]) -> list[str]:
    """The text report: Postfix's runs, then a row per variant with rates, ratios and latencies."""
    rates = [r for r in map(rate, postfix) if r is not None]
    mean = statistics.fmean(rates) if rates else None
    lines = ["postfix:  " + ", ".join(f"{cell(rate(r), ',.0f')} msgs/s ({cell(latency(r), '.2f')} ms)"
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
            parts.append(f"{x:,.0f} msgs/s{ratio} ({cell(latency(r), '.2f')} ms{grouped})")
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
    parser.add_argument("--messages", "-m", type=int, help="smtp-source -m for every run (default: the scripts')")
    parser.add_argument("--sessions", "-s", type=int, help="smtp-source -s for every run")
    parser.add_argument("--size", "-l", type=int, help="smtp-source -l for every run")
    parser.add_argument("--samples", type=int, help="idle-latency messages for every run")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound of each run, seconds (900)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    load: list[str] = []
    for flag, value in (("-m", args.messages), ("-s", args.sessions), ("-l", args.size),
                        ("--samples", args.samples)):
        if value is not None:
            load += [flag, str(value)]
    common = shlex.split(args.common)
    postfix: list[dict] = []
    variants: dict[str, list[dict]] = {label: [] for label in args.relayd}

    def note(what: str, result: dict) -> None:
        if not args.json:
            text = (f"{result['error']}" if "error" in result
                    else f"{cell(rate(result), ',.0f')} msgs/s, {cell(latency(result), '.2f')} ms")
            print(f"  {what}: {text}", file=sys.stderr, flush=True)

    for n in range(1, args.rounds + 1):
        if not args.json:
            print(f"round {n} of {args.rounds}", file=sys.stderr, flush=True)
        postfix.append(run_bench("bench_postfix.py", load, args.timeout))
        note("postfix", postfix[-1])
        for label in args.relayd:
            variants[label].append(run_bench("bench_e2e.py", [*load, *common, *shlex.split(label)], args.timeout))
            note(f"relayd {label or '(defaults)'}", variants[label][-1])
    postfix.append(run_bench("bench_postfix.py", load, args.timeout))
    note("postfix", postfix[-1])

    if args.json:
        print(json.dumps({"postfix": postfix, "relayd": variants, "common": args.common}))
    else:
        print("\n".join(report(postfix, variants)))
    failed = any("error" in r for r in postfix) or any("error" in r for runs in variants.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
