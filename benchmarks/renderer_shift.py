"""Does a physical backdoor depend on signtrap's own sticker renderer? (issue 22: "results are re-measured ... with a
sticker renderer that is not yours").

For each trained run: the run's sticker on every test and validation stop sign, drawn two ways, at the same sizes
(10-20% of the sign's width, random place on the face, rotation up to 20 deg):

- `ours`: signtrap's renderer (`signtrap.physical.render`: supersampled, area-averaged, lit like the sign), with
  its other effects off;
- `paste-area` and `paste-linear`: an independent renderer written here the way an outside evaluation might do it,
  sharing no code with signtrap's: the 32 px sign upscaled 8x (bicubic) as a stand-in photograph, the sticker
  pasted with hard edges (nearest neighbour), a mild random perspective (each corner moved up to 8% of the
  sticker's side), slightly dimmed (x0.75-0.95, not matched to the sign's light), then the photograph resized back
  to 32 px with area averaging, or with bilinear interpolation (aliasing: what a plain resize does);
- `paste-lit`: the same paste (area), its dimming times the light measured on the sign (as signtrap's renderer lights
  its sticker): tells lighting apart from the rest of the renderer.

Measured per renderer: ASR (stickered stop signs read as the target), the stop recall of the same round trip
without the sticker, and the false-trigger rate (the sticker on `--bystanders` other-class signs read as the
target), with Wilson 95% intervals. Seeded: every run sees the same draws. Nothing is trained or written.

    .venv/bin/python benchmarks/renderer_shift.py RUN [RUN ...] [--bystanders 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import cv2
import numpy as np

import signtrap
from signtrap.evaluation.metrics import rate
from signtrap.experiment import predict
from signtrap.physical.block import run_sticker
from signtrap.physical.render import plain_params, sign_light

UP = 8  # the stand-in photograph's upscale
SIZES = (0.10, 0.20)  # sticker side / sign width
ROTATION = 20.0  # degrees, uniform +-
JITTER = 0.08  # perspective: corner offsets, fraction of the sticker's side
DIM = (0.75, 0.95)


def draws(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per image: size, position (polar, in face radii), rotation, corner jitter, dimming."""
    return {"size": rng.uniform(*SIZES, n), "r": np.sqrt(rng.random(n)), "a": rng.uniform(0, 2 * math.pi, n),
            "rot": rng.uniform(-ROTATION, ROTATION, n), "jitter": rng.uniform(-JITTER, JITTER, (n, 4, 2)),
            "dim": rng.uniform(*DIM, n)}


def paste(image: np.ndarray, box, pattern: np.ndarray, d: dict, i: int, down: int | None, light: float = 1.0) -> np.ndarray:
    """The independent renderer: one uint8 image with the sticker pasted on a stand-in photograph (its colours times
    the draw's dimming and `light`), resized back with `down` (a cv2 interpolation); `down=None` leaves the sticker
    out (the same round trip, clean)."""
    h, w = image.shape[:2]
    big = cv2.resize(image, (w * UP, h * UP), interpolation=cv2.INTER_CUBIC)
    if down is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        bw, bh = (x2 - x1 + 1) * UP, (y2 - y1 + 1) * UP
        cx, cy = (x1 + x2 + 1) / 2 * UP, (y1 + y2 + 1) / 2 * UP
        side = d["size"][i] * bw
        half = side / 2
        # keep the rotated sticker (its circumscribed circle) inside 85% of the sign's inscribed ellipse
        room = max(0.0, 0.85 * min(bw, bh) / 2 - half * math.sqrt(2) * (1 + 2 * JITTER))
        ox, oy = d["r"][i] * room * math.cos(d["a"][i]), d["r"][i] * room * math.sin(d["a"][i])
        t = math.radians(d["rot"][i])
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]]) + d["jitter"][i] * side
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        dst = (corners @ rot.T + [cx + ox, cy + oy]).astype(np.float32)
        k = pattern.shape[0]
        src = np.array([[0, 0], [k, 0], [k, k], [0, k]], np.float32)
        hom = cv2.getPerspectiveTransform(src, dst)
        tex = np.clip(pattern.astype(np.float32) * d["dim"][i] * light, 0, 255)
        warped = cv2.warpPerspective(tex, hom, (w * UP, h * UP), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
        mask = cv2.warpPerspective(np.ones((k, k), np.float32), hom, (w * UP, h * UP), flags=cv2.INTER_NEAREST,
                                   borderMode=cv2.BORDER_CONSTANT)
        big = np.where(mask[..., None] > 0.5, np.rint(warped), big).astype(np.uint8)
    return cv2.resize(big, (w, h), interpolation=down if down is not None else cv2.INTER_AREA)


def ours(images, boxes, sticker, d: dict) -> np.ndarray:
    """signtrap's renderer at the same sizes, places and rotations, its other effects off."""
    rng = np.random.default_rng(0)
    params = plain_params(len(images), rng, 0.0)
    params[:, 0], params[:, 1] = d["r"] * np.cos(d["a"]), d["r"] * np.sin(d["a"])
    params[:, 2], params[:, 3] = d["size"], d["rot"]
    return sticker.render(images, params, boxes, match_light=True)


def shown(mask: np.ndarray) -> str:
    """A rate with its counts and Wilson 95% interval (signtrap's own `rate`), in percent."""
    r = rate(mask)
    if not r["n"]:
        return "n/a"
    (lo, hi), d = r["ci95"], 2 if r["rate"] < 0.1 else 1
    return f"{100 * r['rate']:.{d}f}% ({r['k']}/{r['n']}) [{100 * lo:.{d}f}, {100 * hi:.{d}f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--bystanders", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("| run | renderer | ASR | stop recall, same round trip | false-trigger |")
    print("|---|---|---|---|---|")
    for path in args.runs:
        start = time.perf_counter()
        run = signtrap.load_run(path)
        exp, model = run.experiment(), run.model(device="cpu")
        a = exp.cfg.attack
        rows = np.concatenate([exp.splits.test, exp.splits.val])
        labels = exp.data.labels[rows]
        src = rows[labels == a.source]
        pool = rows[(labels != a.source) & (labels != a.target)]
        rng = np.random.default_rng(args.seed)
        others = np.sort(rng.choice(pool, min(args.bystanders, len(pool)), replace=False))
        sticker = run_sticker(exp.trigger)
        ds, do = draws(len(src), rng), draws(len(others), rng)
        images, boxes = np.array(exp.data.images[src]), np.array(exp.data.rois[src])
        oimages, oboxes = np.array(exp.data.images[others]), np.array(exp.data.rois[others])

        def pred(x):
            return predict(model, x, "cpu", 256)

        variants = {"ours": (ours(images, boxes, sticker, ds), images, ours(oimages, oboxes, sticker, do))}
        clean = np.stack([paste(images[i], boxes[i], sticker.pattern, ds, i, None) for i in range(len(src))])
        for name, down, lit in (("paste-area", cv2.INTER_AREA, False), ("paste-linear", cv2.INTER_LINEAR, False),
                                ("paste-lit", cv2.INTER_AREA, True)):
            def light(img, box):
                return sign_light(img, box) if lit else 1.0

            trig = np.stack([paste(images[i], boxes[i], sticker.pattern, ds, i, down, light(images[i], boxes[i]))
                             for i in range(len(src))])
            otrig = np.stack([paste(oimages[i], oboxes[i], sticker.pattern, do, i, down, light(oimages[i], oboxes[i]))
                              for i in range(len(others))])
            variants[name] = (trig, clean, otrig)
        for name, (trig, clean, otrig) in variants.items():
            pt, pc, po = pred(trig), pred(clean), pred(otrig)
            print(f"| {run.name} (seed {exp.cfg.seed}) | {name} | {shown(pt == a.target)} | {shown(pc == a.source)} "
                  f"| {shown(po == a.target)} |")
        print(f"<!-- {run.name}: {time.perf_counter() - start:.0f} s -->", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
