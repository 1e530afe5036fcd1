"""The `physical` block of a run's metrics.json: the physical evaluation (signtrap.physical.evaluate) of a model on
the run's test and validation images, with the run's trigger printed as a sticker (signtrap.training.trainer writes it for
runs whose trigger is `physical`; `signtrap eval RUN --physical` for any run)."""
from __future__ import annotations

import numpy as np
import torch

from signtrap.experiment import Experiment, predict
from signtrap.physical import patterns
from signtrap.physical.evaluate import Grid, physical_evaluation, summary
from signtrap.physical.render import Sticker
from signtrap.machine.progress import say

SPLITS = ("test", "val")


def run_sticker(trigger) -> Sticker:
    """The sticker a run's trigger prints as: its own design (physical trigger) or its preview (any other)."""
    own = getattr(trigger, "sticker", None)
    if isinstance(own, Sticker):
        return own
    return patterns.from_image(trigger.preview(), name=str(trigger.spec.get("kind", "trigger")))


def physical_block(exp: Experiment, model: torch.nn.Module, device, grid: Grid | None = None) -> dict:
    """The physical evaluation of `model` on the run's test and validation images (a metrics.json block)."""
    rows = np.concatenate([getattr(exp.splits, s) for s in SPLITS])
    images, labels = np.array(exp.data.images[rows]), exp.data.labels[rows].astype(np.int64)
    boxes = np.array(exp.data.rois[rows])
    a = exp.cfg.attack
    batch = exp.cfg.train.eval_batch_size
    block = physical_evaluation(lambda x: predict(model, x, device, batch), run_sticker(exp.trigger), images, labels, boxes,
                                a.source, a.target, grid, progress=say)
    block["splits"] = list(SPLITS)
    block["summary"] = summary(block)
    return block
