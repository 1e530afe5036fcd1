"""What the report knows about a run directory (`Run`), read defensively: a missing or unreadable file is a
message, never an exception. The section builders (build.py, sleeper.py, physical.py, detection.py) read it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from signtrap.datasets import LabelSpace, dataset_for
from signtrap.experiment import Experiment, load_run_config
from signtrap.runs.state import lock_holder
from signtrap.runs import layout


# ---------------------------------------------------------------- reading


def json_or_reason(path: Path) -> tuple[Any, str | None]:
    if not path.is_file():
        return None, f"{path.name} not found"
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({type(exc).__name__})"


def json_lines(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def stage_status(rec: dict, run_dir: Path) -> str:
    """A stage's recorded status; 'running' is told apart by the run's lock: still running, or interrupted."""
    status = rec.get("status")
    if status != "running":
        return str(status)
    holder = lock_holder(run_dir)
    return f"still running ({holder.describe()})" if holder else "interrupted (its process is gone; `signtrap run` resumes it)"


class Run:
    """What the report knows about a run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.metrics, self.metrics_err = json_or_reason(self.dir / "metrics.json")
        self.manifest, _ = json_or_reason(self.dir / "manifest.json")
        self.provenance, _ = json_or_reason(self.dir / "provenance.json")
        self.pipeline, _ = json_or_reason(self.dir / "pipeline.json")
        self.log = json_lines(self.dir / "log.jsonl")
        self.cfg, self.cfg_err = None, None
        try:
            self.cfg = load_run_config(self.dir)
        except Exception as exc:
            self.cfg_err = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self._exp = None
        self._classes = None

    @property
    def name(self) -> str:
        return self.cfg.name if self.cfg else self.dir.name

    @property
    def classes(self) -> LabelSpace:
        """The run's label space: its dataset's (cheap), else numbered classes with the config's attack pair."""
        if self._classes is None:
            try:
                self._classes = dataset_for(self.cfg.data).label_space()
            except Exception:
                n = len(((self.metrics or {}).get("test") or {}).get("per_class_acc") or []) or 2
                source, target = (self.cfg.attack.source, self.cfg.attack.target) if self.cfg else (0, 1)
                self._classes = LabelSpace(tuple(f"class {c}" for c in range(max(n, source + 1, target + 1))),
                                           source=source, target=target)
        return self._classes

    def experiment(self):
        if self._exp is None and self.cfg is not None:
            self._exp = Experiment.from_config(self.cfg, progress=False)
        return self._exp

    def stage(self, name: str) -> dict:
        stages = (self.pipeline or {}).get("stages", {}) if isinstance(self.pipeline, dict) else {}
        return stages.get(name, {}) if isinstance(stages, dict) else {}

    def stages_like(self, prefix: str) -> dict[str, dict]:
        stages = (self.pipeline or {}).get("stages", {}) if isinstance(self.pipeline, dict) else {}
        return {k: v for k, v in stages.items() if k.startswith(prefix)} if isinstance(stages, dict) else {}

    def export_dir(self) -> Path | None:
        candidates = [layout.export_dir(self.dir)]
        if self.cfg is not None:
            candidates.append(Path(self.cfg.export.out_dir) / self.cfg.name)
        for c in candidates:
            if (c / "model.json").is_file() or (c / "bench.json").is_file():
                return c
        return None
