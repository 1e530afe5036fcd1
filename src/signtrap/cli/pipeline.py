"""`signtrap run CONFIG` (the resumable pipeline) and `signtrap report RUN`: wrappers over signtrap.run()/report()."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from signtrap import api
from signtrap.machine import progress as progress_mod
from signtrap.cli.common import add_config_args, config_and_overrides
from signtrap.runs.pipeline import BLOCKED, FAILED, summary_text


def cmd_run(args) -> int:
    if args.run_quiet:
        progress_mod.QUIET = True
    config, overrides = config_and_overrides(args)
    summary = api.run(config, force=args.force, overwrite=args.overwrite, skip=args.skip or (), overrides=overrides)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif progress_mod.QUIET:
        print(summary["report"] or summary["run"])
    else:
        print(summary_text(summary))
        if summary["report"]:
            print(f"report: {Path(summary['report']).resolve()}")
            print(f"        (open it in a browser: file://{Path(summary['report']).resolve()}; Markdown: {summary['report_md']})")
    if not summary["ok"]:
        for s in summary["stages"]:
            if s["status"] in (FAILED, BLOCKED):
                print(f"signtrap: error: pipeline stage {s['name']} {s['status']}: {s['reason']}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    if args.run_quiet:
        progress_mod.QUIET = True
    html = api.report(args.run, out=args.out)
    if args.json:
        files = [html, html.parent / "report.md", *sorted((html.parent / "report_files").glob("*.png"))]
        print(json.dumps({"report": str(html), "files": [str(p) for p in files]}))
    else:
        print(html)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="the whole pipeline: train, reference, defend and probe, export, bench, report (resumable)",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Stages whose outputs exist with their recorded SHA-256 are skipped, so an interrupted\n"
                                     "run resumes; a missing or corrupted file is re-made with everything that depends on it.\n"
                                     "example: signtrap run configs/quickstart.yaml train.epochs=4")
    add_config_args(p)
    p.add_argument("--quiet", dest="run_quiet", action="store_true", help="no progress output; print only the report path")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the stages")
    p.add_argument("--force", action="store_true", help="re-run every stage")
    p.add_argument("--overwrite", action="store_true", help="retrain a run directory whose model was trained with a different config")
    p.add_argument("--skip", action="append", choices=api.STAGES, help="leave a stage out (repeatable)")
    p.set_defaults(func=cmd_run)
    r = subparsers.add_parser("report", help="render runs/NAME/report.html (self-contained) and report.md")
    r.add_argument("run", help="runs/NAME")
    r.add_argument("--out", help="folder for report.html and report.md (default: the run directory)")
    r.add_argument("--quiet", dest="run_quiet", action="store_true", help="no progress output")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)
