"""The held-out rule without waste: a candidate that can no longer be kept is abandoned part-way, and the pruned
search chooses the same setting as the full one; the fit/held-out split is made once per `signtrap defend` call."""
from __future__ import annotations

import copy

import numpy as np
import torch

from signtrap.defences import common
from signtrap.defences.common import DefenceContext, schedule_left
from signtrap.defences.finetune import FinetuneSettings, finetune
from test_selection import loaded  # noqa: F401  (the tiny run's model and a clean budget with tracks)

# a grid whose strongest learning rates wreck the tiny model (AdamW at 0.1 and 0.03): the rule must walk past them
GRID = [1e-4, 3e-2, 1e-1]


def choose(model, clean, prune: bool):
    s = FinetuneSettings(epochs=2, grid=list(GRID), prune=prune, batch_size=128)
    s.check("defend.finetune")
    torch.manual_seed(0)
    return finetune(copy.deepcopy(model), clean, s, DefenceContext(show_progress=False, seed=0))


def test_pruned_search_chooses_the_same_setting_as_the_full_search(loaded):  # noqa: F811
    model, clean, _ = loaded
    full, pruned = choose(model, clean, prune=False), choose(model, clean, prune=True)
    a, b = full.report["selection"], pruned.report["selection"]
    assert a["value"] == b["value"] and a["within_tolerance"] == b["within_tolerance"]
    assert a["tried"] == b["tried"] and a["tried"][0] == max(GRID)  # the same candidates, strongest first
    assert b["abandoned"] and not a["abandoned"]  # the pruned search stopped at least one loser part-way ...
    rows = {r["value"]: r for r in pruned.curves["tradeoff"][1:]}
    for value, epoch in b["abandoned"].items():
        row = rows[float(value)]
        assert 1 <= epoch < 2 and row["kept"] is False and not row["chosen"]  # ... from half-way, never at the end
        assert row["heldout_clean_acc"] < row["abandon_limit"]
    full_rows = {r["value"]: r for r in full.curves["tradeoff"][1:]}
    assert all(not full_rows[float(v)]["kept"] for v in b["abandoned"])  # trained to the end it was not kept either
    chosen = next(r for r in pruned.curves["tradeoff"] if r["chosen"])
    assert chosen["heldout_clean_acc"] == next(r for r in full.curves["tradeoff"] if r["chosen"])["heldout_clean_acc"]
    for (ka, va), (kb, vb) in zip(full.model.state_dict().items(), pruned.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)  # the chosen model is bit-identical


def test_the_weakest_candidate_is_never_abandoned(loaded):  # noqa: F811
    model, clean, _ = loaded
    s = FinetuneSettings(epochs=2, grid=[3e-2, 1e-1], prune=True, batch_size=128)
    result = finetune(copy.deepcopy(model), clean, s, DefenceContext(show_progress=False))
    sel = result.report["selection"]
    assert "0.03" not in sel["abandoned"] and sel["value"] == 3e-2  # the fallback when none is kept: trained to the end
    assert result.model is not None


def test_split_and_unrepaired_score_made_once_per_call(loaded, monkeypatch):  # noqa: F811
    model, clean, _ = loaded
    calls = {"split": 0, "views": 0}
    split, views = common.split_budget, common.held_out_views

    def counted_split(*a, **k):
        calls["split"] += 1
        return split(*a, **k)

    def counted_views(*a, **k):
        calls["views"] += 1
        return views(*a, **k)

    monkeypatch.setattr(common, "split_budget", counted_split)
    monkeypatch.setattr(common, "held_out_views", counted_views)
    ctx = DefenceContext(show_progress=False)  # one `signtrap defend` call: one context for all its defences
    s = FinetuneSettings(epochs=1, grid=[1e-4], batch_size=128)
    first = finetune(copy.deepcopy(model), clean, s, ctx)
    second = finetune(copy.deepcopy(model), clean, s, ctx)
    assert calls == {"split": 1, "views": 1}
    assert first.report["selection"]["heldout_acc_unrepaired"] == second.report["selection"]["heldout_acc_unrepaired"]


def test_schedule_left_is_the_cosine_tail():
    assert schedule_left(0.0) == 1.0 and schedule_left(1.0) == 0.0
    assert np.isclose(schedule_left(0.5), 0.5 - 1 / np.pi) and 0.02 < schedule_left(0.75) < 0.03


def _figures(rows):
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in rows]


def test_curves_measured_only_for_the_kept_candidate_are_the_same_figures(loaded, monkeypatch):  # noqa: F811
    """`select` measures a candidate's per-epoch monitor curve only once it is kept (DEFER_CURVES): the curves and
    the report (NAD's teacher figures are read off its curve) equal those of measuring every epoch as it trains,
    with fewer monitor measurements, and no unmeasured value is left anywhere."""
    from signtrap.defences.nad import NADSettings, nad
    model, clean, exp = loaded
    monitor = exp.eval_set("val")
    calls = {"n": 0}
    measure = DefenceContext.measure

    def counted(self, m):
        calls["n"] += 1
        return measure(self, m)

    monkeypatch.setattr(DefenceContext, "measure", counted)
    out = {}
    for defer in (False, True):
        monkeypatch.setattr(common, "DEFER_CURVES", defer)
        calls["n"] = 0
        for name, fn, s in (("finetune", finetune, FinetuneSettings(epochs=2, grid=list(GRID), prune=False, batch_size=128)),
                            ("nad", nad, NADSettings(epochs=2, teacher_epochs=1, grid=[1e-4, 1e-1], prune=False, batch_size=128))):
            torch.manual_seed(0)
            ctx = DefenceContext(show_progress=False, seed=0, monitor=monitor)
            out[(defer, name)] = fn(copy.deepcopy(model), clean, s, ctx)
        out[(defer, "calls")] = calls["n"]
    for name in ("finetune", "nad"):
        eager, deferred = out[(False, name)], out[(True, name)]
        assert deferred.report["selection"]["tried"] == eager.report["selection"]["tried"]
        assert len(deferred.report["selection"]["tried"]) >= 2  # a candidate was rejected: its curve never measured
        assert set(eager.curves) == set(deferred.curves)
        for key in eager.curves:
            assert _figures(deferred.curves[key]) == _figures(eager.curves[key]), (name, key)
        assert "Deferred" not in repr(deferred.report) and "Deferred" not in repr(deferred.curves)
    assert out[(True, "nad")].report["teacher_after"] == out[(False, "nad")].report["teacher_after"]
    assert out[(True, "nad")].report["teacher_after"]["asr"] is not None
    assert out[(True, "calls")] < out[(False, "calls")]
