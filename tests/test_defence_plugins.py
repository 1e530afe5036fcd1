"""The defence plugin structure: one file per defence, validation through the registry, one training loop."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from signtrap.cli import main
from signtrap.config import load_config, require
from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, TrainSettings, fit
from signtrap.errors import ConfigError


# ---------------------------------------------------------------- a defence defined here, in a test module


@dataclass
class ShrinkSettings(TrainSettings):
    """Scale the classifier's last layer, then fine-tune briefly (a toy defence for the plugin tests)."""

    epochs: int = 1
    factor: float = 0.5

    def check(self, key: str) -> None:
        super().check(key)
        require(0.0 < self.factor <= 1.0, f"{key}.factor", f"{self.factor} is outside (0, 1]")


@register_defence("test-shrink", settings=ShrinkSettings)
def shrink(model: nn.Module, clean: CleanData, s: ShrinkSettings, ctx: DefenceContext) -> DefenceResult:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(s.factor)
    curve = fit(model, clean, ctx, method="test-shrink", schedule=s.schedule("defend.test-shrink"), augment=s.augment)
    return DefenceResult(model, {"factor": s.factor}, {"persistence": curve})


@shrink.summary
def _summary(report: dict) -> list[str]:
    return [f"test-shrink: last layer scaled by {report['details']['factor']}"]


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("plugins") / tiny_run.name
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("defence-*"))
    return dest


def test_config_module_imports_no_feature_package():
    code = ("import sys, signtrap.config as c; c.RunConfig(); "
            "print(sorted(m for m in sys.modules if m.startswith(('signtrap.defences', 'signtrap.deploy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_defend_section_is_validated_through_the_registry():
    cfg = load_config(None, ["defend.test-shrink.factor=0.25", "defend.methods=[finetune,test-shrink]"])
    assert cfg.defend.method("test-shrink") == ShrinkSettings(factor=0.25)
    assert cfg.defend.method("finetune").epochs == 10  # a defence the config does not mention: its own defaults
    with pytest.raises(ConfigError, match=r"defend.test-shrink.factor: 2.0 is outside"):
        load_config(None, ["defend.test-shrink.factor=2.0"])
    with pytest.raises(ConfigError, match=r"unknown config key 'defend.test-shrink.facter' \(did you mean 'factor'\?\)"):
        load_config(None, ["defend.test-shrink.facter=2.0"])
    with pytest.raises(ConfigError, match=r"defend.methods: unknown defence 'test-shrnk' \(did you mean 'test-shrink'\?\)"):
        load_config(None, ["defend.methods=[test-shrnk]"])
    # the one spelling survives a round trip through YAML
    from signtrap.config import dump_yaml

    text = dump_yaml(cfg)
    assert "test-shrink:" in text and "test_shrink" not in text
    assert load_config(None, []).__class__.__name__ == "RunConfig"
    raw = yaml.safe_load(text)
    assert raw["defend"]["test-shrink"]["factor"] == 0.25


def test_a_defence_registered_in_a_test_module_runs_from_the_cli(run_copy, capsys):
    rc = main(["--quiet", "defend", str(run_copy), "--method", "test-shrink", "test-shrink.factor=0.75", "clean_fraction=0.3",
               "probe.enabled=false"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "test-shrink: last layer scaled by 0.75" in out  # its own summary line
    report = json.loads((run_copy / "defence-test-shrink" / "report.json").read_text())
    assert report["settings"]["factor"] == 0.75 and report["kind"] == "repair" and report["repaired_model"]
    assert [row["epoch"] for row in report_curve(run_copy / "defence-test-shrink")] == [0, 1]


def report_curve(folder: Path) -> list[dict]:
    import csv

    with open(folder / "persistence.csv", newline="") as fh:
        return [{"epoch": int(r["epoch"])} for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_a_defence_registered_in_a_test_module_runs_in_the_pipeline(tmp_path):
    from conftest import tiny_overrides

    from signtrap.runs.pipeline import run_pipeline

    cfg = load_config(None, tiny_overrides(tmp_path, "plug", "train.epochs=2", "defend.methods=[test-shrink]",
                                           "defend.clean_fraction=0.3", "defend.probe.enabled=false", "export.enabled=false"))
    summary = run_pipeline(cfg)
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status["defend:test-shrink"] == "ran", status
    assert (cfg.run_dir / "defence-test-shrink" / "model.pt").is_file()
    html = (cfg.run_dir / "report.html").read_text()
    assert "test-shrink" in html


class _Trained(BaseException):
    """Raised by the patched Loop.fit once a defence's loop is built: what it would train with is recorded, the
    training itself is skipped (the defences' own results are tested in test_defences.py)."""


def test_training_defences_inherit_the_runs_precision_and_augmentation(run_copy, monkeypatch):
    """Every registered defence that trains goes through signtrap.training.loop.Loop with the run's train.precision and
    aug settings; every repairing defence trains."""
    import signtrap.training.loop as loop_mod
    from defence_settings import fast

    from signtrap.defences import get_defence, list_defences
    from signtrap.defences.run import Session

    seen: list[tuple[str, object, str]] = []

    def record(self, *args, **kwargs):
        seen.append((self.desc, self.aug, self.precision))
        raise _Trained

    monkeypatch.setattr(loop_mod.Loop, "fit", record)
    # a run whose config says bf16 + these augmentations (as if trained with them): the provenance rule, which refuses
    # an edited config.yaml (tests/test_redteam.py), is not what this test is about
    import signtrap.runs.checkpoint as checkpoint_mod
    monkeypatch.setattr(checkpoint_mod, "verify_provenance", lambda *args, **kwargs: None)
    raw = yaml.safe_load((run_copy / "config.yaml").read_text())
    raw["train"]["precision"] = "bf16"
    raw["aug"].update({"enabled": True, "rotate": 7.0, "blur_p": 0.0})
    changed = run_copy.parent / "changed"
    shutil.copytree(run_copy, changed, ignore=shutil.ignore_patterns("defence-*"))
    (changed / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    methods = [m for m in list_defences() if m != "test-shrink"]
    # the detectors' searches only decide whether they unlearn: a few steps are enough to reach the loop, or not
    cheap = ["neural-cleanse.steps=5", "neural-cleanse.samples=64", "scan.restarts=1", "scan.iterations=20", "strip.overlays=2"]
    overrides = ["clean_fraction=0.3", "probe.enabled=false"] + [o for m in methods for o in fast(m)] + cheap
    session = Session.open(changed, overrides, "cpu", show_progress=False)
    trained = []
    for method in methods:
        seen.clear()
        try:
            session.run(method)
        except _Trained:
            pass
        if get_defence(method).kind == "repair":
            assert seen, f"{method} did not train through the loop"
        for desc, aug, precision in seen:
            assert desc == method
            assert aug == session.cfg.aug and aug.rotate == 7.0 and aug.enabled
            assert precision == "bf16"
        trained += [method] if seen else []
    assert {"finetune", "anp", "nad", "i-bau", "ft-sam", "fst"} <= set(trained)
    assert not [m for m in trained if (changed / f"defence-{m}").exists()], "an interrupted defence left an output folder"
    # a defence whose settings turn augmentation off gets none
    seen.clear()
    session.cfg.defend.per_method["finetune"] = dataclasses.replace(session.cfg.defend.method("finetune"), augment=False, lr=1e-3)
    with pytest.raises(_Trained):
        session.run("finetune")
    assert seen and not seen[0][1].enabled
