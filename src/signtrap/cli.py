"""The `signtrap` command line: thin wrappers over the library; user errors become one line and exit 2."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from signtrap import progress as progress_mod
from signtrap.errors import SigntrapError

# Later stages add their subcommands through a `register(subparsers)` function in these modules.
COMMAND_MODULES = ("signtrap.defences.cli", "signtrap.deploy.cli", "signtrap.pipeline", "signtrap.sweep")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (default: built-in defaults, SynthSigns)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3")


def split_config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """A first positional containing '=' is an override, not a config path."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).is_file():
        return None, [config, *overrides]
    return config, overrides


def load_cli_config(args: argparse.Namespace, extra: list[str] = ()):
    from signtrap.config import load_config

    config, overrides = split_config_args(args)
    return load_config(config, [*overrides, *extra])


# ---------------------------------------------------------------- data


def data_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in (("source", "data.source"), ("root", "data.root"), ("per_class", "data.synth_per_class"),
                      ("size", "data.size"), ("cache_dir", "data.cache_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    if getattr(args, "roi", False):
        out.append("data.roi=true")
    if getattr(args, "skip_corrupt", False):
        out.append("data.skip_corrupt=true")
    if getattr(args, "root", None) and not getattr(args, "source", None):
        out.append("data.source=gtsrb")
    return out


def cmd_data_fetch(args) -> int:
    from signtrap.data.fetch import fetch

    for path in fetch(Path(args.root)):
        print(path)
    return 0


def cmd_data_prepare(args) -> int:
    from signtrap.data.cache import open_cache, prepare

    cfg = load_cli_config(args, data_overrides(args))
    path = prepare(cfg.data, force=args.force)
    data = open_cache(path)
    print(f"cache {path}: {data.meta['rows']} images ({data.meta['train_rows']} train, {data.meta['test_rows']} test), "
          f"{data.meta.get('skipped', 0)} skipped, prepared in {data.meta['prepare_seconds']} s")
    return 0


def cmd_data_info(args) -> int:
    from signtrap.classes import CLASS_NAMES
    from signtrap.data.cache import load

    cfg = load_cli_config(args, data_overrides(args))
    data = load(cfg.data)
    splits = data.splits(cfg.data.val_fraction, cfg.seed)
    counts = {name: np.bincount(data.labels[rows], minlength=len(CLASS_NAMES)) for name, rows in
              (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    if args.json:
        print(json.dumps({"cache": str(data.path), "source": data.meta["source"], "data_hash": data.data_hash,
                          "splits": splits.sizes(), "per_class": {k: v.tolist() for k, v in counts.items()}}, indent=2))
        return 0
    print(f"cache: {data.path}\nsource: {data.meta['source']}  images: {len(data)}  size: {data.size}px  data hash: {data.data_hash[:16]}")
    print(f"{'id':>3} {'class':<52}{'train':>7}{'val':>7}{'test':>7}")
    for c, name in enumerate(CLASS_NAMES):
        print(f"{c:>3} {name:<52}{counts['train'][c]:>7}{counts['val'][c]:>7}{counts['test'][c]:>7}")
    sizes = splits.sizes()
    print(f"{'':>3} {'total':<52}{sizes['train']:>7}{sizes['val']:>7}{sizes['test']:>7}")
    return 0


def cmd_data_preview(args) -> int:
    from signtrap.data.cache import load
    from signtrap.data.preview import preview_grid, write_png

    cfg = load_cli_config(args, data_overrides(args))
    data = load(cfg.data)
    write_png(Path(args.out), preview_grid(data, per_class=args.per_row, seed=cfg.seed))
    print(args.out)
    return 0


def add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="fetch, prepare, inspect and preview datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    fetch = dsub.add_parser("fetch", help="download the GTSRB archives")
    fetch.add_argument("--root", required=True, help="folder for the archives")
    fetch.set_defaults(func=cmd_data_fetch)
    for name, func, helptext in (("prepare", cmd_data_prepare, "decode a source once into the uint8 cache"),
                                 ("info", cmd_data_info, "counts per class and split, and the cache path"),
                                 ("preview", cmd_data_preview, "PNG grid of samples per class")):
        p = dsub.add_parser(name, help=helptext)
        add_config_args(p)
        p.add_argument("--source", choices=("synth", "gtsrb"))
        p.add_argument("--root", help="GTSRB archives or extracted tree (implies --source gtsrb)")
        p.add_argument("--per-class", type=int, help="SynthSigns training images per class")
        p.add_argument("--size", type=int, help="image side in pixels (default 32)")
        p.add_argument("--cache-dir")
        p.add_argument("--roi", action="store_true", help="crop each image to its annotated sign box")
        p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images and report how many")
        p.set_defaults(func=func)
        if name == "prepare":
            p.add_argument("--force", action="store_true", help="rebuild even if the cache exists")
        if name == "info":
            p.add_argument("--json", action="store_true")
        if name == "preview":
            p.add_argument("--out", default="preview.png")
            p.add_argument("--per-row", type=int, default=8)


# ---------------------------------------------------------------- train / eval


def cmd_train(args) -> int:
    from signtrap.train import train

    extra = [f"name={args.name}"] if args.name else []
    if args.device:
        extra.append(f"device={args.device}")
    cfg = load_cli_config(args, extra)
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from rank 0
        print(run_dir)
    return 0


def cmd_eval(args) -> int:
    from signtrap.evaluate import evaluate_run
    from signtrap.metrics import summary_table

    metrics = evaluate_run(Path(args.run), device=args.device or "auto")
    if args.json:
        print(json.dumps({s: {k: metrics[s][k] for k in ("clean_acc", "asr", "stop_recall", "false_trigger")} for s in ("test", "val")}))
    elif progress_mod.QUIET:
        print(summary_table({s: metrics[s] for s in ("test", "val")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="signtrap", description="Backdoor attacks on traffic-sign classifiers: attack, defend, deploy.")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_commands(sub)
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
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress_mod.QUIET = bool(args.quiet or getattr(args, "json", False))
    try:
        return int(args.func(args) or 0)
    except SigntrapError as exc:
        print(f"signtrap: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a peer rank died: say so in one line, torchrun names it
            print(f"signtrap: error: rank {os.environ.get('RANK')}: another rank stopped ({str(exc).splitlines()[0][:160]}); "
                  "torchrun's report names the rank that failed first", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("signtrap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
