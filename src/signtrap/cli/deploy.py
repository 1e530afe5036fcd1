"""`signtrap export` and `signtrap bench` subcommands (registered by signtrap.cli)."""
from __future__ import annotations

import argparse
from pathlib import Path

from signtrap import api, progress
from signtrap.deploy import edge_bench


def cmd_export(args: argparse.Namespace) -> int:
    overrides = {}
    if args.calibration:
        overrides["calibration"] = args.calibration
    if args.calib_method:
        overrides["calib_method"] = args.calib_method
    if args.per_channel:
        overrides["per_channel"] = True
    if args.calib_images:
        overrides["calib_images"] = args.calib_images
    if args.exporter:
        overrides["exporter"] = args.exporter
    out = api.export(args.run, defence=args.defence, out=args.out, threads=args.threads, **overrides)
    print(out)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    result = api.bench(args.export_dir, threads=args.threads or 0, providers=edge_bench.split_list(args.providers),
                       runs=args.runs, warmup=args.warmup, batch=args.batch,
                       variants=edge_bench.split_list(args.variants) or None, with_torch=not args.no_torch)

    if not progress.QUIET:
        print(edge_bench.markdown(result))
    print(Path(args.export_dir) / "bench.json")
    return 0


def register(sub) -> None:
    ex = sub.add_parser("export", help="export a run to ONNX FP32/FP16/INT8 with an evaluation bundle and hashes")
    ex.add_argument("run", help="runs/NAME")
    ex.add_argument("--defence", metavar="METHOD", help="export runs/NAME/defence-METHOD instead of the trained model")
    ex.add_argument("--out", metavar="DIR", help="export folder (default: export/NAME, or export/NAME-defence-METHOD)")
    ex.add_argument("--calibration", choices=("clean", "mixed"),
                    help="INT8 calibration images: clean training images (default) or mixed, some carrying the trigger")
    ex.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), help="calibration method (default minmax)")
    ex.add_argument("--calib-images", type=int, help="number of calibration images (default 512)")
    ex.add_argument("--per-channel", action="store_true", help="per-channel weight quantization")
    ex.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), help="ONNX exporter (default: dynamo, with fallback)")
    ex.add_argument("--threads", type=int, help="CPU threads for the export and its checks (default: the run's train.threads)")
    ex.set_defaults(func=cmd_export)

    be = sub.add_parser("bench", help="accuracy, ASR and latency of an export, per precision and execution provider")
    be.add_argument("export_dir", help="export/NAME")
    be.add_argument("--threads", type=int, help="intra-op threads for ONNX Runtime and PyTorch (default: usable CPUs)")
    be.add_argument("--providers", help="comma list: cpu, cuda, tensorrt, openvino, coreml, xnnpack (default: all available)")
    be.add_argument("--variants", help="comma list of fp32, fp16, int8 (default: all)")
    be.add_argument("--runs", type=int, default=200, help="timed batch-1 runs (default 200)")
    be.add_argument("--warmup", type=int, default=20, help="untimed warm-up runs (default 20)")
    be.add_argument("--batch", type=int, default=64, help="batch size for throughput (default 64)")
    be.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager reference row")
    be.set_defaults(func=cmd_bench)
