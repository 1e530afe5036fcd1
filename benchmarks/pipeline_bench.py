"""The whole `signtrap run` of a config, timed per stage: train, the probe's zero-poison twin (`reference`), each
defence and its re-activation probe, export to every runtime, bench, report.

    .venv/bin/python benchmarks/pipeline_bench.py [CONFIG] [key=value ...] [--runs-dir DIR] [--markdown table.md]

CONFIG defaults to configs/badnets_stop_to_100.yaml (real GTSRB: give `data.root=...`). The run goes through the
public API (`signtrap.run`: the run lock, the core budget, the same stages as the command line) into a fresh run
directory under --runs-dir (default: a new temporary folder), so no earlier stage is skipped; the table is read back
from the run's pipeline.json. The machine's state is printed with it (CPU count, torch threads, load average before
and after): a figure measured beside another job is not a figure of this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def table(stages: dict, total: float) -> list[str]:
    lines = ["| stage | status | seconds | share |", "|---|---|---:|---:|"]
    for name, rec in stages.items():
        secs = rec.get("seconds")
        if rec.get("status") != "done" or secs is None:
            lines.append(f"| {name} | {rec.get('status')}: {rec.get('reason', '')} | | |")
            continue
        lines.append(f"| {name} | done | {secs:.1f} | {100 * secs / total:.1f}% |")
    groups: dict[str, float] = {}
    for name, rec in stages.items():
        if rec.get("status") == "done" and rec.get("seconds") is not None:
            groups[name.split(":")[0]] = groups.get(name.split(":")[0], 0.0) + rec["seconds"]
    lines.append(f"| **total** (wall clock of `signtrap.run`) | | **{total:.1f}** | |")
    lines += ["", "| stage kind | seconds | minutes |", "|---|---:|---:|"]
    lines += [f"| {kind} | {secs:.1f} | {secs / 60:.1f} |" for kind, secs in groups.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "badnets_stop_to_100.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. data.root=/data/gtsrb)")
    parser.add_argument("--runs-dir", help="where the fresh run directory goes (default: a new temporary folder)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)

    import signtrap
    import torch

    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="signtrap-pipeline-bench-"))
    before = load()
    try:
        cfg = signtrap.load_config(args.config, [*args.overrides, f"runs_dir={runs_dir}"])
        if Path(cfg.run_dir).exists():
            print(f"pipeline_bench: error: {cfg.run_dir} exists; give a --runs-dir without this run (every stage is timed "
                  "from scratch)", file=sys.stderr)
            return 2
        start = time.perf_counter()
        summary = signtrap.run(cfg)
        total = time.perf_counter() - start
    except signtrap.SigntrapError as exc:
        print(f"pipeline_bench: error: {exc}", file=sys.stderr)
        return 2
    record = json.loads((Path(summary["run"]) / "pipeline.json").read_text())
    lines = [f"`signtrap run {Path(args.config).name}` ({' '.join(args.overrides) or 'no overrides'}), run {summary['run']}",
             f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads in this "
             f"process, train.threads={cfg.train.threads}; load average (1/5/15 min) before {before}, after {load()}",
             "", *table(record["stages"], total)]
    if not summary["ok"]:
        lines.append("\nthe pipeline did not finish: " + "; ".join(f"{s['name']}: {s['reason']}" for s in summary["stages"]
                                                               if s["status"] in ("failed", "blocked")))
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
