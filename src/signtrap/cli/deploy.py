"""`signtrap export` and `signtrap bench` subcommands (registered by signtrap.cli)."""
from __future__ import annotations

import argparse
from pathlib import Path

from signtrap import api
from signtrap.machine import progress
from signtrap.deploy import edge_bench, runtimes


def cmd_export(args: argparse.Namespace) -> int:
    overrides = {}
    for key in ("calibration", "calib_method", "calib_images", "exporter"):
        if getattr(args, key) is not None:  # --calib-images 0 is checked, not ignored
            overrides[key] = getattr(args, key)
    if args.per_channel:
        overrides["per_channel"] = True
    if args.runtimes:
        overrides["runtimes"] = edge_bench.split_list(args.runtimes)
    if args.quantizers:
        overrides["quantizers"] = edge_bench.split_list(args.quantizers)
    out = api.export(args.run, defence=args.defence, out=args.out, threads=args.threads, **overrides)
    print(out)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    result = api.bench(args.export_dir, threads=args.threads or 0, runtimes=edge_bench.split_list(args.runtimes),
                       providers=edge_bench.split_list(args.providers), runs=args.runs, warmup=args.warmup,
                       batch=args.batch, variants=edge_bench.split_list(args.variants) or None,
                       with_torch=not args.no_torch)
    if not progress.QUIET:
        print(edge_bench.markdown(result))
    print(Path(args.export_dir) / "bench.json")
    return 0


def register(sub) -> None:
    names = ", ".join(runtimes.names())
    ex = sub.add_parser("export", help="export a run for every deployment runtime: FP32/FP16/INT8 artefacts, each through "
                                       "a gate against PyTorch, an evaluation bundle, hashes and the edge script")
    ex.add_argument("run", help="runs/NAME")
    ex.add_argument("--defence", metavar="METHOD", help="export runs/NAME/defence-METHOD instead of the trained model")
    ex.add_argument("--out", metavar="DIR", help="export folder (default: export/NAME, or export/NAME-defence-METHOD)")
    ex.add_argument("--runtimes", metavar="A,B", help=f"comma list of runtimes (default: every one installed): {names}")
    ex.add_argument("--quantizers", metavar="Q,R", help="optional INT8 quantizer variants besides each runtime's default: "
                                                        "all, a variant (int8-perchannel) or RUNTIME:VARIANT")
    ex.add_argument("--calibration", choices=("clean", "mixed"),
                    help="INT8 calibration images for every runtime: clean training images (default) or mixed, "
                         "some carrying the trigger")
    ex.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"),
                    help="ONNX Runtime's default int8 calibration method (default minmax)")
    ex.add_argument("--calib-images", type=int, help="number of calibration images (default 512)")
    ex.add_argument("--per-channel", action="store_true", help="ONNX Runtime's default int8: per-channel weights")
    ex.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), help="ONNX exporter (default: dynamo, with fallback)")
    ex.add_argument("--threads", type=int, help="CPU threads for conversion and the gates (default: the run's train.threads)")
    ex.set_defaults(func=cmd_export)

    be = sub.add_parser("bench", help="the persistence matrix of an export: accuracy, ASR, flips and latency per "
                                      "runtime and precision, with the deployed-artefact audit")
    be.add_argument("export_dir", help="export/NAME")
    be.add_argument("--runtimes", metavar="A,B", help="comma list of runtimes (default: every one that can run here)")
    be.add_argument("--providers", help="old spelling of ONNX Runtime's runtimes: cpu, cuda, tensorrt")
    be.add_argument("--variants", help="comma list of variants or precisions, e.g. fp32,int8 (default: all)")
    be.add_argument("--threads", type=int, help=f"threads per runtime and for PyTorch (default: usable CPUs; at most "
                                                f"{edge_bench.MAX_THREADS_PER_CPU} per CPU)")
    be.add_argument("--runs", type=int, default=200, help="timed batch-1 runs (default 200)")
    be.add_argument("--warmup", type=int, default=20, help="untimed warm-up runs (default 20)")
    be.add_argument("--batch", type=int, default=64, help=f"batch size for throughput (default 64, at most {edge_bench.MAX_BATCH})")
    be.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager reference row")
    be.set_defaults(func=cmd_bench)
