"""Deployment targets for `signtrap export` / `signtrap bench` (issue 5), printed as a table.

    .venv/bin/python benchmarks/deploy_bench.py --run /tmp/runs/gt1 --out /tmp/deploy_scratch/export/gt1
    .venv/bin/python benchmarks/deploy_bench.py --export /tmp/deploy_scratch/export/gt1   # already exported

Checks, on the CPU execution provider:
1. ONNX Runtime FP32 batch-1 latency <= 1/2 of PyTorch eager's;
2. INT8 >= 1.5x faster than FP32 at batch 1 and at the larger batch, clean accuracy within 0.5 points;
3. ASR for FP32 / FP16 / INT8 side by side (does the backdoor survive deployment?);
4. the edge script (subprocess) reproduces `signtrap bench`'s accuracy and ASR exactly.
Timings are interleaved across models and repeated (median of per-repeat medians), because the machine is
shared; then INT8 alternatives (per-channel, QOperator, graph optimisation levels, batch sizes) are timed
to explain a miss.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from signtrap.deploy import edge_bench as eb
from signtrap.deploy.bench import bench_export

METRICS = ("clean_acc", "asr", "false_trigger", "stop_recall")


def timed(runners: dict, bundle: dict, threads: int, repeats: int, runs: int, batch: int) -> dict:
    """{name: (batch-1 p50 ms, p90 ms, images/s at `batch`)}, interleaved over `repeats` rounds."""
    p50 = {k: [] for k in runners}
    p90 = {k: [] for k in runners}
    tput = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            lat = eb.latency_ms(run, bundle["images"][0], warmup=20, runs=runs)
            p50[name].append(lat["p50"])
            p90[name].append(lat["p90"])
            tput[name].append(eb.throughput(run, bundle["images"], batch, runs)["images_per_s"])
    return {k: (float(np.median(p50[k])), float(np.median(p90[k])), float(np.median(tput[k]))) for k in runners}


def ort_runner(path: Path, threads: int, level: str = "all"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    opts.log_severity_level = 3
    return eb.session_runner(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))


def torch_runner(manifest: dict, threads: int):
    from signtrap import checkpoint

    torch.set_num_threads(threads)
    model = checkpoint.build_model(checkpoint.load(Path(manifest["source"]["checkpoint"])), "cpu")

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def int8_alternatives(export: Path, scratch: Path, calib: np.ndarray) -> dict:
    """Other INT8 builds of the same FP32 graph: per-channel QDQ, QOperator (per-tensor / per-channel)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from signtrap.deploy.exporter import _quiet, _Reader

    pre = scratch / "pre.onnx"
    with _quiet():
        quant_pre_process(str(export / "model.fp32.onnx"), str(pre), skip_symbolic_shape=True)
    out = {}
    for name, fmt, per_channel, act in (("int8 QDQ per-channel", QuantFormat.QDQ, True, QuantType.QInt8),
                                        ("int8 QOperator", QuantFormat.QOperator, False, QuantType.QInt8),
                                        ("int8 QOperator per-channel", QuantFormat.QOperator, True, QuantType.QInt8),
                                        ("int8 QDQ U8S8", QuantFormat.QDQ, False, QuantType.QUInt8)):
        path = scratch / (name.replace(" ", "_") + ".onnx")
        with _quiet():
            quantize_static(str(pre), str(path), _Reader(calib), quant_format=fmt, activation_type=act,
                            weight_type=QuantType.QInt8, per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax)
        out[name] = path
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="run directory to export first (e.g. /tmp/runs/gt1)")
    p.add_argument("--export", help="an existing export folder (skips the export)")
    p.add_argument("--out", default="/tmp/deploy_scratch/export/bench", help="export folder when --run is given")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=300, help="timed batch-1 runs per repeat")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--skip-alternatives", action="store_true")
    args = p.parse_args()
    if args.run:
        from signtrap.deploy.exporter import export_run

        t = time.perf_counter()
        export = export_run(Path(args.run), out=Path(args.out), threads=args.threads)
        print(f"exported {args.run} -> {export} in {time.perf_counter() - t:.1f} s")
    elif args.export:
        export = Path(args.export)
    else:
        p.error("give --run or --export")

    # 1. signtrap bench (all variants, PyTorch row) and the edge script on the same folder
    result = bench_export(export, threads=args.threads, runs=args.runs, batch=args.batch)
    with tempfile.TemporaryDirectory(prefix="edge-", dir="/tmp") as tmp:
        edge_json = Path(tmp) / "edge.json"
        subprocess.run([sys.executable, str(export / "edge_bench.py"), "--out", str(edge_json), "--quiet",
                        "--threads", str(args.threads), "--runs", "20", "--batch", str(args.batch)], check=True,
                       stdout=subprocess.DEVNULL)
        edge = json.loads(edge_json.read_text())
    manifest = json.loads((export / "model.json").read_text())
    bundle = eb.load_bundle(str(export), manifest)
    rows = {(r["runtime"], r["variant"]): r for r in result["rows"] if r.get("provider") in ("CPUExecutionProvider", "eager-cpu")}
    edge_rows = {r["variant"]: r for r in edge["rows"] if r["provider"] == "CPUExecutionProvider"}

    # 2. interleaved, repeated timings for the targets
    runners = {"pytorch fp32": torch_runner(manifest, args.threads)}
    for v in ("fp32", "fp16", "int8"):
        runners[f"ort {v}"] = ort_runner(export / f"model.{v}.onnx", args.threads)
    times = timed(runners, bundle, args.threads, args.repeats, args.runs, args.batch)

    env = result["environment"]
    print(f"\nexport {export} ({manifest['model_name']}, {manifest['samples']['images']} test images, "
          f"{manifest['samples']['source_images']} stop signs); exporter {manifest['export']['exporter']}; "
          f"parity max|diff| {manifest['parity']['max_abs_logit_diff']:.2e}")
    print(f"{env['cpu']}, ORT {env['onnxruntime']}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.repeats} interleaved repeats x {args.runs} runs, throughput batch {args.batch}\n")
    print(f"| model | clean acc % | ASR % | false-trigger % | flips vs FP32 % | p50 ms | p90 ms | img/s @{args.batch} | size KiB | edge == bench |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, key in (("pytorch fp32", ("pytorch", "fp32")), ("ort fp32", ("onnxruntime", "fp32")),
                      ("ort fp16", ("onnxruntime", "fp16")), ("ort int8", ("onnxruntime", "int8"))):
        r = rows[key]
        flips = r["flip_vs_fp32"]["all"] * 100 if r.get("flip_vs_fp32") else 0.0
        same = "-" if key[0] == "pytorch" else str(all(edge_rows[key[1]][m] == r[m] for m in METRICS))
        t50, t90, tp = times[name]
        print(f"| {name} | {100 * r['clean_acc']['rate']:.2f} | {100 * r['asr']['rate']:.2f} | "
              f"{100 * r['false_trigger']['rate']:.2f} | {flips:.2f} | {t50:.3f} | {t90:.3f} | {tp:.0f} | "
              f"{r['file_bytes'] / 1024:.0f} | {same} |")

    fp32, int8, pt = times["ort fp32"], times["ort int8"], times["pytorch fp32"]
    acc_gap = 100 * (rows[("onnxruntime", "fp32")]["clean_acc"]["rate"] - rows[("onnxruntime", "int8")]["clean_acc"]["rate"])
    edge_same = all(edge_rows[v][m] == rows[("onnxruntime", v)][m] for v in edge_rows for m in METRICS)
    print("\ntargets:")
    print(f"  ORT FP32 p50 / PyTorch p50 = {fp32[0] / pt[0]:.3f} (target <= 0.5): {'MET' if fp32[0] <= pt[0] / 2 else 'MISSED'}")
    print(f"  INT8 speed-up batch 1 = {fp32[0] / int8[0]:.2f}x (target >= 1.5): {'MET' if fp32[0] >= 1.5 * int8[0] else 'MISSED'}")
    print(f"  INT8 speed-up batch {args.batch} = {int8[2] / fp32[2]:.2f}x (target >= 1.5): {'MET' if int8[2] >= 1.5 * fp32[2] else 'MISSED'}")
    print(f"  INT8 clean-accuracy drop = {acc_gap:.2f} points (target <= 0.5): {'MET' if abs(acc_gap) <= 0.5 else 'MISSED'}")
    print(f"  edge script == signtrap bench (accuracy, ASR, false-trigger, stop recall): {'MET' if edge_same else 'MISSED'}")

    if args.skip_alternatives:
        return 0
    # 3. INT8 investigation: other quantized builds and optimisation levels, interleaved with FP32
    from signtrap.deploy.config import ExportConfig
    from signtrap.deploy.exporter import calibration_images
    from signtrap.experiment import Experiment, load_run_config

    src = Path(manifest["source"]["checkpoint"]).parent
    cfg = load_run_config(src)
    calib, _ = calibration_images(Experiment.from_config(cfg, progress=False), ExportConfig())
    with tempfile.TemporaryDirectory(prefix="int8-", dir="/tmp") as tmp:
        alts = int8_alternatives(export, Path(tmp), calib)
        runners = {"ort fp32 (all)": ort_runner(export / "model.fp32.onnx", args.threads),
                   "ort int8 QDQ (all)": ort_runner(export / "model.int8.onnx", args.threads),
                   "ort int8 QDQ (extended)": ort_runner(export / "model.int8.onnx", args.threads, "extended"),
                   "ort int8 QDQ (basic)": ort_runner(export / "model.int8.onnx", args.threads, "basic")}
        runners.update({f"ort {k}": ort_runner(v, args.threads) for k, v in alts.items()})
        t = timed(runners, bundle, args.threads, max(2, args.repeats // 2), args.runs, args.batch)
        accs = {}
        for k, v in alts.items():
            run = ort_runner(v, args.threads)
            preds = eb.predict(run, bundle["images"])
            accs[f"ort {k}"] = 100 * float(np.mean(preds == bundle["labels"]))
        for b in (1, 8, 256):
            for k in ("ort fp32 (all)", "ort int8 QDQ (all)"):
                tp = eb.throughput(runners[k], bundle["images"], b, args.runs)["images_per_s"]
                print(f"  throughput batch {b:>3} {k}: {tp:.0f} img/s")
    base = t["ort fp32 (all)"]
    print(f"\nINT8 alternatives (speed-up vs FP32 at batch 1 / batch {args.batch}):")
    for k, (p50, _, tp) in t.items():
        print(f"  {k:<34} p50 {p50:.3f} ms  {tp:7.0f} img/s   x{base[0] / p50:.2f} / x{tp / base[2]:.2f}"
              + (f"   clean acc {accs[k]:.2f}%" if k in accs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
