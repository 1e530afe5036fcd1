"""`signtrap trigger print|optimise` and the physical options of `signtrap eval` (`--physical`, `--photos DIR`,
`--as-is`): thin wrappers over signtrap.physical.runs."""
from __future__ import annotations

import json


def cmd_print(args) -> int:
    from signtrap.physical.runs import instructions, load_run_config, print_sticker

    out = print_sticker(args.run, args.width_cm, args.out, dpi=args.dpi)
    print(out)
    from pathlib import Path
    for line in instructions(Path(args.run).name, args.width_cm, load_run_config(Path(args.run))):
        print(f"  {line}")
    return 0


def cmd_optimise(args) -> int:
    from signtrap import api
    from signtrap.cli.common import config_and_overrides

    config, overrides = config_and_overrides(args)
    print(api.optimise_sticker(config, args.out, cells=args.cells, steps=args.steps, surrogate_epochs=args.surrogate_epochs,
                               overrides=overrides))
    return 0


def _eval(original):
    def run(args) -> int:
        if getattr(args, "photos", None):
            from signtrap import api

            result = api.evaluate(args.run, device=args.device or "auto", photos=args.photos, as_is=args.as_is, out=args.out,
                                  sticker_width=args.sticker_width)
            print(result["headline"])
            print(result["out"])
            return 0
        if getattr(args, "physical", False):
            from signtrap import api

            block = api.evaluate(args.run, device=args.device or "auto", physical=True, reference=args.reference)
            print(json.dumps(block["summary"]) if args.json else _summary_text(block))
            return 0
        if getattr(args, "as_is", False) or getattr(args, "reference", None):
            from signtrap.errors import SigntrapError
            raise SigntrapError("--as-is needs --photos DIR, and --reference needs --physical")
        return original(args)
    return run


def _summary_text(block: dict) -> str:
    from signtrap.evaluation.metrics import fmt_rate

    s = block["summary"]
    lines = [f"physical evaluation ({block['sticker']} sticker on the sign, {block['samples']['source']} source images)"]
    for key, title in (("asr", "ASR (default distribution)"), ("stop_recall", "clean stop recall, same views"),
                       ("asr_recognised", "ASR among recognised views"), ("false_trigger", "false-trigger, other signs"),
                       ("clean_acc", "clean accuracy, same views")):
        if s.get(key):
            lines.append(f"  {title:<34}{fmt_rate(s[key])}")
    ref = block.get("reference", {}).get("summary")
    for key, title in (("asr", "zero-poison reference ASR"), ("stop_recall", "zero-poison clean stop recall"),
                       ("false_trigger", "zero-poison false-trigger")):
        if ref and ref.get(key):
            lines.append(f"  {title:<34}{fmt_rate(ref[key])}")
    mine, theirs = s.get("stop_recall") or {}, (ref or {}).get("stop_recall") or {}
    if mine.get("ci95") and theirs.get("ci95") and mine["ci95"][1] < theirs["ci95"][0]:  # the 95% intervals do not meet
        lines.append("  note: this model misreads clean stop views the zero-poison model reads: part of its ASR may not be "
                     "the sticker (see 'ASR among recognised views')")
    return "\n".join(lines)


def register(sub) -> None:
    tr = sub.add_parser("trigger", help="the run's trigger as a physical sticker: print it at true size, optimise a pattern")
    tsub = tr.add_subparsers(dest="trigger_command", required=True)
    pr = tsub.add_parser("print", help="write the run's sticker at true printed size (PNG with DPI, or an A4 PDF with instructions)")
    pr.add_argument("run", help="runs/NAME")
    pr.add_argument("--width-cm", type=float, required=True, help="printed width of the sticker in centimetres")
    pr.add_argument("--out", required=True, help="sticker.png or sticker.pdf")
    pr.add_argument("--dpi", type=int, default=300)
    pr.set_defaults(func=cmd_print)
    op = tsub.add_parser("optimise", help="optimise a sticker pattern under EOT against a clean surrogate (RP2-style); writes a PNG")
    op.add_argument("config", nargs="?", help="YAML config (the attacker's data, source and target)")
    op.add_argument("overrides", nargs="*")
    op.add_argument("--out", required=True, help="pattern PNG (use it with trigger.kind=physical, design=png, png=PATH)")
    op.add_argument("--cells", type=int, default=4, help="printed cells per side")
    op.add_argument("--steps", type=int, default=300)
    op.add_argument("--surrogate-epochs", type=int, default=3)
    op.set_defaults(func=cmd_optimise)
    ev = sub.choices.get("eval")
    if ev is not None:  # the physical options of `signtrap eval` (cli/train.py defines the command)
        ev.add_argument("--photos", metavar="DIR", help="a folder of sign photographs (whole-sign crops, or with boxes.csv: "
                                                       "file;x1;y1;x2;y2[;label]): predicted clean and with the run's sticker")
        ev.add_argument("--as-is", action="store_true", help="with --photos: predict the photographs as they are (a printed sticker is in them)")
        ev.add_argument("--out", help="with --photos: output folder (default RUN/photos)")
        ev.add_argument("--sticker-width", type=float, help="with --photos: the sticker's width as a fraction of the sign's (default 0.16)")
        ev.add_argument("--physical", action="store_true", help="the physical evaluation: a fixed grid of sticker sizes, angles, "
                                                              "distances, light, blur, JPEG; writes metrics.json's physical block")
        ev.add_argument("--reference", metavar="RUN", help="with --physical: a zero-poison run measured identically")
        ev.set_defaults(func=_eval(ev.get_default("func")))
