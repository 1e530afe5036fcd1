"""`signtrap defend RUN --method NAME|all [key.sub=value ...]`: repair or filter a trained run, compare defences."""
from __future__ import annotations

import argparse
import json

from signtrap import api
from signtrap.defences import list_defences
from signtrap.defences.run import comparison_table
from signtrap.runs import layout


def cmd_defend(args) -> int:
    # --method takes one or more names (or NAME,NAME); key.sub=value overrides may follow them
    methods = [a for a in args.method if "=" not in a]
    more = [a for a in args.method if "=" in a]
    reports = api.defend(args.run, methods, device=args.device, overrides=[*args.overrides, *more])
    if args.json:
        print(json.dumps([{k: r[k] for k in ("method", "seconds", "before", "after", "repaired_model")} for r in reports]))
    else:
        print(comparison_table(reports))
        for r in reports:
            print(layout.defence_dir(r["run"], r["method"]))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("defend", help="apply defences to a trained run and measure whether the backdoor persists",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=f"methods: {', '.join(list_defences())}, or all (the config's defend.methods)\n"
                                     "example: signtrap defend runs/NAME --method finetune finetune.epochs=3 clean_fraction=0.1")
    p.add_argument("run", help="runs/NAME: a trained run directory")
    p.add_argument("--method", required=True, nargs="+", metavar="NAME",
                   help="one or more registered defences (NAME NAME or NAME,NAME), or 'all' (key.sub=value overrides may follow)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the defend section")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the before/after metrics as JSON")
    p.set_defaults(func=cmd_defend)
