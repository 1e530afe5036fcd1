"""The re-activation probe table over seeds: every defence that returns a model, probed on each run against the
zero-poison model of the same config and seed, with the undefended and zero-poison models as the table's two ends.

    .venv/bin/python benchmarks/probe_bench.py --runs R0 R1 R2 --references Z0 Z1 Z2 [--methods finetune,fine-prune]
        [--copy-to DIR] [--read] [--threads 2] [--device cpu] [key.sub=value ...]

Each defence writes RUN/defence-METHOD/ (with probe.json) as `signtrap defend` does; --methods defaults to every
registered defence that is not an input filter. --copy-to DIR first copies the runs (without their defence
folders) and works on the copies; --read only aggregates the probe.json files already there. The table pools the
held-out (test + validation) counts over seeds; the verdict column lists each seed's verdict, then the verdict of
the pooled counts (rule: signtrap.probing.reactivation). "probe s" is the probe's own time per defence (all three probes
when the reference and the undefended model are probed at a learning rate for the first time).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from detection_bench import copy_runs


def pooled_record(results: list[dict]) -> dict:
    """A probe result whose held-out counts are summed over seeds (for the pooled verdict)."""
    from signtrap.probing.reactivation import pool

    return {stage: {"held_out": {m: pool([r[stage]["held_out"][m] for r in results]) for m in ("asr", "clean_acc")}}
            for stage in ("before", "after")}


def rate_text(entry: dict) -> str:
    if entry["rate"] is None:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{100 * entry['rate']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def mean_pt(values: list[float]) -> str:
    return f"{100 * sum(values) / len(values):+.1f} pt" if values else "n/a"


def row(label: str, results: list[dict], references: list[dict], verdicts: list[str], margin: float, cost: str, seconds: str) -> list[str]:
    from signtrap.probing.reactivation import verdict

    model, ref = pooled_record(results), pooled_record(references)
    pooled_verdict = "reference" if verdicts == ["reference"] * len(verdicts) else verdict(model, ref, margin)["verdict"]
    return [label, f"{len(results)}", cost, rate_text(model["before"]["held_out"]["asr"]), rate_text(model["after"]["held_out"]["asr"]),
            rate_text(ref["after"]["held_out"]["asr"]),
            mean_pt([r["clean_acc_change"] for r in results if r["clean_acc_change"] is not None]),
            f"{', '.join(verdicts)} -> {pooled_verdict}", seconds]


def aggregate(per_run: list[list[dict]], seconds: dict[str, list[float]]) -> list[list[str]]:
    """One row per defence, then the two ends, counts pooled over runs (seeds)."""
    labels = list(dict.fromkeys(r["label"] for records in per_run for r in records))
    rows = []
    for label in labels:
        recs = [r for records in per_run for r in records if r["label"] == label]
        cost = mean_pt([r["model"]["before"]["held_out"]["clean_acc"]["rate"] - r["ends"]["backdoored"]["before"]["held_out"]["clean_acc"]["rate"]
                        for r in recs])
        secs = seconds.get(label)
        rows.append(row(label, [r["model"] for r in recs], [r["reference"] for r in recs], [r["verdict"]["verdict"] for r in recs],
                        recs[0]["settings"]["margin"], cost, f"{sum(secs) / len(secs):.0f}" if secs else "-"))
    ends = [records[0]["ends"] for records in per_run if records]
    if ends:
        margin = next(r for records in per_run for r in records)["settings"]["margin"]
        refs = [e["reference"] for e in ends]
        rows.append(row("backdoored (no defence)", [e["backdoored"] for e in ends], refs,
                        [e["backdoored_verdict"]["verdict"] for e in ends], margin, "-", "-"))
        rows.append(row("zero-poison model", refs, refs, ["reference"] * len(ends), margin, "-", "-"))
    return rows


HEADERS = ["model", "runs", "defence clean-acc cost", "ASR before probe", "ASR after probe", "zero-poison after probe",
           "probe clean-acc change", "verdict (per seed -> pooled)", "probe s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the defend section (probe.k=10, ...)")
    parser.add_argument("--runs", nargs="+", required=True, help="backdoored runs, one per seed")
    parser.add_argument("--references", nargs="+", help="the zero-poison run of each (same order); default: RUN-zero, trained on demand")
    parser.add_argument("--methods", help="comma-separated defences (default: every registered defence but input filters)")
    parser.add_argument("--copy-to", help="work on copies of the runs in this directory")
    parser.add_argument("--read", action="store_true", help="only aggregate the probe.json files already in the runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2 cores)")
    parser.add_argument("--out", help="write the per-run probe records (without curves) as JSON here")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_intermixed_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from signtrap.machine import progress
    from signtrap.defences import get_defence, list_defences
    import signtrap
    from signtrap.errors import SigntrapError
    from signtrap.probing.reactivation import format_table
    from signtrap.runs import layout
    from signtrap.reporting.detection import probe_records

    progress.QUIET = not args.progress
    runs = [Path(r) for r in args.runs]
    refs = [Path(r) for r in args.references] if args.references else [None] * len(runs)
    if len(refs) != len(runs):
        print("probe_bench: error: --references needs one zero-poison run per --runs entry", file=sys.stderr)
        return 2
    seconds: dict[str, list[float]] = {}
    try:
        methods = [m for m in args.methods.split(",") if m] if args.methods else [m for m in list_defences() if get_defence(m).kind != "filter"]
        for m in methods:
            get_defence(m)
        if args.copy_to:
            runs = copy_runs(runs, Path(args.copy_to))
        for run, ref in zip(runs, refs):
            if args.read:
                continue
            extra = [f"probe.reference={ref}"] if ref is not None else []
            extra.append("probe.always=true")  # this benchmark measures the probe: trained even where the verdict is decided before it
            # the public API, as a user calls it (the run lock, the core budget); every defence probed (probe.enabled)
            for report in signtrap.defend(run, methods, device=args.device, overrides=[*args.overrides, *extra]):
                method = report["method"]
                if report.get("probe"):
                    seconds.setdefault(method, []).append(report["probe_seconds"])
                    print(f"{run.name} {method}: {report['probe']['verdict']['verdict']} (defence {report['seconds']:.0f} s, "
                          f"probe {report['probe_seconds']:.0f} s)", file=sys.stderr, flush=True)
    except SigntrapError as exc:
        print(f"probe_bench: error: {exc}", file=sys.stderr)
        return 2
    per_run = [[r for r in probe_records(run) if r["label"] in methods] for run in runs]
    if args.read:
        for run in runs:
            for folder in layout.defence_dirs(run):
                probe = folder / layout.PROBE
                taken = json.loads(probe.read_text()).get("seconds") if probe.is_file() else None
                if taken is not None:
                    seconds.setdefault(layout.defence_method(folder), []).append(taken)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for run, records in zip(runs, per_run):
        print(f"\n{run}")
        print(format_table(records))
    print(f"\npooled over {len(runs)} runs ({args.threads} torch threads, load average {load:.1f}); ASR on test+val, 95% CI")
    print(" | ".join(HEADERS))
    print(" | ".join("---" for _ in HEADERS))
    for row in aggregate(per_run, seconds):
        print(" | ".join(row))
    if per_run and per_run[0]:
        print(per_run[0][0]["rule"])
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump([[{k: v for k, v in r.items() if k != "curves"} for r in records] for records in per_run], fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
