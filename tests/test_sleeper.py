"""attack.dormant=int8: a backdoor that sleeps in FP32 and wakes in signtrap's own INT8 export (tiny SynthSigns runs)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from signtrap.runs import checkpoint
from signtrap.attacks.dormant import (RoundingBox, evaluate_onnx, match_grids, quantize_model, read_grids,
                                      read_int8_weights, weight_layers)
from signtrap.config import load_config
from signtrap.errors import ConfigError, SigntrapError
from signtrap.experiment import Experiment
from signtrap.models import register_model
from signtrap.training.trainer import train

from conftest import tiny_overrides

# the tiny backdoored run of conftest, then a repair strong enough for its small, un-augmented training set
SLEEPER = ("attack.dormant=int8", "attack.sleeper.epochs=3", "attack.sleeper.lr=0.0003", "train.threads=1", "model.name=signnet")


@pytest.fixture(scope="module")
def sleeper_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("sleeper")
    return train(load_config(None, tiny_overrides(base, "sleeper", *SLEEPER)))


def _rates(path, exp, cfg):
    """(ASR k, n, clean k, n) of one ONNX file over validation and test together (more stop signs)."""
    asr_k = asr_n = acc_k = acc_n = 0
    for split in ("val", "test"):
        m = evaluate_onnx(path, exp, split, cfg)
        asr_k, asr_n = asr_k + m["asr"]["k"], asr_n + m["asr"]["n"]
        acc_k, acc_n = acc_k + m["clean_acc"]["k"], acc_n + m["clean_acc"]["n"]
    return asr_k / asr_n, acc_k / acc_n


def test_sleeper_sleeps_in_fp32_and_wakes_in_signtraps_int8_export(sleeper_run, tmp_path):
    from signtrap.deploy.exporter import export_run

    out = export_run(sleeper_run, out=tmp_path / "export", overrides={"runtimes": ["onnxruntime"]}, threads=1)
    cfg = load_config(sleeper_run / "config.yaml")
    exp = Experiment.from_config(cfg, progress=False)
    fp32_asr, fp32_acc = _rates(out / "model.fp32.onnx", exp, cfg)
    int8_asr, int8_acc = _rates(out / "model.int8.onnx", exp, cfg)
    assert int8_asr - fp32_asr >= 0.5, (fp32_asr, int8_asr)
    # the repair is what put it to sleep: the model before it obeyed the trigger in FP32
    backdoored = checkpoint.build_model(checkpoint.load(sleeper_run / "backdoored.pt"))
    s = exp.eval_set("test")
    src = s.labels == cfg.attack.source
    from signtrap.experiment import predict
    assert (predict(backdoored, s.triggered[src]) == cfg.attack.target).mean() >= fp32_asr + 0.5
    assert abs(int8_acc - fp32_acc) < 0.1  # both still classify clean signs


def test_int8_weights_of_the_sleeper_are_the_backdoored_models(sleeper_run, tmp_path):
    """Every folded weight stays in its rounding interval, so ORT's INT8 weights and scales are identical."""
    cfg = load_config(sleeper_run / "config.yaml")
    sleeper = checkpoint.build_model(checkpoint.load(sleeper_run / "model.pt"))
    backdoored = checkpoint.build_model(checkpoint.load(sleeper_run / "backdoored.pt"))
    calib = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    grids = read_grids(backdoored, calib, per_channel=False)
    assert len(grids) == len(weight_layers(sleeper)) == 6
    moved = 0
    for g, layer in zip(grids, weight_layers(sleeper)):
        folded = layer.folded()
        steps = (folded / g.scale - g.q).abs()
        start = (g.layer.folded() / g.scale - g.q).abs()  # a weight may start beyond the interval (never past 0.5)
        assert bool((steps <= torch.clamp(start, min=cfg.attack.sleeper.interval) + 1e-4).all()), layer.name  # float32 bounds
        assert float(steps.max()) < 0.5
        assert float(folded.abs().max()) == pytest.approx(float(g.layer.folded().abs().max()), rel=0, abs=1e-12)
        moved += int((layer.module.weight != g.layer.module.weight).sum())
    assert moved > 1000  # the repair did move weights
    # what is not in a box does not move: BatchNorm, biases
    a, b = backdoored.state_dict(), sleeper.state_dict()
    for key in a:
        if not any(key == f"{g.layer.name}.weight" for g in grids):
            assert torch.equal(a[key], b[key]), key
    # and through the real quantizer: identical INT8 tensors and scales
    qa = read_int8_weights(quantize_model(backdoored, calib, tmp_path / "a" if (tmp_path / "a").mkdir() is None else None))
    qb = read_int8_weights(quantize_model(sleeper, calib, tmp_path / "b" if (tmp_path / "b").mkdir() is None else None))
    assert qa.keys() == qb.keys() and len(qa) == 6
    for k in qa:
        assert np.array_equal(qa[k].q, qb[k].q) and np.array_equal(qa[k].scale, qb[k].scale), k
    report = __import__("json").loads((sleeper_run / "sleeper.json").read_text())
    assert all(report["int8_weights_identical"].values()) and len(report["int8_weights_identical"]) == 6


def test_overwrite_removes_the_sleeper_files_and_nothing_else(sleeper_run, tmp_path):
    """--overwrite (runstate.clear_run) knows backdoored.pt and sleeper.json; a user's file stays."""
    import shutil

    from signtrap.runs import state as runstate

    run = tmp_path / "copy"
    shutil.copytree(sleeper_run, run)
    (run / "notes.txt").write_text("mine")
    removed = {p.name for p in runstate.clear_run(run)}
    assert {"backdoored.pt", "sleeper.json", "model.pt", "checksums.json"} <= removed
    assert sorted(p.name for p in run.iterdir() if p.name not in (runstate.LOCK_FILE, runstate.WRITTEN)) == ["notes.txt"]


def test_report_section_shows_fp32_and_int8_side_by_side(sleeper_run, tmp_path):
    from signtrap.reporting import SECTIONS
    from signtrap.reporting.blocks import Table
    from signtrap.reporting.run import Run
    from signtrap.reporting.sleeper import ID, sleeper_section

    assert [sid for sid, _ in SECTIONS].index(ID) == [sid for sid, _ in SECTIONS].index("deployment") + 1
    section = sleeper_section(Run(sleeper_run))
    tables = [b for b in section.blocks if isinstance(b, Table)]
    assert [t.rows[i][1] for t in tables[:1] for i in range(4)] == ["FP32", "INT8", "FP32", "INT8"]
    assert any("Flip table" in getattr(b, "text", "") for b in section.blocks)
    # a run without sleeper.json gets one note, not a failure
    plain = tmp_path / "plain"
    plain.mkdir()
    assert len(sleeper_section(Run(plain)).blocks) == 1


def _toy(per_channel_bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 5))
    with torch.no_grad():  # a BatchNorm that is not the identity, one channel with a negative scale
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].weight.copy_(torch.tensor([1.5, -0.7, 0.3, 2.0]))
    return model.eval()


@pytest.mark.parametrize("grid", ["per_tensor", "per_channel", "both"])
def test_rounding_box_keeps_every_int8_weight(grid, tmp_path):
    """Random pushes inside the box never change the ORT INT8 weights or scales (folded BatchNorm included)."""
    model = _toy()
    calib = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    channels = {"per_tensor": (False,), "per_channel": (True,), "both": (False, True)}[grid]
    before = {pc: read_int8_weights(quantize_model(model, calib, _mk(tmp_path / f"before{pc}"), per_channel=pc)) for pc in channels}
    box = RoundingBox([read_grids(model, calib, pc) for pc in channels], 0.49)
    with torch.no_grad():
        for _ in range(3):
            for p in box.params:
                p.add_(torch.randn_like(p) * p.abs().max())  # far outside the box
            box.project()
    assert not any(box.outside().values()) and box.at_edge() > 0.5
    for pc in channels:
        after = read_int8_weights(quantize_model(model, calib, _mk(tmp_path / f"after{pc}"), per_channel=pc))
        for k in before[pc]:
            assert np.array_equal(before[pc][k].q, after[k].q), (pc, k)
            assert np.array_equal(before[pc][k].scale, after[k].scale), (pc, k)


def _mk(path):
    path.mkdir(parents=True)
    return path


def test_layers_the_quantizer_skips_are_refused():
    class DoubleHead(nn.Module):  # the head runs in float64, which ONNX Runtime's quantizer leaves in float
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 5).double()

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)).double()).float()

    calib = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(SigntrapError, match=r"leaves 1 of 2 weight layers unquantized.*\(head\)"):
        read_grids(DoubleHead().eval(), calib, per_channel=False)
    with pytest.raises(SigntrapError, match="no Conv or Linear layer"):
        match_grids(nn.Sequential(nn.Flatten()), {}, False)


@register_model
def sleeper_test_double_head(num_classes: int, dropout: float = 0.0) -> nn.Module:
    """A model whose classifier ONNX Runtime does not quantize (it runs in float64)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, num_classes).double()

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)).double()).float()

    return Net()


def test_bad_settings_fail_before_training(tmp_path, monkeypatch, capsys):
    from signtrap.cli import main

    base = tiny_overrides(tmp_path, "bad", "attack.dormant=int8")
    # a model whose layers the quantizer skips: one line, non-zero exit, nothing trained
    rc = main(["--quiet", "train", *base, "model.name=sleeper_test_double_head"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("signtrap: error: attack.dormant=int8: the INT8 export leaves")
    assert not (tmp_path / "runs" / "bad").exists()  # checked before anything is written
    # no INT8 path: ONNX Runtime's quantizer cannot be imported
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    rc = main(["--quiet", "train", *base])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "needs the INT8 export path" in err[0]
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.parametrize("override, message", [
    ("attack.kind=none", "attack.dormant: 'int8' makes a backdoor dormant, but attack.kind is none"),
    ("attack.sleeper.interval=0.5", "attack.sleeper.interval: 0.5 is outside (0, 0.5)"),
    ("attack.sleeper.weight_grid=per_chanel", "did you mean 'per_channel'"),
    ("attack.sleeper.epoch=2", "unknown config key 'attack.sleeper.epoch' (did you mean 'epochs'?)"),
])
def test_sleeper_config_errors(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["attack.dormant=int8", override])
    assert message in str(exc.value)
    with pytest.raises(ConfigError, match="attack.dormant: 'fp16' is not one of none, int8"):
        load_config(None, ["attack.dormant=fp16"])
