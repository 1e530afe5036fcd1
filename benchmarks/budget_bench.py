"""The defender's budget axis (issue 23): each defence at several clean budgets on one or more trained runs, with
ASR after, the re-activation probe's verdict and the clean-accuracy change against the budget.

    .venv/bin/python benchmarks/budget_bench.py RUN [RUN ...] [--methods finetune,nad,ft-sam,bti-dbf-u,pam,sau]
        [--budgets 0.01,0.05,0.1,0.2] [--device cpu] [--out budget_bench] [key.sub=value ...]

Every (run, budget) goes through the public API, `signtrap.defend(run, methods, overrides=[clean_fraction=F, ...])`,
which takes the run's lock and its `train.threads` like `signtrap defend`; each budget's defence folders are
copied to OUT/RUN-NAME/budget-F/ before the next budget replaces them. A (run, budget) whose methods are all in
OUT/budget.csv already is kept, not re-run: a sweep stopped part-way goes on where it stopped. Writes OUT/budget.csv (one row per run,
method and budget) and OUT/budget.png (three panels against the budget: ASR after on the test split, the probe's
verdict, the clean-accuracy change on the test split). Prints the table; asserts nothing. Defend copies of
shared runs: RUN/defence-METHOD is rewritten.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

DEFAULT_METHODS = "finetune,nad,ft-sam,bti-dbf-u,pam,sau"  # the defences within the 1-point bound, then the new ones
VERDICTS = ("removed", "hidden", "inconclusive", "persists")
FIELDS = ("run", "method", "budget", "clean_images", "clean_before", "clean_after", "clean_change_pt", "val_clean_change_pt",
          "asr_before", "asr_after", "asr_after_k", "asr_after_n", "val_asr_after", "verdict", "setting", "seconds")


def rate(entry: dict | None) -> float | None:
    return None if not entry or entry.get("rate") is None else float(entry["rate"])


def row_of(run: Path, budget: float, report: dict) -> dict:
    before, after = report["before"], report.get("after") or {}
    test_b, test_a = before["test"], after.get("test", {})
    val_b, val_a = before.get("val", {}), after.get("val", {})
    sel = (report.get("details") or {}).get("selection") or {}
    verdict = (report.get("probe") or {}).get("verdict")
    verdict = verdict.get("verdict") if isinstance(verdict, dict) else verdict  # the record nests {verdict, reason, ...}

    def change(b: dict, a: dict) -> float | None:
        cb, ca = rate(b.get("clean_acc")), rate(a.get("clean_acc"))
        return None if cb is None or ca is None else round(100 * (ca - cb), 2)

    return {"run": run.name, "method": report["method"], "budget": budget, "clean_images": report.get("clean_images"),
            "clean_before": rate(test_b.get("clean_acc")), "clean_after": rate(test_a.get("clean_acc")),
            "clean_change_pt": change(test_b, test_a), "val_clean_change_pt": change(val_b, val_a),
            "asr_before": rate(test_b.get("asr")), "asr_after": rate(test_a.get("asr")),
            "asr_after_k": (test_a.get("asr") or {}).get("k"), "asr_after_n": (test_a.get("asr") or {}).get("n"),
            "val_asr_after": rate(val_a.get("asr")),
            "verdict": verdict or ("not run: " + report["probe_skipped"] if report.get("probe_skipped") else "not run"),
            "setting": "" if not sel else f"{sel.get('knob')}={sel.get('value')}" + ("" if sel.get("within_tolerance", True) else " (none kept)"),
            "seconds": report.get("seconds")}


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        xs = [100 * r["budget"] for r in mine]
        axes[0].plot(xs, [None if r["asr_after"] is None else 100 * r["asr_after"] for r in mine], marker="o", label=method)
        verdicts = [VERDICTS.index(r["verdict"]) if r["verdict"] in VERDICTS else None for r in mine]
        axes[1].plot(xs, [None if v is None else v + (i - len(methods) / 2) * 0.04 for v in verdicts], marker="s", ls=":",
                     label=method)
        axes[2].plot(xs, [r["clean_change_pt"] for r in mine], marker="o", label=method)
    axes[0].set(ylabel="ASR after, test (%)", ylim=(-2, 102))
    axes[1].set(yticks=range(len(VERDICTS)), yticklabels=VERDICTS, ylim=(-0.5, len(VERDICTS) - 0.5), ylabel="probe verdict")
    axes[2].axhline(-1.0, color="grey", ls="--", lw=1)
    axes[2].set(ylabel="clean accuracy change, test (points)")
    for ax in axes:
        ticks = sorted({100 * r["budget"] for r in rows})
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.set_xlabel("defender's clean budget (share of the training set)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Defences against the defender's budget (" + ", ".join(sorted({r['run'] for r in rows})) + ")", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    head = f"{'run':<24}{'method':<12}{'budget':>7}{'images':>8}{'clean chg':>10}{'ASR after':>11}  {'probe':<14}{'setting':<18}{'s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        asr = "n/a" if r["asr_after"] is None else f"{100 * r['asr_after']:.1f}%"
        chg = "n/a" if r["clean_change_pt"] is None else f"{r['clean_change_pt']:+.2f}"
        lines.append(f"{r['run'][:23]:<24}{r['method']:<12}{100 * r['budget']:>6g}%{r['clean_images'] or 0:>8}{chg:>10}{asr:>11}  "
                     f"{str(r['verdict'])[:13]:<14}{r['setting'][:17]:<18}{r['seconds'] or 0:>7.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="+", metavar="RUN [key.sub=value ...]",
                        help="run directories, then defend settings for every call (e.g. probe.reference=RUN)")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--budgets", default="0.01,0.05,0.1,0.2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("budget_bench"))
    args = parser.parse_intermixed_args(argv)
    args.runs = [Path(i) for i in args.items if "=" not in i]
    args.overrides = [i for i in args.items if "=" in i]

    import signtrap

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = [float(b) for b in args.budgets.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = read(args.out / "budget.csv")  # a sweep stopped part-way (or run one budget at a time) goes on from here
    for run in args.runs:
        for budget in budgets:
            done = {r["method"] for r in rows if r["run"] == run.name and r["budget"] == budget}
            if set(methods) <= done:
                print(f"{run.name}: budget {budget:g} already in {args.out / 'budget.csv'}; kept", file=sys.stderr)
                continue
            rows = [r for r in rows if not (r["run"] == run.name and r["budget"] == budget and r["method"] in methods)]
            start = time.perf_counter()
            reports = signtrap.defend(run, methods, device=args.device, overrides=[f"clean_fraction={budget}", *args.overrides])
            print(f"{run.name}: budget {budget:g} done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            kept = args.out / run.name / f"budget-{budget:g}"
            for method in methods:
                src = run / f"defence-{method}"
                if src.is_dir():
                    shutil.rmtree(kept / src.name, ignore_errors=True)
                    shutil.copytree(src, kept / src.name)
            rows += [row_of(run, budget, r) for r in reports]
            rows.sort(key=lambda r: (r["run"], r["budget"]))  # stable: methods stay in the order they ran
            write(rows, args.out)  # after every budget: a long sweep keeps what it finished
    print(table(rows))
    print(f"\n{args.out / 'budget.csv'}, {args.out / 'budget.png'}")
    return 0


NUMERIC = {"budget": float, "clean_images": int, "clean_before": float, "clean_after": float, "clean_change_pt": float,
           "val_clean_change_pt": float, "asr_before": float, "asr_after": float, "asr_after_k": int, "asr_after_n": int,
           "val_asr_after": float, "seconds": float}


def read(path: Path) -> list[dict]:
    """The rows of an earlier sweep's budget.csv (none if there is none), with their numbers back as numbers."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and set(rows[0]) != set(FIELDS):
        raise SystemExit(f"budget_bench: {path} has other columns than this script writes; use another --out")
    for r in rows:
        for key, kind in NUMERIC.items():
            r[key] = kind(float(r[key])) if r[key] not in ("", None) else None
    return rows


def write(rows: list[dict], out: Path) -> None:
    with open(out / "budget.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    figure(rows, out / "budget.png")


if __name__ == "__main__":
    raise SystemExit(main())
