"""`signtrap report`: every section present, every embedded image decodes, nothing loaded from the network."""
from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import signtrap
from signtrap.cli import main
from signtrap.reporting import SECTIONS, build_report

IMG_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


DEFENCES = {  # small settings: real outputs of every kind of defence (repair, pruning, trigger recovery, input filter)
    "finetune": {"finetune__epochs": 1},
    "fine-prune": {"fine_prune__epochs": 1, "fine_prune__step": 0.2},
    "neural-cleanse": {"neural_cleanse__top_k": 0, "neural_cleanse__candidates": [0, 3, 7, 14], "neural_cleanse__steps": 30,
                       "neural_cleanse__samples": 128, "neural_cleanse__batch_size": 16, "neural_cleanse__epochs": 1},
    "strip": {"strip__overlays": 4, "strip__eval_samples": 200},
}


@pytest.fixture(scope="module")
def full_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with REAL defence outputs, a real export and a real benchmark, then its report."""
    run = tmp_path_factory.mktemp("report") / "tiny"
    shutil.copytree(tiny_run, run)
    for method, settings in DEFENCES.items():
        signtrap.defend(run, method, probe__enabled=False, **settings)  # the probe: test_probe.py
    folder = signtrap.export(run, out=run / "export", calib_images=32, runtimes=["onnxruntime"])
    signtrap.bench(folder, runs=3, warmup=1, batch=8, runtimes=["onnxruntime"])
    signtrap.report(run)
    return run


def pct(entry) -> str:
    return "n/a" if not entry or entry.get("rate") is None else f"{100 * entry['rate']:.1f}%"


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
    assert "could not be built" not in html  # a builder that raised is a note in the report, and a bug here
    images = embedded_images(html)
    # trigger, gallery, training, confusion, per-class, before/after, persistence, pruning, NC norms + triggers,
    # STRIP histogram + curve, latency
    nc_triggers = sorted((full_run / "defence-neural-cleanse").glob("trigger_class*.png"))
    assert nc_triggers and len(images) >= 12 + len(nc_triggers)
    for fig_id in ("trigger", "gallery", "training", "confusion", "per_class", "defences_before_after", "persistence",
                   "fine_prune_pruning", "nc_norms", "strip_entropy", "latency", *(f"nc_{p.stem}" for p in nc_triggers)):
        assert f'id="fig-{fig_id}"' in html, fig_id
    assert_offline(html)


def test_report_shows_the_real_defence_and_bench_figures(full_run):
    html = (full_run / "report.html").read_text()
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", html, re.S)  # int8 rows are highlighted: <tr class="hl">
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r, re.S) for r in rows]
    for method in DEFENCES:
        report = json.loads((full_run / f"defence-{method}" / "report.json").read_text())
        b, a = report["before"]["test"], report["after"]["test"]
        rows_of = [c for c in cells if c and c[0] == method]  # the comparison table's row (others: validation, ...)
        expected = [pct(b["clean_acc"]), pct(a["clean_acc"]), pct(b["asr"]), pct(a["asr"])]
        # cells read "76.0% [71.8, 79.8] (327/430)": the rate first, then its CI and counts
        assert any([cell.split(" ")[0] for cell in row[1:5]] == expected for row in rows_of), (method, expected, rows_of)
    details = json.loads((full_run / "defence-neural-cleanse" / "report.json").read_text())["details"]
    assert f"Flagged classes: {details['flagged'] or 'none'}" in html
    for c in details["flagged"] or []:
        assert f"Class {c} (" in html and "FLAGGED" in html
    strip = json.loads((full_run / "defence-strip" / "report.json").read_text())["details"]
    assert pct(strip["detection_rate"]) in html
    bench = json.loads((full_run / "export" / "bench.json").read_text())
    ok = [r for r in bench["rows"] if "error" not in r]
    assert {(r["runtime"], r["variant"]) for r in ok} >= {("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    for r in ok:
        prov = r["provider"].replace("ExecutionProvider", "")
        match = [c for c in cells if c[:3] == [r["runtime"], r["variant"], prov]]
        assert match and match[0][4] == f"{100 * r['asr']['rate']:.2f}%", (r["runtime"], r["variant"], match)


def test_markdown_has_every_section_and_its_images(full_run):
    md = (full_run / "report.md").read_text()
    for _, title in SECTIONS:
        assert f"## {title}" in md
    refs = re.findall(r"\]\((report_files/[^)]+\.png)\)", md)
    assert len(refs) >= 13
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
    assert "could not be built" not in html
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
