"""The table that answers "does anything remove it?" (issue 23): attack x defence, one line per seed in each cell
-- clean-accuracy change (test / validation, points), ASR after the defence (test and validation counts) and the
re-activation probe's verdict -- read from defended runs; nothing is trained or defended here. For a physical sticker's
run, also its physical ASR on the default views after the defence and before it (metrics.json's `physical` block).

    .venv/bin/python benchmarks/persistence_table.py RUN [RUN ...] [--bound 1.0] [--markdown table.md]

Each RUN is a trained run with `signtrap defend RUN --method ...` done (its defence-METHOD/report.json and, when
probed, probe.json); the repairing defences are tabled (detectors and filters change no model). Runs are grouped into attacks by their config (attack kind, persistence procedure, trigger);
seeds come from each run's config. A cell whose verdict is *removed* with both clean changes within the bound is
the headline the issue asks to verify (every seed, several probe strengths): the script lists such cells last.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def attack_of(run: Path) -> str:
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    a, t = cfg.get("attack") or {}, cfg.get("trigger") or {}
    name = {"source_specific": "BadNets stop -> 100", "all_to_one": "BadNets all-to-one", "none": "zero poison"}.get(a.get("kind"), a.get("kind"))
    if a.get("persist", "none") not in (None, "none"):
        name = f"{a['persist'].upper()} ({name})"
    if a.get("kind") == "source_specific" and not a.get("cover_rate"):
        name += ", no cover"
    if t.get("placement") not in (None, "corner") or t.get("kind") not in (None, "checkerboard"):
        name += ", " + " ".join(str(v) for v in (t.get("kind"), t.get("placement")) if v)
    return name


def change(report: dict, split: str) -> float | None:
    try:
        return 100 * (report["after"][split]["clean_acc"]["rate"] - report["before"][split]["clean_acc"]["rate"])
    except (KeyError, TypeError):
        return None


def counts(report: dict, split: str) -> str:
    entry = ((report.get("after") or {}).get(split) or {}).get("asr") or {}
    return f"{entry['k']}/{entry['n']}" if entry.get("n") else "n/a"


def cell(run: Path, folder: Path) -> tuple[str, dict]:
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    probe_path = folder / "probe.json"
    probe = json.loads(probe_path.read_text(encoding="utf-8")) if probe_path.is_file() else None
    verdict = (probe or {}).get("verdict", {}).get("verdict") if probe else (
        "probe not run" if report.get("probe_skipped") else ("no model changed" if not report.get("repaired_model") else "not probed"))
    test, val = change(report, "test"), change(report, "val")
    fmt = lambda x: "n/a" if x is None else f"{x:+.2f}"  # noqa: E731
    seed = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")).get("seed")
    text = f"s{seed}: {fmt(test)} / {fmt(val)}; ASR {counts(report, 'test')}, {counts(report, 'val')}; {verdict}"
    road = physical_asr(folder)
    if road:
        text += f"; on the road {road} (before {physical_asr(run) or 'n/a'})"
    return text, {"seed": seed, "test": test, "val": val, "verdict": verdict}


def physical_asr(folder: Path) -> str | None:
    """A physical sticker's model: its physical ASR on the default views (metrics.json's physical block), k/n."""
    path = folder / "metrics.json"
    block = json.loads(path.read_text(encoding="utf-8")).get("physical") if path.is_file() else None
    entry = ((block or {}).get("summary") or {}).get("asr") or {}
    return f"{entry['k']}/{entry['n']}" if entry.get("n") else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--bound", type=float, default=1.0, help="clean-accuracy bound, points (default 1)")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    table: dict[str, dict[str, list[tuple[str, dict]]]] = {}
    attacks: list[str] = []
    for run in args.runs:
        if not (run / "config.yaml").is_file():
            print(f"persistence_table: {run}: not a run directory (no config.yaml)", file=sys.stderr)
            return 2
        attack = attack_of(run)
        attacks.append(attack) if attack not in attacks else None
        for folder in sorted(run.glob("defence-*")):
            if (folder / "report.json").is_file() and json.loads((folder / "report.json").read_text(encoding="utf-8")).get("kind") == "repair":
                table.setdefault(folder.name[len("defence-"):], {}).setdefault(attack, []).append(cell(run, folder))
    if not table:
        print("persistence_table: no defence folder with a report.json in the runs given", file=sys.stderr)
        return 2
    lines = ["| defence | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for method, by_attack in table.items():
        cells = ["<br>".join(text for text, _ in sorted(by_attack.get(a, []), key=lambda c: c[1]["seed"])) or "-" for a in attacks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print("clean change test / val (points); ASR after, test and val counts; probe verdict (physical runs: ASR on the road)\n")
    print(text)
    removed = [(m, a, c) for m, by in table.items() for a, cs in by.items() for _, c in cs
               if c["verdict"] == "removed" and all(x is not None and x >= -args.bound for x in (c["test"], c["val"]))]
    print("\nremoved within the bound: " + (", ".join(f"{m} on {a} seed {c['seed']}" for m, a, c in removed) or "none"))
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
