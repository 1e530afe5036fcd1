"""`signtrap probe RUN_OR_DEFENCE_DIR [--reference RUN] [k=5 ...]`: removed, or only hidden?"""
from __future__ import annotations

import argparse
import json

from signtrap import api
from signtrap.probing.reactivation import format_table


def cmd_probe(args) -> int:
    record = api.probe(args.target, reference=args.reference, device=args.device, overrides=args.overrides)
    if args.json:
        print(json.dumps({k: record[k] for k in ("label", "verdict", "model", "reference", "ends")}))
    else:
        print(format_table([record]))
        print(f"{record['label']}: {record['verdict']['verdict']}: {record['verdict']['reason']}")
        print(record["file"])
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe", help="re-activation probe: fine-tune on the clean budget + k poisoned samples; removed or only hidden?",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The same probe runs on the zero-poison model of the same config (--reference RUN, else RUNS/NAME-zero,\n"
               "trained once on demand). Overrides: k, steps, lr, batch_size, weight_decay, augment, margin, max_clean_drop,\n"
               "reference, train_reference (the probe's settings), or the defend section's keys (clean_fraction=0.1).\n"
               "example: signtrap probe runs/NAME/defence-finetune --reference runs/NAME-zero k=5")
    p.add_argument("target", help="runs/NAME (the undefended model) or runs/NAME/defence-METHOD (a repaired model)")
    p.add_argument("overrides", nargs="*", help="k=5, steps=300, ... or defend-section keys")
    p.add_argument("--reference", help="the zero-poison run of the same config (attack.kind=none, same seed)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the probe record as JSON")
    p.set_defaults(func=cmd_probe)
