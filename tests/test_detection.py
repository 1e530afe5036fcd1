"""Detection: Neural Cleanse and STRIP see the all-to-one backdoor, SCAn sees a contaminated class; the detection table."""
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from signtrap.config import load_config
from signtrap.defences.run import run_defences
from signtrap.defences.common import robust_z
from signtrap.defences.scan import two_subgroups, untangle
from signtrap.defences.strip import strip_entropy
from signtrap.experiment import to_tensor
from signtrap.models import create_model
from signtrap.reporting.blocks import read_csv
from signtrap.reporting.detection import attack_label, detection_cell, detection_table
from test_defences import tree_hash

NC = ["neural-cleanse.top_k=0", "neural-cleanse.candidates=[0,1,2,3,4,5,7,13,14,38]", "neural-cleanse.steps=100",
      "neural-cleanse.samples=128", "neural-cleanse.epochs=0"]
SETTINGS = {"neural-cleanse": NC, "strip": ["strip.overlays=8"], "scan": []}


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest / run.name, ignore=shutil.ignore_patterns("defence-*", "probe.json"))
    return dest / run.name


def detect(run: Path, method: str) -> dict:
    """Run one detector; it must leave the run directory as it found it (defence-METHOD aside)."""
    before = tree_hash(run, skip_defences=True)
    (report,) = run_defences(run, method, ["clean_fraction=0.3", *SETTINGS[method]], "cpu", show_progress=False)
    assert tree_hash(run, skip_defences=True) == before, f"{method} changed the run directory"
    assert not report["repaired_model"] or method == "neural-cleanse"
    return report["details"]


# ---------------------------------------------------------------- SCAn's pieces


def test_untangling_and_split_recover_a_planted_subgroup():
    rng = np.random.default_rng(0)
    dim, classes = 6, 8
    centres = rng.normal(0, 3, (classes, dim))
    y = np.repeat(np.arange(classes), 80)
    x = centres[y] + rng.normal(0, 1, (len(y), dim))
    model = untangle(x, y)
    assert np.allclose(np.diag(model.s_e), 1, atol=0.35)  # the shared variation: unit noise
    assert np.trace(model.s_mu) > 5 * np.trace(model.s_e)  # the identities are far apart
    poisoned = centres[3] + rng.normal(0, 1, (30, dim)) + 6  # another identity hiding in class 3
    pool = np.concatenate([centres[3] + rng.normal(0, 1, (80, dim)), poisoned]) - model.mean
    first, _ = two_subgroups(pool, np.linalg.inv(model.s_e), rng)
    minority = first if first.sum() <= len(first) / 2 else ~first
    assert minority[80:].all() and not minority[:80].any()
    assert robust_z(np.array([1.0, 1.1, 0.9, 1.05, 9.0]))[-1] > math.exp(2)


def test_strip_entropy_is_the_mean_entropy_of_the_drawn_blends():
    """STRIP's batched entropies (CPU chunks, overlays converted once) are those of each input's own blends,
    computed one input at a time from the same draws."""
    torch.manual_seed(0)
    model = create_model("signnet", 43).eval()
    rng = np.random.default_rng(1)
    images, overlays = (rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8) for k in (9, 30))
    n, alpha = 5, 0.4
    got = strip_entropy(model, images, overlays, n, alpha, np.random.default_rng(7), "cpu", batch_size=12)
    draws = np.random.default_rng(7)
    want = []
    with torch.no_grad():
        for start in range(0, len(images), 2):  # the draws come per chunk of 12 // 5 = 2 inputs
            picks = draws.integers(0, len(overlays), (len(images[start:start + 2]), n))
            for row, image in zip(picks, images[start:start + 2]):
                blends = (1 - alpha) * to_tensor(image[None], "cpu") + alpha * to_tensor(overlays[row], "cpu")
                p = torch.softmax(model(blends.contiguous()), 1)
                want.append(float(-(p * torch.log(p.clamp_min(1e-12))).sum(1).mean()))
    assert np.allclose(got, want, rtol=0, atol=1e-5), (got, want)
    assert got.std() > 0  # the inputs' entropies differ: the comparison has something to compare


# ---------------------------------------------------------------- detectors on tiny models


@pytest.mark.slow
def test_neural_cleanse_and_strip_see_the_all_to_one_backdoor(tiny_a2o_run, tmp_path):
    run = copy_run(tiny_a2o_run, tmp_path)
    nc = detect(run, "neural-cleanse")  # the authors' optimisation (cost schedule, early stop) on every candidate
    assert nc["flagged"] == [7] and nc["anomaly_index"]["7"] > 2, nc["anomaly_index"]
    assert nc["trigger_pixels"] == 36  # the tiny runs' 6 x 6 trigger; the reversed mask of 7 is near its size
    assert nc["target_mask_l1"] <= 1.5 * nc["trigger_pixels"] and nc["target_mask_l1"] < 0.6 * nc["median_mask_l1"], nc
    strip = detect(run, "strip")
    assert strip["attack_inputs"] == "triggered non-target images"
    assert strip["auc"] > 0.8, strip  # triggered inputs of every class keep a low entropy
    assert strip["detection_rate"]["rate"] > strip["false_rejection_rate"]["rate"] + 0.3, strip
    roc = strip["at_measured_frr"]  # the ROC point: the threshold read off the clean test images at the 5% target
    assert 0 < roc["false_rejection_rate"]["rate"] <= 0.05 and roc["detection_rate"]["rate"] > roc["false_rejection_rate"]["rate"] + 0.3, roc


@pytest.mark.slow
def test_neural_cleanse_top_k_refines_the_smallest_screened_masks_and_random_others(tiny_a2o_run, tmp_path):
    """The top-k shortcut: every candidate screened, the k smallest screened masks and `reference` random others
    searched in full; the anomaly index over those only; the all-to-one target among the k smallest."""
    run = copy_run(tiny_a2o_run, tmp_path)
    settings = [s for s in NC if not s.startswith("neural-cleanse.top_k")] + ["neural-cleanse.top_k=2", "neural-cleanse.reference=3",
                                                                               "neural-cleanse.screen_steps=4"]
    (report,) = run_defences(run, "neural-cleanse", ["clean_fraction=0.3", *settings], "cpu", show_progress=False)
    d = report["details"]
    rows = {int(r["class"]): r for r in read_csv(run / "defence-neural-cleanse" / "norms.csv")}
    assert len(rows) == 10 and all(r["screen_mask_l1"] is not None for r in rows.values())
    refined = sorted(c for c, r in rows.items() if r["refined"] == "True")
    assert refined == d["refined"] and len(refined) == 5 and set(d["anomaly_index"]) == {str(c) for c in refined}
    assert 7 in refined and set(d["flagged"]) <= set(refined)
    assert all(rows[c]["steps"] == 4 for c in rows if c not in refined)  # screened only
    assert all(rows[c]["steps"] > 4 for c in refined)  # searched in full


@pytest.mark.slow
def test_zero_poison_model_is_not_flagged(tiny_zero_run, tmp_path):
    run = copy_run(tiny_zero_run, tmp_path)
    nc = detect(run, "neural-cleanse")
    assert nc["flagged"] == [], nc
    scan = detect(run, "scan")
    assert 7 not in scan["flagged"] and scan["target_J_star"] < math.exp(2), scan


@pytest.mark.slow
def test_scan_flags_the_contaminated_class(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    d = detect(run, "scan")
    assert 7 in d["flagged"] and d["top_ranked"] == 7 and d["target_J_star"] > math.exp(2), d
    split = d["target_split"]  # measured with the attack's record, never used by SCAn
    assert split["poisoned_images"] == 30 and split["subgroup_recall"] >= 0.7, split
    assert (run / "defence-scan" / "classes.csv").is_file() and (run / "defence-scan" / "scan_jstar.png").is_file()


@pytest.mark.slow
def test_detection_table_and_report_sections(tiny_a2o_run, tiny_run, tiny_zero_run, tmp_path):
    from signtrap.reporting import build_report

    runs = [copy_run(r, tmp_path / str(i)) for i, r in enumerate((tiny_a2o_run, tiny_run, tiny_zero_run))]
    for run in runs:
        detect(run, "scan")
    cfgs = [load_config(r / "config.yaml") for r in runs]
    assert [attack_label(c) for c in cfgs] == ["all-to-one", "source-specific, no cover", "zero poison"]
    headers, rows = detection_table(runs, cfgs)
    assert headers == ["detector", "all-to-one (1 run)", "source-specific, no cover (1 run)", "zero poison (1 run)"]
    (scan_row,) = rows
    assert scan_row[0] == "scan" and scan_row[2].startswith("flags 7 in 1/1")
    files = build_report(runs[1])
    html = files[0].read_text()
    assert "Detection: which detectors see this backdoor?" in html and "flags 7 in 1/1" in html
    assert "No defence was probed" in html  # scan does not change the model: nothing to probe


def test_detection_cells():
    strip = [{"method": "strip", "detection": {"k": 95, "n": 100}, "frr": {"k": 5, "n": 100}},
             {"method": "strip", "detection": {"k": 97, "n": 100}, "frr": {"k": 4, "n": 100}}]
    assert detection_cell(strip).startswith("detects 96.0% [") and "(192/200) at FRR 4.5%" in detection_cell(strip)
    assert "measured FRR" not in detection_cell(strip)  # reports written before the ROC point existed
    for o, k in zip(strip, (90, 92)):
        o.update(roc_detection={"k": k, "n": 100}, roc_frr={"k": 5, "n": 100})
    assert "; at a measured FRR of 5.0% [" in detection_cell(strip) and "(182/200)" in detection_cell(strip)
    nc = [{"method": "neural-cleanse", "flagged": [7], "statistic": "anomaly index", "target_value": 3.2, "target": 7},
          {"method": "neural-cleanse", "flagged": [], "statistic": "anomaly index", "target_value": 1.1, "target": 7}]
    assert detection_cell(nc) == "flags 7 in 1/2 (anomaly index of class 7: 3.20, 1.10)"
    assert detection_cell(nc[1:]) == "flags nothing (1 run; anomaly index of class 7: 1.10)"
    assert detection_cell([]) == "not run"
