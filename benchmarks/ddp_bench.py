"""Data-parallel training throughput: images/s of signtrap's training loop in 1 process and in N processes
under torchrun (DDP, gloo on CPU) on the same cores; and, where a GPU is present, one GPU with resnet18.

    python benchmarks/ddp_bench.py [--procs 1 2] [--images 4096] [--model signnet] [--batch 128]

Each measurement is its own process group: one warm-up epoch, then one timed epoch over the same
in-memory random images (augmentation on, as in a real run); the process count shares the machine's
cores (threads per process = cores / processes), so the figures compare ways of spending the same CPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MARK = "DDP_BENCH "


def worker(args) -> None:
    import numpy as np
    import torch

    from signtrap.training import distributed
    from signtrap.attacks.poison import TrainingSet
    from signtrap.config import load_config
    from signtrap.training.loop import Loop, Schedule
    from signtrap.models import create_model

    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}", "train.epochs=2",
                             f"aug.enabled={str(not args.no_aug).lower()}", f"device={args.device}", f"data.size={args.size}"])
    world, device = distributed.init(torch.device(args.device))
    try:
        rng = np.random.default_rng(0)
        n = args.images
        ts = TrainingSet(rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8), rng.integers(0, 43, n).astype(np.int64),
                         np.zeros(n, bool), True, np.tile(np.array([0, 0, args.size, args.size]), (n, 1)))
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model.name, num_classes=43, dropout=cfg.model.dropout)  # random labels 0..42 above
        loop = Loop(model, ts, Schedule.from_train(cfg.train), device, cfg.seed, 0xE90C, aug=cfg.aug,
                    precision=cfg.train.precision, world=world, show_progress=False)
        loop.epoch(0)  # warm-up: allocator, autotuning, first DDP buckets
        distributed.barrier(world)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loop.epoch(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier(world)
        seconds = time.perf_counter() - start
        if world.is_main:
            print(MARK + json.dumps({"procs": world.size, "threads": args.threads, "images": n, "seconds": round(seconds, 3),
                                     "images_per_s": round(n / seconds, 1), "device": str(device), "model": args.model}), flush=True)
    finally:
        distributed.shutdown(world)


def measure(procs: int, threads: int, args, device: str = "cpu", model: str | None = None) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--images", str(args.images),
          "--model", model or args.model, "--batch", str(args.batch), "--device", device, "--size", str(args.size)]
    if args.no_aug:
        me.append("--no-aug")
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={procs}", *me]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"ddp_bench: {procs} process(es) failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(lines[-1][len(MARK):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare on CPU")
    parser.add_argument("--images", type=int, default=4096, help="images per timed epoch")
    parser.add_argument("--model", default="signnet")
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--no-aug", action="store_true", help="leave augmentation out")
    parser.add_argument("--gpu-images", type=int, default=16384, help="images per timed epoch on the GPU")
    parser.add_argument("--gpu-model", default="resnet18")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = " (load average %.1f)" % os.getloadavg()[0]
    except OSError:
        load = ""
    print(f"CPU: {cores} cores{load}; model {args.model}, global batch {args.batch}, {args.images} images per timed epoch, "
          f"augmentation {'off' if args.no_aug else 'on'}")
    plan = [(procs, max(1, cores // procs)) for procs in args.procs]
    if 1 in args.procs and cores > 1:
        plan.insert(1, (1, 1))  # one process, one thread: the per-core rate the N-process runs should multiply
    base = None
    for procs, threads in plan:
        r = measure(procs, threads, args)
        base = base or r["images_per_s"]
        print(f"  {procs} process(es) x {threads} thread(s): {r['images_per_s']:8.1f} images/s  "
              f"(x{r['images_per_s'] / base:.2f} vs the first line)")
    if torch.cuda.is_available():
        args.images = args.gpu_images
        args.batch = max(args.batch, 256)
        r = measure(1, max(1, cores // 2), args, device="cuda", model=args.gpu_model)
        print(f"GPU: {torch.cuda.get_device_name(0)}, {args.gpu_model}, batch {args.batch} (bf16 autocast): "
              f"{r['images_per_s']:8.1f} images/s")
    else:
        print("GPU: none here; on a GPU machine this also prints images/s for one GPU with resnet18")
    return 0


if __name__ == "__main__":
    sys.exit(main())
