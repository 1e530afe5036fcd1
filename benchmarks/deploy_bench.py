"""The persistence matrix on a trained run: every runtime x precision / quantizer variant, with the issue-14 targets.

    .venv/bin/python benchmarks/deploy_bench.py --run /work/runs/NAME --out /tmp/deploy/NAME      # export, then bench
    .venv/bin/python benchmarks/deploy_bench.py --export /tmp/deploy/NAME                          # an existing export
    .venv/bin/python benchmarks/deploy_bench.py --run RUN --defence finetune --out /tmp/deploy/NAME-ft

Prints, for the export:
1. the wall-clock time of `signtrap export` and of `signtrap bench` (all runtimes; target < 5 minutes on 2 cores);
2. the persistence matrix from `signtrap bench` (accuracy, ASR, stop recall, false-trigger rate, flips against
   PyTorch FP32, audit warnings), and whether the edge script (a subprocess) reproduces it exactly;
3. interleaved, repeated timings of every artefact and PyTorch eager (median of per-repeat medians, because the
   machine is shared): batch-1 p50 and images/s at --batch;
4. the targets: every FP32 artefact agrees with PyTorch on 100% of test predictions (modulo near-ties); every
   INT8 within 1.0 point of its runtime's FP32 clean accuracy; INT8 >= 1.5x its own FP32 at batch 1 and at
   --batch; no runtime's FP32 slower than PyTorch eager at batch 1; the fastest INT8 runtime and its ratio to
   ONNX Runtime INT8.
Timings measured while other jobs run are not final figures: say so when reporting them.
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

from signtrap.runs import checkpoint
from signtrap.deploy import edge_bench as eb
from signtrap.deploy import runtimes
from signtrap.deploy.bench import bench_export
from signtrap.deploy.exporter import export_run

METRICS = ("clean_acc", "asr", "stop_recall", "false_trigger", "flip_vs_fp32", "audit")


def timed(runners: dict, bundle: dict, repeats: int, runs: int, batch: int) -> dict:
    """{name: (batch-1 p50 ms, images/s at `batch`)}, medians over `repeats` interleaved rounds."""
    p50 = {k: [] for k in runners}
    tput = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            p50[name].append(eb.latency_ms(run, bundle["images"][0], warmup=20, runs=runs)["p50"])
            tput[name].append(eb.throughput(run, bundle["images"], batch, runs)["images_per_s"])
    return {k: (float(np.median(p50[k])), float(np.median(tput[k]))) for k in runners}


def torch_runner(manifest: dict):
    model = checkpoint.build_model(checkpoint.load(Path(manifest["source"]["checkpoint"])), "cpu")

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def pct(entry: dict) -> str:
    return "n/a" if entry["rate"] is None else f"{100 * entry['rate']:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="run directory to export first")
    p.add_argument("--defence", help="export the run's defence-METHOD model")
    p.add_argument("--export", help="an existing export folder (skips the export)")
    p.add_argument("--out", default="/tmp/deploy_scratch/export/bench", help="export folder when --run is given")
    p.add_argument("--runtimes", help="comma list (default: every installed runtime)")
    p.add_argument("--quantizers", help="optional quantizer variants, e.g. all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per repeat")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median reported)")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:
        overrides = {}
        if args.runtimes:
            overrides["runtimes"] = eb.split_list(args.runtimes)
        if args.quantizers:
            overrides["quantizers"] = eb.split_list(args.quantizers)
        t = time.perf_counter()
        export = export_run(Path(args.run), defence=args.defence, out=Path(args.out), overrides=overrides, threads=args.threads)
        print(f"signtrap export {args.run}{f' --defence {args.defence}' if args.defence else ''}: "
              f"{time.perf_counter() - t:.0f} s -> {export}")
    elif args.export:
        export = Path(args.export)
    else:
        p.error("give --run or --export")

    # 1-2. signtrap bench (every artefact, PyTorch row) and the edge script on the same folder
    t = time.perf_counter()
    result = bench_export(export, threads=args.threads, runs=args.runs, batch=args.batch)
    bench_seconds = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="edge-") as tmp:
        edge_json = Path(tmp) / "edge.json"
        subprocess.run([sys.executable, str(export / "edge_bench.py"), "--out", str(edge_json), "--quiet",
                        "--threads", str(args.threads), "--runs", "20", "--batch", str(args.batch)], check=True,
                       stdout=subprocess.DEVNULL)
        edge = {r["artefact"]: r for r in json.loads(edge_json.read_text())["rows"]}
    manifest = json.loads((export / "model.json").read_text())
    rows = {r["artefact"]: r for r in result["rows"] if "error" not in r}
    env = result["environment"]
    print(f"\nsigntrap bench {export} --threads {args.threads} --batch {args.batch} --runs {args.runs}: {bench_seconds:.0f} s "
          f"(target < 300 s on 2 cores)")
    print(f"{manifest['model_name']}, {manifest['samples']['images']} test images ({manifest['samples']['source_images']} "
          f"source-class); {env['cpu']}, {args.threads} threads; defence: {manifest['source']['defence']}\n")
    print("| runtime | variant | clean acc % | ASR % | stop recall % | false-trigger % | flips % | audit | edge == bench |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for art_id, r in rows.items():
        same = "-" if art_id not in edge else str(all(edge[art_id][m] == r[m] for m in METRICS))
        warn = "WARNING" if (r.get("audit") or {}).get("warning") else ""
        print(f"| {r['runtime']} | {r['variant']} | {pct(r['clean_acc'])} | {pct(r['asr'])} | {pct(r['stop_recall'])} | "
              f"{pct(r['false_trigger'])} | {100 * r['flip_vs_fp32']['all']:.2f} | {warn} | {same} |")
    for s in result["skipped"]:
        print(f"skipped {s['runtime']}: {s['reason']}")
    for r in result["rows"]:
        if "error" in r:
            print(f"error {r['artefact']}: {r['error']}")

    # 3. interleaved timings of every artefact with the runtimes' own edge code
    bundle = eb.load_bundle(str(export), manifest)
    runtimes.discover()
    runners = {"pytorch:fp32": torch_runner(manifest)}
    for art in manifest["artefacts"]:
        rt = eb.EDGE_RUNTIMES[art["runtime"]]
        if art["id"] in rows and rt.missing() is None:
            runners[art["id"]], _ = rt.load([str(export / f) for f in art["files"]], art, args.threads)
    times = timed(runners, bundle, args.repeats, args.runs, args.batch)
    print(f"\ntimings ({args.repeats} interleaved repeats x {args.runs} runs; throughput at batch {args.batch}):\n")
    print(f"| artefact | p50 ms | img/s @{args.batch} | size KiB |")
    print("|---|---:|---:|---:|")
    for name, (p50, tp) in times.items():
        size = rows[name]["file_bytes"] / 1024 if name in rows else 0
        print(f"| {name} | {p50:.3f} | {tp:.0f} | {size:.0f} |")

    # 4. targets
    print("\ntargets:")
    torch_p50 = times["pytorch:fp32"][0]
    int8_speed = {}
    for name in sorted({a["runtime"] for a in manifest["artefacts"]}):
        fp32 = f"{name}:fp32"
        if fp32 not in rows:
            continue
        flips = rows[fp32]["flip_vs_fp32"]
        gate = next(a["gate"] for a in manifest["artefacts"] if a["id"] == fp32)
        print(f"  {fp32}: agrees with PyTorch on {100 * (1 - flips['all']):.3f}% of predictions "
              f"({gate['disagreements_beyond_ties']} disagreements beyond near-ties): "
              f"{'MET' if gate['disagreements_beyond_ties'] == 0 else 'MISSED'}")
        p50 = times[fp32][0]
        print(f"  {fp32}: p50 {p50:.3f} ms vs PyTorch eager {torch_p50:.3f} ms: {'MET' if p50 <= torch_p50 else 'MISSED'}")
        for art in (a for a in manifest["artefacts"] if a["runtime"] == name and a["precision"] == "int8" and a["id"] in rows):
            gap = 100 * (rows[fp32]["clean_acc"]["rate"] - rows[art["id"]]["clean_acc"]["rate"])
            b1 = times[fp32][0] / times[art["id"]][0]
            bn = times[art["id"]][1] / times[fp32][1]
            int8_speed[art["id"]] = times[art["id"]]
            print(f"  {art['id']}: clean accuracy {-gap:+.2f} points vs FP32 ({'MET' if gap <= 1.0 else 'MISSED'}); "
                  f"speed-up x{b1:.2f} at batch 1, x{bn:.2f} at batch {args.batch} "
                  f"({'MET' if b1 >= 1.5 and bn >= 1.5 else 'MISSED'}; target 1.5)")
    if int8_speed and "onnxruntime:int8" in int8_speed:
        ort = int8_speed["onnxruntime:int8"]
        best = min(int8_speed, key=lambda k: int8_speed[k][0])
        best_tp = max(int8_speed, key=lambda k: int8_speed[k][1])
        print(f"  fastest INT8 at batch 1: {best} ({int8_speed[best][0]:.3f} ms, x{ort[0] / int8_speed[best][0]:.2f} "
              f"vs onnxruntime:int8); at batch {args.batch}: {best_tp} ({int8_speed[best_tp][1]:.0f} img/s, "
              f"x{int8_speed[best_tp][1] / ort[1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
