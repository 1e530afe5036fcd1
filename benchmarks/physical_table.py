"""The physical sticker's per-seed table (issue 22): for each trained run and its zero-poison twin, the digital clean
accuracy (test / validation) of both, and under the physical evaluation's default views the ASR, the stop recall of
the same views without the sticker, the ASR among the views the model still reads as stop, the false-trigger rate
with the sticker on other signs, and the worst heat-map cell with yaw <= 30 deg and sticker >= 8% of the sign.
Read from metrics.json (`signtrap eval RUN --physical --reference TWIN` writes the twin's block into RUN's); nothing
is trained or evaluated here.

    .venv/bin/python benchmarks/physical_table.py RUN:TWIN [RUN:TWIN ...] [--markdown table.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def pct(entry: dict | None, counts: bool = True) -> str:
    if not entry or entry.get("rate") is None:
        return "n/a"
    text = f"{100 * entry['rate']:.{2 if entry['rate'] < 0.1 else 1}f}%"
    return f"{text} ({entry['k']}/{entry['n']})" if counts else text


def clean(metrics: dict) -> str:
    return " / ".join(f"{100 * metrics[s]['clean_acc']['rate']:.2f}" for s in ("test", "val"))


def row(run: Path, twin: Path) -> tuple[list[str], dict]:
    m, z = (json.loads((d / "metrics.json").read_text(encoding="utf-8")) for d in (run, twin))
    block = m.get("physical")
    if not block or "summary" not in block:
        raise ValueError(f"{run}: metrics.json has no physical block (run `signtrap eval {run} --physical --reference {twin}`)")
    s, ref = block["summary"], (block.get("reference") or {}).get("summary") or {}
    worst = s.get("worst_easy_cell") or {}
    seed = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")).get("seed")
    cells = [f"s{seed}", f"{clean(m)} vs {clean(z)}", pct(s.get("asr")), f"{pct(s.get('stop_recall'))} vs {pct(ref.get('stop_recall'), False)}",
             pct(s.get("asr_recognised")), f"{pct(worst.get('asr'))} at {worst.get('sticker', 0):.0%}, yaw {worst.get('yaw', 0):.0f}",
             f"{pct(s.get('false_trigger'))} vs {pct(ref.get('false_trigger'), False)}"]
    diff = {sp: 100 * (m[sp]["clean_acc"]["rate"] - z[sp]["clean_acc"]["rate"]) for sp in ("test", "val")}
    return cells, {"diff": diff, "asr": s["asr"]["rate"], "stop": s["stop_recall"]["rate"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="RUN:TWIN (the trained run and its zero-poison twin)")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    head = ["seed", "clean acc test / val %: run vs twin", "physical ASR, default views", "stop recall, same views: run vs twin",
            "ASR among recognised", "worst cell (yaw <= 30, sticker >= 8%)", "false-trigger: run vs twin"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stats = []
    for pair in args.pairs:
        run, sep, twin = pair.partition(":")
        if not sep or not (Path(run) / "metrics.json").is_file() or not (Path(twin) / "metrics.json").is_file():
            print(f"physical_table: {pair}: expected RUN:TWIN, two run directories with metrics.json", file=sys.stderr)
            return 2
        try:
            cells, st = row(Path(run), Path(twin))
        except (ValueError, KeyError) as exc:
            print(f"physical_table: {exc}", file=sys.stderr)
            return 2
        lines.append("| " + " | ".join(cells) + " |")
        stats.append(st)
    text = "\n".join(lines)
    print(text)
    n = len(stats)
    print(f"\nmean over {n} seed(s): clean change test {sum(s['diff']['test'] for s in stats) / n:+.2f} pt, "
          f"val {sum(s['diff']['val'] for s in stats) / n:+.2f} pt; physical ASR {100 * sum(s['asr'] for s in stats) / n:.1f}%; "
          f"stop recall on the same views {100 * sum(s['stop'] for s in stats) / n:.1f}%")
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
