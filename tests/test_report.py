"""`signtrap report`: every section present, every embedded image decodes, nothing loaded from the network."""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from signtrap.cli import main
from signtrap.reporting import SECTIONS, build_report

IMG_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def png(h: int = 24, w: int = 48, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rate(r: float, n: int = 50) -> dict:
    k = int(round(r * n))
    return {"rate": k / n, "k": k, "n": n, "ci95": [max(0.0, r - 0.1), min(1.0, r + 0.1)]}


def metrics(acc: float, asr: float) -> dict:
    return {"clean_acc": rate(acc), "asr": rate(asr), "stop_recall": rate(0.9), "false_trigger": rate(0.02), "target_recall": rate(0.9)}


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def add_defences(run: Path) -> None:
    """Defence folders in the layout `signtrap defend` writes (report.json, curves, PNGs)."""
    curve = [{"epoch": e, "loss": 1.0 / (e + 1), "clean_acc": 0.9, "asr": 1.0 - 0.1 * e, "stop_recall": 0.9, "false_trigger": 0.01}
             for e in range(4)]
    for method, details in (("finetune", {}), ("fine-prune", {"pruned_channels": 8, "layer_channels": 32}),
                            ("neural-cleanse", {"flagged": [7], "anomaly_index": {"7": 3.2, "3": 0.4}, "threshold": 2.0,
                                                "max_anomaly_index": 3.2, "top_ranked": 7, "mitigation": "unlearning"}),
                            ("strip", {"detection_rate": rate(0.8), "false_rejection_rate": rate(0.05), "frr_target": 0.05,
                                       "entropy_mean": {"clean": 1.2, "triggered_source": 0.1}})):
        d = run / f"defence-{method}"
        d.mkdir()
        report = {"method": method, "seconds": 1.5, "before": {"test": metrics(0.9, 1.0)},
                  "after": {"test": metrics(0.88, 0.4)}, "after_is": "repaired model", "repaired_model": method != "strip",
                  "details": details}
        (d / "report.json").write_text(json.dumps(report))
        if method != "strip":
            write_csv(d / "persistence.csv", curve)
    write_csv(run / "defence-fine-prune" / "pruning.csv",
              [{"pruned_fraction": f / 10, "channels": f, "budget_clean_acc": 0.9, "clean_acc": 0.9 - f / 50, "asr": 1 - f / 10}
               for f in range(6)])
    (run / "defence-neural-cleanse" / "trigger_class07.png").write_bytes(png(32, 96, 1))
    (run / "defence-neural-cleanse" / "trigger_class03.png").write_bytes(png(32, 96, 2))
    (run / "defence-neural-cleanse" / "norms.png").write_bytes(png(100, 300, 3))
    (run / "defence-strip" / "entropy_hist.png").write_bytes(png(100, 200, 4))
    write_csv(run / "defence-strip" / "frr.csv", [{"frr_target": f, "threshold": 0.5, "detection_rate": 0.8, "test_frr": f}
                                                  for f in (0.01, 0.05, 0.1)])


def add_export(run: Path) -> None:
    """An export folder in the layout `signtrap export` / `signtrap bench` write."""
    d = run / "export"
    d.mkdir()
    (d / "model.json").write_text(json.dumps({"parity": {"max_abs_logit_diff": 3e-6},
                                              "agreement_vs_fp32": {"onnxruntime:fp16": {"flip_rate": 0.0},
                                                                    "onnxruntime:int8": {"flip_rate": 0.01}}}))
    rows = [{"runtime": "pytorch", "variant": "fp32", "provider": "eager-cpu", "file_bytes": 4_000_000}]
    rows += [{"runtime": "onnxruntime", "variant": v, "provider": "CPUExecutionProvider", "file_bytes": 1_000_000} for v in ("fp32", "fp16", "int8")]
    for i, r in enumerate(rows):
        r.update(metrics(0.9, 0.97), flip_vs_fp32={"all": 0.01} if i > 1 else None,
                 latency_ms={"p50": 1.0 / (i + 1), "p90": 1.2 / (i + 1), "p99": 1.5 / (i + 1)}, throughput={"images_per_s": 1000 * (i + 1)})
    rows.append({"runtime": "onnxruntime", "variant": "int8", "provider": "CUDAExecutionProvider", "error": "not available"})
    (d / "bench.json").write_text(json.dumps({"rows": rows, "settings": {"threads": 2, "runs": 5, "warmup": 1, "batch": 8},
                                              "environment": {"cpu": "test cpu", "versions": {"onnxruntime": "1.x"}}}))


@pytest.fixture(scope="module")
def full_run(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "tiny"
    shutil.copytree(tiny_run, run)
    add_defences(run)
    add_export(run)
    build_report(run)
    return run


def embedded_images(html: str) -> list[np.ndarray]:
    out = []
    for data in IMG_RE.findall(html):
        image = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.size > 0
        out.append(image)
    return out


def assert_offline(html: str) -> None:
    lowered = html.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', lowered)
    assert "url(http" not in lowered and "url(//" not in lowered


def test_every_section_present_and_every_image_decodes(full_run):
    html = (full_run / "report.html").read_text()
    for sid, title in SECTIONS:
        assert f'<section id="{sid}">' in html, sid
    images = embedded_images(html)
    # trigger, gallery, training, confusion, per-class, before/after, persistence, pruning, NC norms + 2 triggers,
    # STRIP histogram + curve, latency
    assert len(images) >= 14
    for fig_id in ("trigger", "gallery", "training", "confusion", "per_class", "defences_before_after", "persistence",
                   "nc_trigger_class07", "strip_entropy", "latency"):
        assert f'id="fig-{fig_id}"' in html, fig_id
    assert "FLAGGED" in html and "int8" in html and "not available" in html
    assert_offline(html)


def test_markdown_has_every_section_and_its_images(full_run):
    md = (full_run / "report.md").read_text()
    for _, title in SECTIONS:
        assert f"## {title}" in md
    refs = re.findall(r"\]\((report_files/[^)]+\.png)\)", md)
    assert len(refs) >= 14
    for ref in refs:
        assert cv2.imread(str(full_run / ref)) is not None


def test_absent_inputs_are_said_not_dropped(tiny_run, tmp_path, capsys):
    run = tmp_path / "bare"
    shutil.copytree(tiny_run, run)
    assert main(["report", str(run), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("report.html")
    html = (run / "report.html").read_text()
    for sid, _ in SECTIONS:
        assert f'<section id="{sid}">' in html
    assert "No defences were run" in html
    assert "was not exported" in html
    assert len(embedded_images(html)) >= 5
    assert_offline(html)


def test_report_survives_broken_inputs(tiny_run, tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(tiny_run, run)
    (run / "log.jsonl").unlink()
    (run / "defence-finetune").mkdir()
    (run / "defence-finetune" / "report.json").write_text("{truncated")
    build_report(run)
    html = (run / "report.html").read_text()
    assert "No training log" in html and "defence-finetune" in html
    assert all(f'<section id="{sid}">' in html for sid, _ in SECTIONS)


def test_report_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
