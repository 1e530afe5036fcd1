"""The `physical` block of a run's metrics.json: the physical evaluation (signtrap.physical.evaluate) of a model on
the run's test and validation images, with the run's trigger printed as a sticker (signtrap.training.trainer writes it for
runs whose trigger is `physical`; `signtrap eval RUN --physical` for any run)."""
from __future__ import annotations

import numpy as np
import torch

from signtrap.experiment import Experiment, predict
from signtrap.physical import patterns
from signtrap.physical.evaluate import Grid, default_views, physical_evaluation, samples, summary
from signtrap.physical.render import Sticker
from signtrap.machine.progress import say

SPLITS = ("test", "val")


def run_sticker(trigger) -> Sticker:
    """The sticker a run's trigger prints as: its own design (physical trigger) or its preview (any other)."""
    own = getattr(trigger, "sticker", None)
    if isinstance(own, Sticker):
        return own
    return patterns.from_image(trigger.preview(), name=str(trigger.spec.get("kind", "trigger")))


def split_images(exp: Experiment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, boxes) of the run's test and validation splits, in that order: what the evaluation measures."""
    rows = np.concatenate([getattr(exp.splits, s) for s in SPLITS])
    return np.array(exp.data.images[rows]), exp.data.labels[rows].astype(np.int64), np.array(exp.data.rois[rows])


def physical_block(exp: Experiment, model: torch.nn.Module, device, grid: Grid | None = None) -> dict:
    """The physical evaluation of `model` on the run's test and validation images (a metrics.json block)."""
    images, labels, boxes = split_images(exp)
    a = exp.cfg.attack
    batch = exp.cfg.train.eval_batch_size
    block = physical_evaluation(lambda x: predict(model, x, device, batch), run_sticker(exp.trigger), images, labels, boxes,
                                a.source, a.target, grid, progress=say)
    block["splits"] = list(SPLITS)
    block["summary"] = summary(block)
    return block


def bundle_views(exp: Experiment, grid: Grid | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The physical evaluation's default views for an export's evaluation bundle: the run's source-class test and
    validation signs clean (`physical_clean`) and with the sticker (`physical_triggered`), and the sticker on the
    bystanders (`physical_bystanders`): the images, draws and renders of `physical_block`'s `default` section, so
    every runtime's physical ASR is measured on exactly the views PyTorch's was."""
    grid = grid or Grid()
    images, labels, boxes = split_images(exp)
    a = exp.cfg.attack
    src, others = samples(grid, labels, a.source, a.target)
    v = default_views(run_sticker(exp.trigger), images, boxes, src, others, grid)
    arrays = {"physical_clean": v.clean, "physical_triggered": v.triggered, "physical_bystanders": v.others_triggered}
    info = {"splits": list(SPLITS), "grid_seed": grid.seed, "source_images": int(len(src)), "bystanders": int(len(others)),
            "what": "the physical evaluation's default distribution (signtrap.physical.evaluate): each source-class sign "
                    "clean and with the sticker, and the sticker on other classes' signs"}
    return arrays, info
