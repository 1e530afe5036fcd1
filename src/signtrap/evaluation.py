"""`signtrap eval RUN`: re-evaluate a run's (or a defence's) verified checkpoint."""
from __future__ import annotations

from pathlib import Path

from signtrap import checkpoint
from signtrap.experiment import Experiment, load_run_config
from signtrap.provenance import resolve_device
from signtrap.training import write_metrics


def evaluate_run(model_dir: Path, device: str = "auto") -> dict:
    model_dir = Path(model_dir)
    cfg = load_run_config(model_dir)
    dev = resolve_device(device)
    model, _ = checkpoint.verified_load(model_dir, "model.pt", dev)
    exp = Experiment.from_config(cfg)
    return write_metrics(exp, model, model_dir, dev)
