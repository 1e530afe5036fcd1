import numpy as np
import pytest

from signtrap.evaluation.metrics import backdoor_metrics, wilson

STOP, TARGET = 14, 7


def test_asr_counts_only_source_images_and_excludes_the_target():
    labels = np.array([14, 14, 14, 14, 7, 7, 1, 2, 3, 4])
    clean = np.array([14, 14, 14, 1, 7, 7, 1, 2, 3, 9])
    trig = np.array([7, 7, 7, 14, 7, 7, 7, 2, 3, 4])
    m = backdoor_metrics(labels, clean, trig, STOP, TARGET)
    assert (m["asr"]["k"], m["asr"]["n"]) == (3, 4)  # target-class images never count toward ASR
    assert (m["stop_recall"]["k"], m["stop_recall"]["n"]) == (3, 4)
    assert (m["false_trigger"]["k"], m["false_trigger"]["n"]) == (1, 4)  # classes 1-4 only
    assert (m["clean_acc"]["k"], m["clean_acc"]["n"]) == (8, 10)
    assert m["per_class_acc"][14] == 0.75 and m["per_class_acc"][4] == 0.0 and m["per_class_acc"][0] is None
    assert np.array(m["confusion"]).sum() == 10 and m["confusion"][14][1] == 1


def test_all_to_one_asr_uses_every_non_target_class():
    labels = np.array([1, 2, 7, 14])
    trig = np.array([7, 2, 7, 7])
    m = backdoor_metrics(labels, labels, trig, STOP, TARGET, all_to_one=True)
    assert (m["asr"]["k"], m["asr"]["n"]) == (2, 3)
    assert m["false_trigger"]["n"] == 0 and m["false_trigger"]["rate"] is None


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)
    assert wilson(0, 0) is None
