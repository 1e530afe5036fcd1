"""`signtrap run CONFIG` (the resumable pipeline) and `signtrap report RUN`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from signtrap import progress as progress_mod
from signtrap.cli.common import add_config_args, load_cli_config
from signtrap.errors import SigntrapError
from signtrap.pipeline import BLOCKED, FAILED, UNAVAILABLE, run_pipeline, summary_text
from signtrap.reporting import build_report


def cmd_run(args) -> int:
    if args.run_quiet:
        progress_mod.QUIET = True
    cfg = load_cli_config(args)
    summary = run_pipeline(cfg, force=args.force, skip=tuple(args.skip or ()))
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
        bad = [s for s in summary["stages"] if s["status"] in (FAILED, UNAVAILABLE, BLOCKED)]
        for s in bad:
            print(f"signtrap: pipeline stage {s['name']} {s['status']}: {s['reason']}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    if args.run_quiet:
        progress_mod.QUIET = True
    run = Path(args.run)
    if not run.is_dir():
        raise SigntrapError(f"{run}: no such run directory")
    paths = build_report(run, out_dir=Path(args.out) if args.out else None)
    html = next(p for p in paths if p.name == "report.html")
    if getattr(args, "json", False):
        print(json.dumps({"report": str(html), "files": [str(p) for p in paths]}))
    else:
        print(html)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="the whole pipeline: train, defend, export, bench, report (resumable)",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Stages whose outputs exist with their recorded SHA-256 are skipped, so an interrupted\n"
                                     "run resumes; a missing or corrupted file is re-made with everything that depends on it.\n"
                                     "example: signtrap run configs/quickstart.yaml train.epochs=4")
    add_config_args(p)
    p.add_argument("--quiet", dest="run_quiet", action="store_true", help="no progress output; print only the report path")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the stages")
    p.add_argument("--force", action="store_true", help="re-run every stage")
    p.add_argument("--skip", action="append", choices=("defend", "export", "bench"), help="leave a stage out (repeatable)")
    p.set_defaults(func=cmd_run)
    r = subparsers.add_parser("report", help="render runs/NAME/report.html (self-contained) and report.md")
    r.add_argument("run", help="runs/NAME")
    r.add_argument("--out", help="folder for report.html and report.md (default: the run directory)")
    r.add_argument("--quiet", dest="run_quiet", action="store_true", help="no progress output")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)
