"""`signtrap eval RUN`: re-evaluate a run's (or a defence's) verified checkpoint.

The attack measured is the one the checkpoint was trained with (its own metadata: source, target,
trigger, data hash); a config.yaml that disagrees is refused rather than producing metrics.json figures
for an attack the model never saw.
"""
from __future__ import annotations

from pathlib import Path

from signtrap.runs import checkpoint
from signtrap.runs import state as runstate
from signtrap.runs.layout import METRICS, owning_run
from signtrap.experiment import Experiment, load_run_config
from signtrap.fileio import require_writable
from signtrap.machine.environment import cpu_threads, resolve_device
from signtrap.training.trainer import write_metrics
from signtrap.triggers import make_trigger


def evaluate_run(model_dir: Path, device: str = "auto") -> dict:
    """Evaluate `model_dir/model.pt` on the test and validation splits and rewrite its metrics.json."""
    model_dir = Path(model_dir)
    cfg = load_run_config(model_dir)
    require_writable(model_dir)  # before loading or decoding anything
    dev = resolve_device(device)
    run_dir = owning_run(model_dir)
    with runstate.locked(run_dir, "signtrap eval"), cpu_threads(cfg.train.threads, stored=True):
        model, meta = checkpoint.verified_load(model_dir, "model.pt", dev)
        size = int(meta.get("input_size", cfg.data.size))
        checkpoint.require_same_attack(meta, cfg, make_trigger(cfg.trigger, size).spec, model_dir)
        exp = Experiment.from_config(cfg)
        checkpoint.verify_provenance(model_dir, meta, cfg, exp)  # data, cache, split, config: before metrics.json is replaced
        metrics = write_metrics(exp, model, model_dir, dev)
        runstate.record_remeasured(run_dir, model_dir / METRICS)  # a re-measurement, not a corrupted file: `signtrap run` keeps the model
        return metrics
