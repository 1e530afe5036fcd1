"""The physical evaluation: a fixed, seeded grid of viewing conditions, separate from the poisoning renderer.

Conditions (axes, `Grid.axes`): the sticker's side relative to the sign's width (its physical size), the yaw
angle between the camera and the sign's normal, the sticker's in-plane rotation on the sign, the distance
(the sign seen k times farther: its crop loses resolution), the light (brightness factor), defocus blur
(sigma as a fraction of the sign's width) and JPEG quality. The sticker is printed plainly (a neutral
printer's gamut), lit like the sign, at a seeded random place on the sign's face; the scene conditions
(yaw, distance, light, blur, JPEG) are applied to the whole image, to the stickered and the clean image alike,
so a model that fails on a hard view is told apart from a trigger that fails.

Measured, every triggered source-class image of the given splits:
- `cells`: the heat map over two axes (default: sticker size x yaw), the other axes at their nominal values;
- `curves`: each axis alone, the others nominal (ASR against angle, distance, light, ...);
- `default`: the default distribution, every image at a condition drawn uniformly from the ordinary part of
  the grid (`DEFAULT`: where a camera still reads a clean sign), each axis independently;
and, at each condition, the same view without the sticker (`stop_recall`: the model still reads the sign)
and the ASR among the images whose clean view is read correctly (`asr_recognised`: the trigger's own
failure). Under the default distribution also: the false-trigger rate (the sticker on other classes' signs
read as the target) and the clean accuracy of every class under the same views.

The grid is fixed by `Grid` and its seed, not by the run or the poisoning distribution; it reaches beyond
the poisoning renderer's ranges on several axes on purpose (see the README of issue 22: results are
re-measured with a renderer that is not this one).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from signtrap.physical.render import C, Sticker, View, fit_factor, plain_params, view

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC -> predicted labels

AXES = {
    "sticker": [0.08, 0.12, 0.16, 0.20, 0.25],  # sticker side / sign width
    "yaw": [0.0, 15.0, 30.0, 45.0, 60.0],  # degrees
    "rotation": [0.0, 15.0, 30.0, 45.0],  # degrees, the sticker on the sign
    "distance": [1.0, 1.5, 2.0, 3.0],  # times farther than the photograph
    "brightness": [0.3, 0.5, 0.75, 1.0, 1.3],  # times the light
    "blur": [0.0, 0.02, 0.04, 0.06],  # defocus sigma / sign width
    "jpeg": [0.0, 75.0, 50.0, 30.0],  # quality; 0: not compressed
}
# the default distribution: every image at a condition drawn uniformly from these values (the grid's ordinary
# part: a camera still reads a clean sign there); the hard tails of the grid are measured by the curves and the map
DEFAULT = {
    "sticker": [0.12, 0.16, 0.20, 0.25],
    "yaw": [0.0, 15.0, 30.0],
    "rotation": [0.0, 15.0, 30.0, 45.0],
    "distance": [1.0, 1.5],
    "brightness": [0.5, 0.75, 1.0, 1.3],
    "blur": [0.0, 0.02],
    "jpeg": [0.0, 75.0, 50.0],
}
NOMINAL = {"sticker": 0.16, "yaw": 0.0, "rotation": 0.0, "distance": 1.0, "brightness": 1.0, "blur": 0.0, "jpeg": 0.0}
UNITS = {"sticker": "sticker width / sign width", "yaw": "yaw (degrees)", "rotation": "sticker rotation (degrees)",
         "distance": "distance (x the photograph's)", "brightness": "light (x)", "blur": "defocus sigma / sign width",
         "jpeg": "JPEG quality (0 = none)"}
PHYSICAL_STREAM = 0x9A75
PRINT_GAMUT = 0.9  # an office colour printer


def _axes():
    return {k: list(v) for k, v in AXES.items()}


@dataclass
class Grid:
    axes: dict = field(default_factory=_axes)
    nominal: dict = field(default_factory=lambda: dict(NOMINAL))
    default: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT.items()})
    heatmap: list = field(default_factory=lambda: ["sticker", "yaw"])
    seed: int = 0  # the grid's own seed (placement on the face, the default distribution's draws)
    face: float = 0.85
    bystanders: int = 2000  # other-class images for the false-trigger rate (a seeded sample; 0: all)
    max_source: int = 0  # cap on source-class images (0: all)

    def check(self, prefix: str = "physical") -> None:
        unknown = set(self.axes) - set(AXES)
        if unknown:
            raise ValueError(f"{prefix}.axes: unknown axis {sorted(unknown)}; axes are {', '.join(AXES)}")
        for name, values in (*self.axes.items(), *self.default.items()):
            if not values:
                raise ValueError(f"{prefix}.axes.{name}: no values")
        if len(self.heatmap) != 2 or any(a not in self.axes for a in self.heatmap):
            raise ValueError(f"{prefix}.heatmap: two axes of {', '.join(self.axes)}")

    def condition(self, **changes) -> dict:
        return {**self.nominal, **changes}


def scene(cond: dict) -> View:
    return View(yaw=float(cond["yaw"]), distance=float(cond["distance"]), brightness=float(cond["brightness"]),
                blur=float(cond["blur"]), jpeg=int(cond["jpeg"]))


def rate(mask) -> dict:
    from signtrap.evaluation.metrics import rate as _rate  # the project's one definition (counts and Wilson interval)
    return _rate(np.asarray(mask, bool))


def render_condition(sticker: Sticker, images: np.ndarray, boxes: np.ndarray, conds: list[dict], rng: np.random.Generator,
                     face: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """(clean view, stickered view) of every image, image i at condition conds[i] (one dict: all alike)."""
    n = len(images)
    conds = conds if isinstance(conds, list) else [conds] * n
    params = plain_params(n, rng, 0.1)
    for i, c in enumerate(conds):
        params[i, C["scale"]] = c["sticker"]
        params[i, C["rotation"]] = c["rotation"]
    params[:, C["gamut"]] = PRINT_GAMUT
    stickered = sticker.render(images, params, boxes, face=face)
    clean_out, trig_out = np.empty_like(images), np.empty_like(images)
    keys = [tuple(sorted((k, float(v)) for k, v in c.items() if k not in ("sticker", "rotation"))) for c in conds]
    for key in set(keys):
        idx = np.array([i for i, k in enumerate(keys) if k == key])
        v = scene(dict(key))
        clean_out[idx] = view(images[idx], boxes[idx], v)
        trig_out[idx] = view(stickered[idx], boxes[idx], v)
    return clean_out, trig_out


def _outcome(pc: np.ndarray, pt: np.ndarray, source: int, target: int) -> dict:
    """ASR, stop recall and ASR among recognised views from the predictions on the clean and stickered views."""
    recognised = pc == source
    return {"asr": rate(pt == target), "stop_recall": rate(recognised), "asr_recognised": rate(pt[recognised] == target)}


def _measure(predict: Predict, sticker: Sticker, images, labels, boxes, conds, rng, source: int, target: int, face: float) -> dict:
    clean, trig = render_condition(sticker, images, boxes, conds, rng, face)
    return _outcome(np.asarray(predict(clean)), np.asarray(predict(trig)), source, target)


def _rng(grid: Grid, *stream) -> np.random.Generator:
    return np.random.default_rng([grid.seed, PHYSICAL_STREAM, *stream])


def samples(grid: Grid, labels: np.ndarray, source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """(source rows, bystander rows) of `labels` the evaluation measures: every source-class image (or a seeded
    sample of `max_source`) and a seeded sample of `bystanders` images of the other classes."""
    src = np.flatnonzero((labels == source) & (labels != target))
    if grid.max_source and len(src) > grid.max_source:
        src = np.sort(_rng(grid, 1).choice(src, grid.max_source, replace=False))
    others = np.flatnonzero((labels != source) & (labels != target))
    if grid.bystanders and len(others) > grid.bystanders:
        others = np.sort(_rng(grid, 2).choice(others, grid.bystanders, replace=False))
    return src, others


@dataclass
class DefaultViews:
    """The default distribution's renders: the source images clean and stickered, the bystanders likewise."""

    clean: np.ndarray
    triggered: np.ndarray
    others_clean: np.ndarray
    others_triggered: np.ndarray


def default_views(sticker: Sticker, images: np.ndarray, boxes: np.ndarray, src: np.ndarray, others: np.ndarray,
                  grid: Grid) -> DefaultViews:
    """Every source image (rows `src`) and bystander (rows `others`) at a condition drawn from the default
    distribution, clean and stickered: what `physical_evaluation` measures as `default`, and what an export's
    evaluation bundle carries so that every runtime is measured on the same views."""
    conds, oconds = default_conditions(grid, len(src), len(others))
    clean, trig = render_condition(sticker, images[src], boxes[src], conds, _rng(grid, 41), grid.face)
    empty = np.empty((0, *images.shape[1:]), images.dtype)
    oc = ot = empty
    if len(others):
        oc, ot = render_condition(sticker, images[others], boxes[others], oconds, _rng(grid, 42), grid.face)
    return DefaultViews(clean, trig, oc, ot)


def default_conditions(grid: Grid, n_source: int, n_others: int) -> tuple[list[dict], list[dict]]:
    """The conditions `default_views` draws for the source images and the bystanders, in its order (one seeded
    stream: the source images' draws first), so a view's condition can be read back (benchmarks/physical_breakdown.py)."""
    draw = _rng(grid, 40)
    dist = {**{k: [v] for k, v in grid.nominal.items()}, **grid.default}

    def one() -> dict:
        return {k: dist[k][int(draw.integers(len(dist[k])))] for k in dist}

    return [one() for _ in range(n_source)], [one() for _ in range(n_others)]


def check_fits(sticker_sizes, boxes: np.ndarray, face: float) -> None:
    """Raise ValueError when the largest sticker of the grid does not fit a sign's face."""
    largest = max(sticker_sizes)
    for i, box in enumerate(np.asarray(boxes).reshape(-1, 4)):
        if fit_factor(largest, box, face) < 1:
            raise ValueError(f"a sticker {largest:.0%} of the sign's width does not fit sign {i}'s face (box {tuple(int(v) for v in box)})")


def physical_evaluation(predict: Predict, sticker: Sticker, images: np.ndarray, labels: np.ndarray, boxes: np.ndarray,
                        source: int, target: int, grid: Grid | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """The `physical` block of metrics.json for one model (see the module's docstring)."""
    grid = grid or Grid()
    grid.check()
    labels = np.asarray(labels, np.int64)
    boxes = np.asarray(boxes).reshape(-1, 4)
    src, others = samples(grid, labels, source, target)
    si, sl, sb = images[src], labels[src], boxes[src]
    say = progress or (lambda _m: None)
    out: dict = {"grid": {"axes": grid.axes, "nominal": grid.nominal, "default": grid.default, "heatmap": grid.heatmap, "seed": grid.seed,
                          "face": grid.face, "print_gamut": PRINT_GAMUT},
                 "sticker": sticker.name, "source": int(source), "target": int(target),
                 "samples": {"source": int(len(src)), "bystanders": int(len(others))}}
    if not len(src):
        out["note"] = "no source-class images to measure"
        return out
    a, b = grid.heatmap
    say(f"physical evaluation: heat map {a} x {b}")
    cells = []
    for i, (va, vb) in enumerate(itertools.product(grid.axes[a], grid.axes[b])):
        cond = grid.condition(**{a: va, b: vb})
        cells.append({a: va, b: vb, **_measure(predict, sticker, si, sl, sb, cond, _rng(grid, 10, i), source, target, grid.face)})
    out["cells"] = cells
    say("physical evaluation: one axis at a time")
    curves = {}
    for j, axis in enumerate(grid.axes):
        curves[axis] = [{axis: v, **_measure(predict, sticker, si, sl, sb, grid.condition(**{axis: v}), _rng(grid, 20, j, k),
                                             source, target, grid.face)} for k, v in enumerate(grid.axes[axis])]
    out["curves"] = curves
    out["nominal"] = _measure(predict, sticker, si, sl, sb, grid.condition(), _rng(grid, 30), source, target, grid.face)
    say("physical evaluation: the default distribution and the false-trigger rate")
    views = default_views(sticker, images, boxes, src, others, grid)
    pc = np.asarray(predict(views.clean))
    default = _outcome(pc, np.asarray(predict(views.triggered)), source, target)
    if len(others):
        poc, pot = np.asarray(predict(views.others_clean)), np.asarray(predict(views.others_triggered))
        default["false_trigger"] = rate(pot == target)
        default["false_trigger_clean"] = rate(poc == target)  # the same views without the sticker
        default["bystander_acc"] = rate(poc == labels[others])
        # every class under the same views, no sticker: the source images and the bystanders
        default["clean_acc"] = rate(np.concatenate([pc == source, poc == labels[others]]))
        _, nt = render_condition(sticker, images[others], boxes[others], grid.condition(), _rng(grid, 43), grid.face)
        out["nominal"]["false_trigger"] = rate(np.asarray(predict(nt)) == target)
    out["default"] = default
    return out


def summary(block: dict) -> dict:
    """The headline figures of a `physical` block: default-distribution ASR, false-trigger, worst cell in the
    easy region (yaw <= 30, sticker >= 8% of the sign), stop recall under the same views."""
    d = block.get("default", {})
    easy = [c for c in block.get("cells", []) if c.get("yaw", 0) <= 30 and c.get("sticker", 1) >= 0.08]
    worst = min(easy, key=lambda c: c["asr"]["rate"] if c["asr"]["rate"] is not None else 2) if easy else None
    return {"asr": d.get("asr"), "false_trigger": d.get("false_trigger"), "stop_recall": d.get("stop_recall"),
            "asr_recognised": d.get("asr_recognised"), "clean_acc": d.get("clean_acc"),
            "worst_easy_cell": None if worst is None else {k: worst[k] for k in (*block["grid"]["heatmap"], "asr")}}


def grid_from_dict(raw: dict | None) -> Grid:
    g = Grid()
    for k, v in (raw or {}).items():
        if not hasattr(g, k):
            raise ValueError(f"physical.{k}: unknown setting; settings are {', '.join(asdict(g))}")
        setattr(g, k, v)
    return g
