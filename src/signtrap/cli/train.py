"""`signtrap train` and `signtrap eval`: thin wrappers over signtrap.train() and signtrap.evaluate()."""
from __future__ import annotations

import json
import os

from signtrap import api
from signtrap.machine import progress as progress_mod
from signtrap.cli.common import add_config_args, config_and_overrides
from signtrap.evaluation.metrics import summary_table


def cmd_train(args) -> int:
    config, overrides = config_and_overrides(args)
    if args.name:
        overrides.append(f"name={args.name}")
    if args.device:
        overrides.append(f"device={args.device}")
    run = api.train(config, resume=args.resume, overwrite=args.overwrite, overrides=overrides)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from rank 0
        print(run.dir)
    return 0


def cmd_eval(args) -> int:
    metrics = api.evaluate(args.run, device=args.device or "auto")
    if args.json:
        print(json.dumps({s: {k: metrics[s][k] for k in ("clean_acc", "asr", "stop_recall", "false_trigger")} for s in ("test", "val")}))
    elif progress_mod.QUIET:
        print(summary_table({s: metrics[s] for s in ("test", "val")}))
    return 0


def register(sub) -> None:
    tr = sub.add_parser("train", help="train a (backdoored) classifier into runs/NAME")
    add_config_args(tr)
    tr.add_argument("--name", help="run name (default: the config's name)")
    tr.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch checkpoint (last.pt)")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the run directory's run (its model, metrics, defence outputs, export and report); "
                         "files signtrap did not make are left alone")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="evaluate a run's checkpoint: clean accuracy, ASR, stop recall, false-trigger rate")
    ev.add_argument("run", help="runs/NAME (or a defence folder inside it)")
    ev.add_argument("--device")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)
