"""Training throughput: signtrap's route (uint8 cache in memory, albumentations on arrays, channels-last, bf16
autocast where `train.precision=auto` picks it) against the naive route (torchvision.datasets.GTSRB + PIL transforms
+ DataLoader, decoding files every epoch, fp32), same model and images. signtrap in fp32 is printed too.

    python benchmarks/train_throughput.py [--root ../shared/gtsrb] [--images 7680] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("SIGNTRAP_GTSRB", "../shared/gtsrb"))
    parser.add_argument("--images", type=int, default=7680, help="training images per measured pass")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the naive route")
    args = parser.parse_args()

    from signtrap.attacks.poison import TrainingSet
    from signtrap.config import load_config
    from signtrap.experiment import Experiment
    from signtrap.machine.environment import autocast_dtype, precision_name

    work = Path(tempfile.mkdtemp(prefix="signtrap-throughput-"))
    overrides = [f"data.root={args.root}", f"data.cache_dir={work / 'cache'}", "device=cpu"]
    cfg = load_config("configs/badnets_stop_to_100.yaml", overrides)
    exp = Experiment.from_config(cfg, progress=False)
    rows = exp.splits.train[np.random.default_rng(0).permutation(len(exp.splits.train))[: args.images]]
    ts = TrainingSet(np.array(exp.data.images[rows]), exp.data.labels[rows].astype(np.int64), np.zeros(len(rows), bool), True, np.array(exp.data.rois[rows]))
    steps = len(rows) // cfg.train.batch_size
    ours = signtrap_route(cfg, exp, ts, steps)
    ours_fp32 = signtrap_route(load_config("configs/badnets_stop_to_100.yaml", [*overrides, "train.precision=fp32"]), exp, ts, steps)
    naive = naive_route(cfg, exp, rows, work, args.workers)
    precision = precision_name(autocast_dtype(cfg.train.precision, torch.device("cpu")))
    print(f"threads: torch {torch.get_num_threads()}, DataLoader workers {args.workers}, images per pass {len(rows)}, model {cfg.model.name}")
    print(f"signtrap route:      {ours:8.0f} images/s (uint8 cache, albumentations, channels-last, {precision}: the default)")
    print(f"signtrap route fp32: {ours_fp32:8.0f} images/s (train.precision=fp32)")
    print(f"naive route:         {naive:8.0f} images/s (torchvision.datasets.GTSRB + PIL transforms + DataLoader, fp32)")
    print(f"ratio: {ours / naive:.2f}x (fp32 only: {ours_fp32 / naive:.2f}x)")
    return 0


def signtrap_route(cfg, exp, ts, steps: int) -> float:
    from signtrap.training.loop import Loop, Schedule
    from signtrap.models import create_model
    from signtrap.training.trainer import EPOCH_STREAM

    torch.manual_seed(cfg.seed)
    space = exp.classes
    model = create_model(cfg.model.name, num_classes=space.num_classes, dropout=cfg.model.dropout, mean=space.mean, std=space.std)
    loop = Loop(model, ts, Schedule.from_train(cfg.train), torch.device("cpu"), cfg.seed, EPOCH_STREAM, aug=cfg.aug,
                precision=cfg.train.precision, trigger=exp.trigger)
    start = time.perf_counter()
    loop.epoch(0)
    return len(ts.labels) / (time.perf_counter() - start)


def naive_route(cfg, exp, rows, work: Path, workers: int) -> float:
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from signtrap.data.archive import safe_extract
    from signtrap.models import create_model

    root = Path(cfg.data.settings.resolved_root())
    safe_extract(root / "GTSRB-Training_fixed.zip", work / "tv" / "gtsrb")
    transform = transforms.Compose([
        transforms.Resize((32, 32)),
        transforms.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1)),
        transforms.ColorJitter(brightness=0.3, contrast=0.3),
        transforms.ToTensor(),
    ])
    dataset = datasets.GTSRB(str(work / "tv"), split="train", transform=transform)
    # the same images as signtrap's pass: map cache rows to torchvision's sample order by file name
    index = {Path(p).as_posix().split("GTSRB/Training/")[-1]: i for i, (p, _) in enumerate(dataset._samples)}
    subset = Subset(dataset, [index[exp.data.files[r].split("GTSRB/Training/")[-1]] for r in rows])
    loader = DataLoader(subset, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers, persistent_workers=False)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, exp.classes.num_classes, dropout=cfg.model.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
