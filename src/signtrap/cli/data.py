"""`signtrap data fetch|prepare|info|preview`: thin wrappers over signtrap.fetch_data/prepare_data/load_data."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from signtrap import api
from signtrap.cli.common import add_config_args, config_and_overrides
from signtrap.data.cache import open_cache
from signtrap.data.preview import preview_grid, write_png
from signtrap.fileio import require_writable


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


def config(args: argparse.Namespace):
    path, overrides = config_and_overrides(args)
    return api.load_config(path, [*overrides, *data_overrides(args)])


def cmd_data_fetch(args) -> int:
    for path in api.fetch_data(args.root):
        print(path)
    return 0


def cmd_data_prepare(args) -> int:
    path = api.prepare_data(config(args), force=args.force, verify=args.verify)
    data = open_cache(path)
    print(f"cache {path}: {data.meta['rows']} images ({data.meta['train_rows']} train, {data.meta['test_rows']} test), "
          f"{data.meta.get('skipped', 0)} skipped, prepared in {data.meta['prepare_seconds']} s")
    return 0


def cmd_data_info(args) -> int:
    cfg = config(args)
    data = api.load_data(cfg, verify=args.verify)
    splits = data.splits(cfg.data.val_fraction, cfg.seed)
    counts = {name: np.bincount(data.labels[rows], minlength=data.classes.num_classes) for name, rows in
              (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    if args.json:
        print(json.dumps({"cache": str(data.path), "source": data.meta["source"], "data_hash": data.data_hash, "verified": args.verify,
                          "splits": splits.sizes(), "per_class": {k: v.tolist() for k, v in counts.items()}}, indent=2))
        return 0
    print(f"cache: {data.path}\nsource: {data.meta['source']}  images: {len(data)}  size: {data.size}px  data hash: {data.data_hash[:16]}")
    print(f"{'id':>3} {'class':<52}{'train':>7}{'val':>7}{'test':>7}")
    for c, name in enumerate(data.classes.names):
        print(f"{c:>3} {name:<52}{counts['train'][c]:>7}{counts['val'][c]:>7}{counts['test'][c]:>7}")
    sizes = splits.sizes()
    print(f"{'':>3} {'total':<52}{sizes['train']:>7}{sizes['val']:>7}{sizes['test']:>7}")
    return 0


def cmd_data_preview(args) -> int:
    cfg = config(args)
    require_writable(Path(args.out).parent)
    data = api.load_data(cfg)
    write_png(Path(args.out), preview_grid(data, per_class=args.per_row, seed=cfg.seed))
    print(args.out)
    return 0


def register(sub) -> None:
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
        if name in ("prepare", "info"):
            p.add_argument("--verify", action="store_true",
                           help="check every cache file against its SHA-256 recorded when it was written (reads it all)")
        if name == "info":
            p.add_argument("--json", action="store_true")
        if name == "preview":
            p.add_argument("--out", default="preview.png")
            p.add_argument("--per-row", type=int, default=8)
