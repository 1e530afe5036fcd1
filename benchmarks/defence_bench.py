"""The defence table: every defence on one or more trained runs (seeds), with clean accuracy and ASR before
and after (test and validation, 95% Wilson intervals on the pooled counts), stop recall, false-trigger
rate, the setting the held-out rule chose, seconds, and the mean over runs.

    .venv/bin/python benchmarks/defence_bench.py RUN [RUN ...] [--methods finetune,anp] [--threads 2]
        [--device cpu] [--reuse] [--out bench.json] [--markdown table.md] [key.sub=value ...]

Each defence writes RUN/defence-METHOD/ exactly as `signtrap defend` does (so `signtrap report RUN` shows
its trade-off curve); with --reuse, a run's existing defence-METHOD/report.json is read instead of
defending again. Runs are never modified otherwise; defend copies of shared runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

METRICS = ("clean_acc", "asr", "stop_recall", "false_trigger")


def pooled(entries: list[dict]) -> dict:
    """Counts summed over runs, with the Wilson interval of the pooled rate."""
    from signtrap.evaluation.metrics import wilson

    k = sum(e["k"] for e in entries if e and e.get("n"))
    n = sum(e["n"] for e in entries if e and e.get("n"))
    return {"rate": k / n if n else None, "k": k, "n": n, "ci95": wilson(k, n)}


def pct(entry: dict | None, ci: bool = False) -> str:
    if not entry or entry.get("rate") is None:
        return "n/a"
    text = f"{100 * entry['rate']:.2f}%"
    if ci and entry.get("ci95"):
        lo, hi = entry["ci95"]
        text += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return text


def setting(report: dict) -> str:
    sel = (report.get("details") or {}).get("selection") or {}
    if not sel:
        return ""
    text = f"{sel['knob']}={sel['value']:g}"
    return text + (" fixed" if sel.get("fixed") else "" if sel.get("within_tolerance") else " (none kept)")


def summarise(method: str, reports: list[dict]) -> dict:
    """One table row: pooled before/after per split, per-run clean-accuracy changes, settings, seconds."""
    row = {"method": method, "runs": len(reports), "seconds": [r["seconds"] for r in reports], "settings": [setting(r) for r in reports]}
    for split in ("test", "val"):
        for when in ("before", "after"):
            for key in METRICS:
                row[f"{split}_{key}_{when}"] = pooled([((r.get(when) or {}).get(split) or {}).get(key) for r in reports])
        deltas = []
        for r in reports:
            b, a = r["before"][split]["clean_acc"]["rate"], ((r.get("after") or {}).get(split) or {}).get("clean_acc", {}).get("rate")
            deltas.append(None if a is None else round(100 * (a - b), 2))
        row[f"{split}_clean_acc_change_pt"] = deltas
        known = [d for d in deltas if d is not None]
        row[f"{split}_clean_acc_change_mean_pt"] = round(sum(known) / len(known), 2) if known else None
    return row


def table(rows: list[dict]) -> str:
    head = ("| method | clean acc before → after (test, pooled) | change, pt (test mean; per run) | change, pt (val mean) "
            "| ASR before → after (test) | ASR after (val) | stop recall after | false-trigger after | setting | seconds |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per_run = ", ".join("n/a" if d is None else f"{d:+.2f}" for d in r["test_clean_acc_change_pt"])
        mean_t, mean_v = r["test_clean_acc_change_mean_pt"], r["val_clean_acc_change_mean_pt"]
        lines.append(
            f"| {r['method']} | {pct(r['test_clean_acc_before'])} → {pct(r['test_clean_acc_after'], ci=True)} "
            f"| {'n/a' if mean_t is None else f'{mean_t:+.2f}'} ({per_run}) | {'n/a' if mean_v is None else f'{mean_v:+.2f}'} "
            f"| {pct(r['test_asr_before'])} → {pct(r['test_asr_after'], ci=True)} | {pct(r['val_asr_after'])} "
            f"| {pct(r['test_stop_recall_after'])} | {pct(r['test_false_trigger_after'])} | {'; '.join(s for s in r['settings'] if s)} "
            f"| {sum(r['seconds']) / max(1, len(r['seconds'])):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="runs/NAME directories (seeds of one config), then key.sub=value overrides")
    parser.add_argument("--methods", default="all", help="comma-separated defences (default: each run's defend.methods)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2 cores)")
    parser.add_argument("--reuse", action="store_true", help="read existing defence-METHOD/report.json instead of defending")
    parser.add_argument("--out", help="write the table rows and every report's summary as JSON here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_intermixed_args(argv)
    runs = [a for a in args.runs if "=" not in a]
    overrides = [a for a in args.runs if "=" in a]

    import torch

    torch.set_num_threads(args.threads)
    import signtrap
    from signtrap.defences.run import comparison_table, resolve_methods
    from signtrap.errors import SigntrapError
    from signtrap.experiment import load_run_config
    from signtrap.runs import layout

    by_method: dict[str, list[dict]] = {}
    try:
        for run in runs:
            methods = resolve_methods(args.methods, load_run_config(Path(run))) if args.methods == "all" else args.methods.split(",")
            if args.reuse:
                reports = []
                for m in methods:
                    path = layout.defence_dir(run, m) / layout.REPORT_JSON
                    if not path.is_file():
                        raise SigntrapError(f"{path}: not found (run without --reuse to defend)")
                    reports.append(json.loads(path.read_text(encoding="utf-8")))
            else:
                start = time.perf_counter()  # the public API, as a user calls it: the run lock, the core budget
                reports = signtrap.defend(run, methods, device=args.device, overrides=overrides)
                for r in reports:
                    print(f"  {r['method']}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
                print(f"{run}: {len(methods)} defences in {time.perf_counter() - start:.1f} s (data loading included)", file=sys.stderr)
            print(f"\n{run}\n{comparison_table(reports)}")
            for r in reports:
                by_method.setdefault(r["method"], []).append(r)
    except SigntrapError as exc:
        print(f"defence_bench: error: {exc}", file=sys.stderr)
        return 2
    rows = [summarise(m, reps) for m, reps in by_method.items()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = table(rows)
    if args.reuse:
        print(f"\n{len(runs)} run(s); figures and seconds as recorded in each defence-METHOD/report.json "
              "(timings measured while the machine was busy are not final figures)\n")
    else:
        print(f"\n{len(runs)} run(s); {args.threads} torch threads on {args.device}; load average {load:.1f} at the end "
              "(timings measured while the machine was busy are not final figures)\n")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    if args.out:
        keep = ("method", "run", "seconds", "before", "after", "settings")
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "reports": [{**{k: r.get(k) for k in keep}, "selection": (r.get("details") or {}).get("selection")}
                                                 for reps in by_method.values() for r in reps]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
