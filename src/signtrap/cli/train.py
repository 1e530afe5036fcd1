"""`signtrap train` and `signtrap eval`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from signtrap import progress as progress_mod
from signtrap.cli.common import add_config_args, load_cli_config
from signtrap.evaluation import evaluate_run
from signtrap.metrics import summary_table
from signtrap.training import train


def cmd_train(args) -> int:
    extra = [f"name={args.name}"] if args.name else []
    if args.device:
        extra.append(f"device={args.device}")
    cfg = load_cli_config(args, extra)
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from rank 0
        print(run_dir)
    return 0


def cmd_eval(args) -> int:
    metrics = evaluate_run(Path(args.run), device=args.device or "auto")
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
    tr.add_argument("--resume", action="store_true", help="continue from the run's last epoch checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing trained run")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="evaluate a run's checkpoint: clean accuracy, ASR, stop recall, false-trigger rate")
    ev.add_argument("run", help="runs/NAME (or a defence folder inside it)")
    ev.add_argument("--device")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)
