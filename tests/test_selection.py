"""The held-out rule that chooses a repairing defence's main knob: whole tracks, defender's data only, the
strongest setting that keeps the model, and the trade-off curve it leaves behind."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from signtrap.runs import checkpoint
from signtrap.defences.common import (CleanData, DefenceContext, DefenceResult, LrTunedSettings, TunedSettings, select,
                                      split_budget)
from signtrap.errors import ConfigError, SigntrapError
from signtrap.experiment import EvalSet, Experiment, load_run_config


@dataclass
class NoiseSettings(TunedSettings):
    """A toy repair whose main knob is the scale of noise added to every weight: stronger is more damage."""

    KNOB = "scale"
    scale: float | None = None
    grid: list[float] = field(default_factory=lambda: [0.0001, 0.001, 0.01, 0.3, 1.0])


def noisy_repair(data: CleanData):
    def repair(m: nn.Module, scale: float) -> DefenceResult:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
        return DefenceResult(m, {"scale": scale, "trained_on": len(data)}, {})
    return repair


@pytest.fixture(scope="module")
def loaded(tiny_run):
    model, _ = checkpoint.verified_load(tiny_run, "model.pt")
    exp = Experiment.from_config(load_run_config(tiny_run), progress=False)
    rows = exp.defender_rows(0.3)
    tracks = np.repeat(np.arange(len(rows) // 3 + 1), 3)[:len(rows)]  # pretend every 3 images are one physical sign
    clean = CleanData(np.asarray(exp.data.images[rows]), np.asarray(exp.data.labels[rows]), rows, tracks)
    return model, clean, exp


def test_split_keeps_whole_tracks_and_is_seeded(loaded):
    _, clean, _ = loaded
    fit_part, held = split_budget(clean, 1 / 3, seed=0)
    assert len(fit_part) + len(held) == len(clean)
    assert not np.intersect1d(fit_part.tracks, held.tracks).size  # no physical sign on both sides
    assert not np.intersect1d(fit_part.rows, held.rows).size
    n_tracks = len(np.unique(clean.tracks))
    assert len(np.unique(held.tracks)) == round(n_tracks / 3)
    again, _ = split_budget(clean, 1 / 3, seed=0)
    other, _ = split_budget(clean, 1 / 3, seed=1)
    assert np.array_equal(again.rows, fit_part.rows) and not np.array_equal(other.rows, fit_part.rows)
    with pytest.raises(SigntrapError, match="at least 2 tracks"):
        split_budget(CleanData(clean.images[:3], clean.labels[:3], None, np.zeros(3, np.int64)), 1 / 3, 0)


def test_rule_keeps_the_strongest_setting_that_keeps_the_model(loaded):
    model, clean, exp = loaded
    s = NoiseSettings()
    s.check("defend.noise")
    ctx = DefenceContext(monitor=exp.eval_set("val"), show_progress=False)
    weights = copy.deepcopy(model.state_dict())
    result = select(model, clean, ctx, s, method="noise", prepare=noisy_repair)
    sel, rows = result.report["selection"], result.curves["tradeoff"]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the input model is never changed
    assert rows[0]["candidate"] == "unrepaired" and rows[0]["value"] is None
    tried = [r["value"] for r in rows[1:]]
    assert tried == sorted(tried, reverse=True) and tried[0] == 1.0  # strongest first, until one keeps the model
    assert rows[1]["kept"] is False and rows[1]["heldout_clean_acc"] < 0.5  # noise of the weights' own size breaks it
    chosen = [r for r in rows[1:] if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["kept"] and chosen[0] is rows[-1]  # until-kept stops at the first kept value
    assert sel["value"] == chosen[0]["value"] == result.report["scale"] and sel["within_tolerance"]
    assert rows[0]["heldout_clean_acc"] - chosen[0]["heldout_clean_acc"] <= s.tolerance + 1e-9
    assert result.report["trained_on"] == sel["fit_images"] < len(clean)  # candidates see only the fit part
    assert sel["fit_images"] + sel["heldout_images"] == len(clean)
    for r in rows:
        assert {"clean_acc", "asr", "stop_recall", "false_trigger", "heldout_clean_acc", "knob"} <= set(r)


def test_rule_never_looks_at_the_monitor_or_test_split(loaded):
    """The choice is the same with the monitor split replaced by garbage: it is measurement only."""
    model, clean, exp = loaded
    s = NoiseSettings(sweep="full")
    val = exp.eval_set("val")
    junk = EvalSet("val", np.zeros_like(val.images), np.zeros_like(val.triggered), np.zeros_like(val.labels))
    a = select(model, clean, DefenceContext(monitor=val, show_progress=False), s, method="noise", prepare=noisy_repair)
    b = select(model, clean, DefenceContext(monitor=junk, show_progress=False), s, method="noise", prepare=noisy_repair)
    c = select(model, clean, DefenceContext(monitor=None, show_progress=False), s, method="noise", prepare=noisy_repair)
    assert a.report["selection"]["value"] == b.report["selection"]["value"] == c.report["selection"]["value"]
    assert len(a.curves["tradeoff"]) == len(s.grid) + 1  # full sweep: every value


def test_nothing_kept_returns_the_weakest_flagged(loaded):
    model, clean, _ = loaded
    s = NoiseSettings(grid=[0.5, 1.0, 2.0], sweep="full")
    result = select(model, clean, DefenceContext(show_progress=False), s, method="noise", prepare=noisy_repair)
    sel = result.report["selection"]
    assert sel["value"] == 0.5 and not sel["within_tolerance"]


def test_a_fixed_knob_skips_the_rule_and_uses_the_whole_budget(loaded):
    model, clean, _ = loaded
    result = select(model, clean, DefenceContext(show_progress=False), NoiseSettings(scale=0.001), method="noise",
                    prepare=noisy_repair)
    assert result.report["selection"]["fixed"] and result.report["trained_on"] == len(clean)
    assert "tradeoff" not in result.curves


def test_settings_validation():
    LrTunedSettings().check("defend.x")
    for bad, message in (({"grid": [0.0]}, "defend.x.grid: 0.0 is outside"), ({"lr": 2.0}, "defend.x.lr: 2.0 is outside"),
                         ({"holdout": 1.0}, "defend.x.holdout"), ({"tolerance": -0.1}, "defend.x.tolerance"),
                         ({"sweep": "some"}, "defend.x.sweep: 'some' is not one of"), ({"grid": []}, "needs at least one value"),
                         ({"grid": [1e-3, 1e-4]}, r"defend.x.grid: \[0.001, 0.0001\] must be ascending"),
                         ({"grid": [1e-4, 1e-4]}, "must be ascending without repeats")):
        with pytest.raises(ConfigError, match=message):
            LrTunedSettings(**bad).check("defend.x")
    LrTunedSettings(grid=[], lr=1e-3).check("defend.x")  # a fixed knob needs no grid


def test_a_learning_rate_from_the_command_line_is_a_number():
    from signtrap.config import load_config

    cfg = load_config(None, ["defend.finetune.lr=1e-4", "defend.finetune.grid=[1e-5,3e-5]"])
    assert cfg.defend.method("finetune").lr == 1e-4 and cfg.defend.method("finetune").grid == [1e-5, 3e-5]
