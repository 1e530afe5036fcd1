"""The labs: generated from labs/make_labs.py, public API only, no outcomes written in advance, and executed headless
(tiny sizes via SIGNTRAP_LAB_FAST=1): every solutions copy end to end with every check passed, every student copy
with its exercises as given and every check saying "not yet", and every figure decoded and looked at.

`make lab-check` runs this file; CI runs it as part of `make test`."""
from __future__ import annotations

import ast
import base64
import importlib.util
import io
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest

LABS = Path(__file__).resolve().parents[1] / "labs"
spec = importlib.util.spec_from_file_location("make_labs", LABS / "make_labs.py")
make_labs = importlib.util.module_from_spec(spec)
sys.modules["make_labs"] = make_labs
spec.loader.exec_module(make_labs)

NOTEBOOKS = list(make_labs.LABS)
COPIES = [(copy, name) for copy in ("solutions", "student") for name in NOTEBOOKS]  # solutions first: students reuse their runs
CHECK = re.compile(r"Exercise (\d+): (correct|not yet)")


def path_of(copy: str, name: str) -> Path:
    return LABS / "solutions" / name if copy == "solutions" else LABS / name


def read(copy: str, name: str) -> nbformat.NotebookNode:
    return nbformat.read(path_of(copy, name), as_version=4)


def tagged(book, tag: str) -> list:
    return [c for c in book.cells if tag in c.get("metadata", {}).get("tags", [])]


# ---------------------------------------------------------------- static checks (fast)


def test_notebooks_are_generated_from_the_source_and_stored_without_outputs():
    assert make_labs.write_all(check_only=True) == [], "run `python labs/make_labs.py` after editing it"
    for copy, name in COPIES:
        book = read(copy, name)
        nbformat.validate(book)
        assert book.metadata["kernelspec"]["name"] == "python3"
        for cell in book.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{copy}/{name} has stored outputs"
        (settings,) = tagged(book, "settings")
        assert "GTSRB_ROOT = None" in settings.source, f"{name}: no GTSRB switch"
        assert f"SOLUTIONS = {copy == 'solutions'}" in settings.source


def test_every_lab_has_goals_timing_and_two_to_four_checked_exercises():
    for name in NOTEBOOKS:
        student, solution = read("student", name), read("solutions", name)
        intro = student.cells[0].source
        assert "Learning goals" in intro and "Running time" in intro and "fast size" in intro, name
        exercises = tagged(student, "exercise")
        assert 2 <= len({n for c in tagged(student, "check") for n in re.findall(r"report_check\((\d+)", c.source)}) <= 4
        assert 2 <= len(exercises) <= 4, f"{name}: {len(exercises)} exercise cells"
        # every exercise cell is followed by a check cell before the next exercise, and only exercise cells differ
        kinds = [("exercise" if "exercise" in c.metadata.get("tags", []) else "check" if "check" in c.metadata.get("tags", [])
                  else None) for c in student.cells]
        order = [k for k in kinds if k]
        assert order == ["exercise", "check"] * len(exercises), f"{name}: {order}"
        for s, t in zip(student.cells, solution.cells):
            tags = s.metadata.get("tags", [])
            if "exercise" in tags:
                assert s.source != t.source and "..." in s.source, f"{name}: an exercise without a placeholder"
            elif "settings" not in tags:
                assert s.source == t.source
        assert tagged(student, "observe"), f"{name}: no computed observations"


def test_markdown_states_no_outcome_in_advance():
    """Numbers about results belong to code cells that compute them: no percentages or accuracy points in prose."""
    outcome = re.compile(r"\d\s*%|\d+(\.\d+)?\s*(percentage )?points?\b|\bpt\b|typically|usually|barely", re.IGNORECASE)
    for name in NOTEBOOKS:
        for cell in read("student", name).cells:
            if cell.cell_type == "markdown":
                found = outcome.search(cell.source)
                assert not found, f"{name}: markdown states an outcome: ...{cell.source[max(0, found.start() - 60):found.end() + 20]}..."


def test_labs_use_only_the_public_api():
    import signtrap

    for copy, name in COPIES:
        for cell in read(copy, name).cells:
            if cell.cell_type != "code":
                continue
            tree = ast.parse(cell.source)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    assert not (node.module or "").startswith("signtrap"), f"{name}: from {node.module} import ..."
                elif isinstance(node, ast.Import):
                    assert all(a.name == "signtrap" or not a.name.startswith("signtrap") for a in node.names), name
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "signtrap":
                    assert node.attr in signtrap.__all__, f"{name}: signtrap.{node.attr} is not in the public API"
            assert not re.search(r"signtrap\.\w+\._", cell.source)


# ---------------------------------------------------------------- execution


def image_problem(png: bytes) -> str | None:
    """Why a PNG output is not a real figure (None if it is one): undecodable, tiny, or one flat colour."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(png))
        image.load()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a broken figure
        return f"cannot be decoded ({exc})"
    if image.width < 100 or image.height < 60:
        return f"is only {image.width}x{image.height} pixels"
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    ink = (np.abs(pixels - pixels[0, 0]).sum(axis=2) > 30).mean()  # share of pixels unlike the background
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    if ink < 0.01 or colours < 8:
        return f"is blank ({100 * ink:.2f}% drawn, {colours} colours)"
    return None


def test_render_check_rejects_blank_and_broken_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return buf.getvalue()

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([0, 1, 2], [3, 1, 2], "o-")
    assert image_problem(png(fig)) is None
    empty = plt.figure(figsize=(5, 3))
    assert "blank" in image_problem(png(empty))
    assert "decoded" in image_problem(png(plt.figure())[:200])


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("labs")


@pytest.mark.slow
@pytest.mark.parametrize("copy,name", COPIES, ids=[f"{c}-{n[:2]}" for c, n in COPIES])
def test_lab_executes(copy, name, lab_dir, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("SIGNTRAP_LAB_FAST", "1")
    monkeypatch.setenv("SIGNTRAP_LAB_DIR", str(lab_dir / "work"))  # shared: labs 2-3 and the student copies reuse models
    monkeypatch.setenv("MPLBACKEND", "Agg")
    book = read(copy, name)
    cpu, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    NotebookClient(book, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path_of(copy, name).parent)}}).execute()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{copy}/{name}: {time.perf_counter() - wall:.0f} s wall, kernel CPU "
          f"{used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:.0f} s")  # shown with -s (make lab-check)
    out = lab_dir / copy
    out.mkdir(exist_ok=True)
    nbformat.write(book, out / name)  # the executed notebook, for a look after a failure

    # every check cell ran and said "correct" (solutions) or "not yet" (student copy, exercises as given)
    want = "correct" if copy == "solutions" else "not yet"
    for cell in tagged(book, "check"):
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        verdicts = CHECK.findall(text)
        assert verdicts, f"{copy}/{name}: a check cell printed no verdict: {cell.source[:80]!r}"
        assert all(v == want for _, v in verdicts), f"{copy}/{name}: {text.strip()}"
    for cell in tagged(book, "observe"):
        assert any(o.output_type in ("stream", "display_data") for o in cell.outputs), f"{copy}/{name}: silent observation"

    # render check: every image output decodes and shows something
    images = 0
    for i, cell in enumerate(book.cells):
        for o in cell.get("outputs", []):
            for mime, data in o.get("data", {}).items():
                if mime.startswith("image/"):
                    assert mime == "image/png", f"{name} cell {i}: {mime}"
                    problem = image_problem(base64.b64decode(data))
                    assert problem is None, f"{copy}/{name} cell {i}: the figure {problem}"
                    images += 1
    assert images >= 1, f"{copy}/{name}: no figure"


# ---------------------------------------------------------------- the public EFRAP entry point of lab 5


def test_requantize_checks_its_input_and_writes_a_drop_in_int8_file(tiny_run, tmp_path):
    """signtrap.requantize (lab 5): refuses an unknown artefact, a tampered INT8 file and overwriting the export's own
    file, each with one SigntrapError, and otherwise writes an INT8 file with the artefact's inputs and outputs."""
    import onnxruntime as ort

    import signtrap
    from signtrap.errors import IntegrityError

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("defence-*", "export*"))
    out = signtrap.export(run, out=tmp_path / "export", runtimes=["onnxruntime"], calib_images=32, threads=1)
    with pytest.raises(signtrap.SigntrapError, match="no ONNX Runtime INT8 artefact 'onnxruntime:int8-nope'"):
        signtrap.requantize(run, out, tmp_path / "x.onnx", artefact="onnxruntime:int8-nope")
    with pytest.raises(signtrap.SigntrapError, match="writes a new .onnx file"):
        signtrap.requantize(run, out, out / "model.int8.onnx")
    summary = signtrap.requantize(run, out, tmp_path / "efrap.onnx", clean_images=32, steps=3, threads=1)
    assert Path(summary["path"]).is_file() and summary["clean_images"] == 32 and summary["layers"]
    old, new = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (out / "model.int8.onnx", tmp_path / "efrap.onnx"))
    assert [i.shape for i in new.get_inputs()] == [i.shape for i in old.get_inputs()]
    x = np.random.default_rng(0).random((4, *old.get_inputs()[0].shape[1:])).astype(np.float32)
    assert new.run(None, {new.get_inputs()[0].name: x})[0].shape == old.run(None, {old.get_inputs()[0].name: x})[0].shape
    data = bytearray((out / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256 mismatch"):
        signtrap.requantize(run, out, tmp_path / "efrap2.onnx")
    assert not (tmp_path / "efrap2.onnx").exists()
