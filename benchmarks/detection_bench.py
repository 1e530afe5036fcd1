"""The detection table: detector x attack (all-to-one, source-specific with and without cover images, zero poison),
each cell the flagged class (Neural Cleanse, SCAn) or STRIP's detection rate at its measured false-rejection rate,
with 95% CIs, counts pooled over the runs (seeds) of one attack.

    .venv/bin/python benchmarks/detection_bench.py RUN [RUN ...] [--methods neural-cleanse,strip,scan]
        [--copy-to DIR] [--read] [--threads 2] [--device cpu] [key.sub=value ...]

Each detector writes RUN/defence-METHOD/ as `signtrap defend` does (a detector that repairs, as Neural Cleanse's
unlearning does when it flags a class, is probed unless probe.enabled=false). --copy-to DIR first copies every run
(without its defence folders) into DIR and works on the copies, leaving the originals untouched; --read only reads
the defence folders already there.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def copy_runs(runs: list[Path], dest: Path) -> list[Path]:
    """Copy each run directory (defence folders and probe results left out) into `dest`, once."""
    out = []
    for run in runs:
        target = dest / run.name
        if not (target / "model.pt").is_file():
            shutil.copytree(run, target, ignore=shutil.ignore_patterns("defence-*", "probe.json", ".*"), dirs_exist_ok=True)
        out.append(target)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="trained run directories (key.sub=value overrides may follow)")
    parser.add_argument("--methods", default="neural-cleanse,strip,scan", help="comma-separated detectors")
    parser.add_argument("--copy-to", help="work on copies of the runs in this directory")
    parser.add_argument("--read", action="store_true", help="only read the defence folders already in the runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2 cores)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_intermixed_args(argv)
    overrides = [r for r in args.runs if "=" in r]
    runs = [Path(r) for r in args.runs if "=" not in r]

    import torch

    torch.set_num_threads(args.threads)
    from signtrap.machine import progress
    from signtrap.config import load_config
    import signtrap
    from signtrap.errors import SigntrapError
    from signtrap.reporting.detection import DETECTION_NOTE, detection_table

    progress.QUIET = not args.progress
    methods = [m for m in args.methods.split(",") if m]
    try:
        if args.copy_to:
            runs = copy_runs(runs, Path(args.copy_to))
        for run in runs:
            if args.read:
                continue
            # the public API, as a user calls it (the run lock, the core budget); each report records its seconds
            for report in signtrap.defend(run, methods, device=args.device, overrides=overrides):
                method, d = report["method"], report["details"]
                what = (f"detects {100 * d['detection_rate']['rate']:.1f}% at FRR {100 * d['false_rejection_rate']['rate']:.1f}% "
                        f"(at a measured FRR of {100 * d['at_measured_frr']['false_rejection_rate']['rate']:.1f}%: "
                        f"{100 * d['at_measured_frr']['detection_rate']['rate']:.1f}%)"
                        if method == "strip" else f"flags {d.get('flagged') or 'nothing'}")
                print(f"{run.name} {method}: {what} ({report['seconds']:.0f} s)", file=sys.stderr, flush=True)
        cfgs = [load_config(r / "config.yaml") for r in runs]
    except SigntrapError as exc:
        print(f"detection_bench: error: {exc}", file=sys.stderr)
        return 2
    headers, rows = detection_table(runs, cfgs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"detection over {len(runs)} runs ({args.threads} torch threads, load average {load:.1f})")
    print(" | ".join(headers))
    print(" | ".join("---" for _ in headers))
    for row in rows:
        print(" | ".join(row))
    print(DETECTION_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
