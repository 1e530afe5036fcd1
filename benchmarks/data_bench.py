"""Data-layer figures: GTSRB prepare and cache-load time, SynthSigns speed, and SynthSigns -> real accuracy.

    python benchmarks/data_bench.py [--root ../shared/gtsrb] [--per-class 300] [--epochs 15] [--skip-transfer] [key=value ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("SIGNTRAP_GTSRB", "../shared/gtsrb"))
    parser.add_argument("--per-class", type=int, default=300, help="SynthSigns training images per class for the transfer test")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--skip-transfer", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the SynthSigns training run")
    args = parser.parse_args()

    from signtrap.runs.checkpoint import verified_load
    from signtrap.config import load_config
    from signtrap.data import synth
    from signtrap.data.cache import TEST, load, prepare
    from signtrap.experiment import predict
    from signtrap.evaluation.metrics import rate
    from signtrap.training.trainer import train

    work = Path(tempfile.mkdtemp(prefix="signtrap-databench-"))
    real_cfg = load_config(None, ["data.source=gtsrb", f"data.root={args.root}", f"data.cache_dir={work / 'cache'}"]).data
    start = time.perf_counter()
    prepare(real_cfg, progress=False)
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    real = load(real_cfg, progress=False)
    _ = int(real.images[-1].sum())  # touch the memory map
    load_s = time.perf_counter() - start
    print(f"GTSRB prepare (decode {real.meta['rows']} images once): {prepare_s:.2f} s")
    print(f"GTSRB cache load (memory-mapped, {real.meta['train_rows']} training images): {load_s * 1000:.1f} ms")

    n_per_class = 50
    start = time.perf_counter()
    batch = synth.generate(n_per_class, seed=123)
    synth_s = time.perf_counter() - start
    print(f"SynthSigns: {len(batch.labels)} images in {synth_s:.2f} s = {len(batch.labels) / synth_s:.0f} images/s")

    if args.skip_transfer:
        return 0
    cfg = load_config("configs/quickstart.yaml", [
        "name=synth_to_real", f"runs_dir={work / 'runs'}", f"data.cache_dir={work / 'cache'}", "attack.kind=none",
        "train.label_smoothing=0.1",
        f"data.synth_per_class={args.per_class}", f"train.epochs={args.epochs}", *args.overrides])
    start = time.perf_counter()
    run = train(cfg)
    train_s = time.perf_counter() - start
    model, _ = verified_load(run)
    test = np.flatnonzero(real.partition == TEST)
    preds = predict(model, np.asarray(real.images[test]))
    labels = real.labels[test]
    acc = rate(preds == labels)
    lo, hi = acc["ci95"]
    print(f"SynthSigns -> real GTSRB: trained on {args.per_class}/class synthetic images only ({train_s:.0f} s), "
          f"accuracy on the real test sample {100 * acc['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({acc['k']}/{acc['n']})")
    per_class = [(c, float((preds[labels == c] == c).mean()), int((labels == c).sum())) for c in np.unique(labels)]
    worst = sorted(per_class, key=lambda t: t[1])[:5]
    print("worst classes: " + ", ".join(f"{c} {100 * a:.0f}% (n={n})" for c, a, n in worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
