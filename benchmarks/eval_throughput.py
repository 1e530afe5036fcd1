"""Inference throughput of `signtrap.experiment.predict_logits` (every evaluation, curve and held-out score goes
through it) at several CPU chunk sizes, on the model of a trained run or a fresh signnet, uint8 32 x 32 images.
Prints images/s (median and best of --reps) per chunk and whether the logits equal those of one 512-image batch.

    python benchmarks/eval_throughput.py [--run runs/quickstart] [--images 1720] [--reps 7]

Run it on an idle machine: a second CPU job beside it measures nothing.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from signtrap import experiment
from signtrap.models import create_model
from signtrap.runs import checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a trained run directory (default: a fresh signnet, 43 classes)")
    parser.add_argument("--images", type=int, default=1720)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--chunks", default="512,256,128,64")
    args = parser.parse_args()
    model = checkpoint.verified_load(args.run, "model.pt")[0] if args.run else create_model("signnet", 43)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    default = experiment.CPU_EVAL_CHUNK
    print(f"predict_logits on {args.images} images, {torch.get_num_threads()} threads, default chunk {default}")
    reference = None
    try:
        for chunk in (int(c) for c in args.chunks.split(",")):
            experiment.CPU_EVAL_CHUNK = chunk
            experiment.predict_logits(model, images, batch_size=512)  # warm-up (oneDNN primitives for this shape)
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                logits = experiment.predict_logits(model, images, batch_size=512)
                times.append(time.perf_counter() - start)
            reference = logits if reference is None else reference
            print(f"chunk {chunk:>4}: {args.images / np.median(times):7.0f} img/s median, {args.images / min(times):7.0f} best; "
                  f"logits equal to chunk {args.chunks.split(',')[0]}'s: {np.array_equal(logits, reference)}")
    finally:
        experiment.CPU_EVAL_CHUNK = default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
