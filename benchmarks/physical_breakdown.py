"""Where a physical backdoor fails (issue 22): the physical evaluation's default views of a run, broken down by the
condition each view was drawn at, and by the sticker's width *in pixels* after the distance (sticker share x the
sign's width in the image / distance). The same views, draws and renders as `signtrap eval RUN --physical`'s
`default` block (signtrap.physical.evaluate.default_conditions / default_views, the default grid); nothing is
trained. Runs of different `data.size` show whether the misses are a matter of pixels.

    .venv/bin/python benchmarks/physical_breakdown.py RUN [RUN ...] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import numpy as np

import signtrap
from signtrap.errors import SigntrapError
from signtrap.experiment import predict
from signtrap.physical.block import run_sticker, split_images
from signtrap.physical.evaluate import Grid, default_conditions, default_views, samples

PIXEL_BINS = ((0, 3), (3, 4), (4, 5), (5, 6), (6, 8), (8, 12), (12, 1000))


def breakdown(path: str, device: str) -> list[str]:
    run = signtrap.load_run(path)
    cfg, exp = run.config, run.experiment()
    model = run.model(device=device)
    grid = Grid()
    images, labels, boxes = split_images(exp)
    src, others = samples(grid, labels, cfg.attack.source, cfg.attack.target)
    conds, _ = default_conditions(grid, len(src), len(others))
    views = default_views(run_sticker(exp.trigger), images, boxes, src, others, grid)
    batch = cfg.train.eval_batch_size
    hit = np.asarray(predict(model, views.triggered, device, batch)) == cfg.attack.target
    seen = np.asarray(predict(model, views.clean, device, batch)) == cfg.attack.source
    width = (boxes[src, 2] - boxes[src, 0] + 1).astype(np.float64)
    px = np.array([c["sticker"] for c in conds]) * width / np.array([c["distance"] for c in conds])
    lines = [f"{path}: data.size {cfg.data.size}, sign width {np.median(width):.0f} px (median), "
             f"ASR {hit.sum()}/{len(hit)} ({100 * hit.mean():.1f}%), stop recall {seen.sum()}/{len(seen)}",
             "| condition | value | ASR | views |", "|---|---|---|---|"]
    for axis, values in grid.default.items():
        if len(values) < 2:
            continue
        groups = defaultdict(list)
        for c, h in zip(conds, hit):
            groups[c[axis]].append(h)
        lines += [f"| {axis} | {v:g} | {100 * np.mean(h):.0f}% | {len(h)} |" for v, h in sorted(groups.items())]
    for lo, hi in PIXEL_BINS:
        sel = (px >= lo) & (px < hi)
        if sel.any():
            label = f"{lo}-{hi} px" if hi < 1000 else f">= {lo} px"
            lines.append(f"| sticker width after distance | {label} | {100 * hit[sel].mean():.0f}% ({hit[sel].sum()}/{sel.sum()}) | {sel.sum()} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        for path in args.runs:
            print("\n".join(breakdown(path, args.device)), end="\n\n")
    except SigntrapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
