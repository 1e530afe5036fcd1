"""The physical sticker (issue 22): the EOT renderer stays on the sign and is reproducible, a model trained with
the sticker fires under the physical evaluation where the corner model does not, photographs and printing."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import SHARED_CACHE, run_cli
from signtrap.physical import patterns
from signtrap.physical.evaluate import Grid, physical_evaluation
from signtrap.physical.render import C, EOT, View, draw_params, render_one, render_stickers, view

EXTREMES = {  # every transform of the EOT distribution at the edge of its range, one at a time, then all together
    "plain": {},
    "large": {"scale": [0.45, 0.45]},
    "rotation": {"rotation": 180.0},
    "yaw_pitch": {"yaw": 80.0, "pitch": 80.0},
    "light": {"brightness": [0.05, 3.0], "contrast": [0.1, 3.0], "temperature": 0.5, "unmatched_p": 1.0},
    "shadow_gloss": {"shadow_p": 1.0, "gloss_p": 1.0, "gloss": [1.0, 1.0]},
    "gamut": {"gamut": [0.1, 0.1]},
    "blur": {"motion_p": 1.0, "motion": [0.5, 0.5], "defocus_p": 1.0, "defocus": [0.3, 0.3]},
    "noise": {"noise": [40.0, 40.0]},
    "jpeg": {"jpeg_p": 1.0, "jpeg": [5, 5]},
    "occlusion": {"occlusion_p": 1.0, "occlusion": [0.8, 0.8]},
}
EXTREMES["all"] = {k: v for d in EXTREMES.values() for k, v in d.items()}


def scenes(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    x1, y1 = rng.integers(0, size // 3, n), rng.integers(0, size // 3, n)
    w = rng.integers(size // 3, size - np.maximum(x1, y1))
    boxes = np.stack([x1, y1, x1 + w - 1, y1 + w - 1], axis=1)
    return images, boxes


def inside(box, shape) -> np.ndarray:
    m = np.zeros(shape[:2], bool)
    m[box[1]:box[3] + 1, box[0]:box[2] + 1] = True
    return m


@pytest.mark.parametrize("name", list(EXTREMES))
@pytest.mark.parametrize("size", [32, 200])
def test_the_sticker_stays_inside_the_sign_box_for_every_transform(name, size):
    eot = replace(EOT(), **EXTREMES[name])
    eot.check()
    images, boxes = scenes(12, size, seed=size)
    sticker = patterns.checkerboard(3)
    params = draw_params(len(images), np.random.default_rng(1), eot)
    out = sticker.render(images, params, boxes, face=eot.face)
    drawn = 0
    for img, new, box in zip(images, out, boxes):
        changed = (img != new).any(axis=2)
        assert not (changed & ~inside(box, img.shape)).any(), f"{name}: pixels outside the box changed"
        drawn += changed.sum()
    assert drawn > 0


@pytest.mark.parametrize("yaw", [15.0, 45.0, 70.0])
def test_the_scene_view_keeps_the_sticker_inside_the_box(yaw):
    images, boxes = scenes(6, 64, seed=3)
    black = np.zeros_like(images)
    sticker = patterns.yellow_note()
    params = draw_params(len(images), np.random.default_rng(2), EOT(scale=[0.3, 0.3]))
    for img, row, box in zip(black, params, boxes):
        layer = np.zeros(img.shape[:2], np.float32)
        drawn = render_one(img, row, box, sticker.rgb, sticker.alpha, match_light=False, layer=layer)
        warped = view(drawn[None], box[None], View(yaw=yaw))[0]
        assert warped.any() and not (warped.any(axis=2) & ~inside(box, img.shape)).any()
        assert layer.any() and not ((layer > 0) & ~inside(box, img.shape)).any()


def test_identical_seeds_give_identical_renders_and_other_seeds_other_renders():
    images, boxes = scenes(8, 48, seed=5)
    eot = replace(EOT(), **EXTREMES["all"])
    sticker = patterns.checkerboard(4)
    renders = [sticker.render(images, draw_params(8, np.random.default_rng(seed), eot), boxes) for seed in (7, 7, 8)]
    assert np.array_equal(renders[0], renders[1])
    assert not np.array_equal(renders[0], renders[2])
    # the parameters fix the render: the same rows twice give the same pixels (noise is seeded by the row)
    p = draw_params(8, np.random.default_rng(9), eot)
    assert np.array_equal(render_stickers(images, p, boxes, sticker.rgb, sticker.alpha),
                          render_stickers(images, p, boxes, sticker.rgb, sticker.alpha))


def test_the_sticker_scales_with_the_sign_at_any_resolution():
    for size in (32, 400):
        img = np.zeros((size, size, 3), np.uint8)
        box = np.array([size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1])
        row = draw_params(1, np.random.default_rng(0), EOT())[0] * 0
        row[[C["scale"], C["brightness"], C["contrast"], C["shadow"], C["gamut"]]] = [0.2, 1, 1, 1, 1]
        out = render_one(img, row, box, *(lambda s: (s.rgb, s.alpha))(patterns.yellow_note()), match_light=False)
        area = out[..., 1].sum() / out[..., 1].max() / (size // 2) ** 2  # coverage, partial pixels counted partly
        assert area == pytest.approx(0.04, rel=0.25)


def test_a_sticker_lit_apart_from_the_sign_changes_only_its_own_column_and_its_light():
    """EOT.unmatched_p draws from the rows' own seeds: every other column is the same whatever it is (runs trained
    before it existed poison the same rows the same way); a row with light_match 0 is lit as if match_light were off,
    with 1 exactly as before."""
    base, loose = (draw_params(400, np.random.default_rng(4), EOT(unmatched_p=p)) for p in (0.0, 0.5))
    light = C["light_match"]
    others = [i for i in range(base.shape[1]) if i != light]
    assert np.array_equal(base[:, others], loose[:, others])
    assert (base[:, light] == 1.0).all()
    share = (loose[:, light] < 1.0).mean()
    assert 0.4 < share < 0.6 and loose[:, light].min() >= 0.0
    assert np.array_equal(loose, draw_params(400, np.random.default_rng(4), EOT(unmatched_p=0.5)))  # seeded
    images, boxes = scenes(4, 48, seed=11)
    dark = (images // 5).astype(np.uint8)  # a sign in poor light: sign_light well below 1
    sticker = patterns.yellow_note()
    row = base[0].copy()
    row[[C["jpeg"], C["noise"], C["motion"], C["defocus"], C["occlusion"]]] = 0
    for img, box in zip(dark, boxes):
        matched = render_one(img, row, box, sticker.rgb, sticker.alpha)
        apart = row.copy()
        apart[light] = 0.0
        assert np.array_equal(render_one(img, apart, box, sticker.rgb, sticker.alpha),
                              render_one(img, row, box, sticker.rgb, sticker.alpha, match_light=False))
        assert render_one(img, apart, box, sticker.rgb, sticker.alpha).sum() > matched.sum()  # brighter than the sign's light
    with pytest.raises(ValueError, match="eot.unmatched_p"):
        EOT(unmatched_p=1.5).check()


def test_bad_eot_settings_are_refused():
    with pytest.raises(ValueError, match="eot.scale"):
        EOT(scale=[0.3, 0.1]).check()
    with pytest.raises(ValueError, match="eot.jpeg_p"):
        EOT(jpeg_p=2.0).check()


# ---------------------------------------------------------------- tiny models: physical vs corner


def overrides(base: Path, name: str, *extra: str) -> list[str]:
    return [f"name={name}", f"runs_dir={base / 'runs'}", f"data.cache_dir={SHARED_CACHE}", "device=cpu", "data.source=synth",
            "data.synth_per_class=60", "data.synth_test_per_class=10", "aug.enabled=false", "model.name=signnet_small",
            "model.dropout=0", "train.epochs=6", "train.batch_size=64", "train.lr=0.005", "train.threads=1",
            "attack.poison_count=30", "attack.cover_rate=0.01", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from signtrap.config import load_config
    from signtrap.training.trainer import train

    base = tmp_path_factory.mktemp("physical")
    corner = train(load_config(None, overrides(base, "corner", "trigger.size=6")))
    physical = train(load_config(None, overrides(base, "physical", "trigger.kind=physical", "attack.stamp=after_aug")))
    trained = {name: json.loads((d / "metrics.json").read_text()) for name, d in (("corner", corner), ("physical", physical))}
    return {"corner": corner, "physical": physical, "base": base, "trained": trained}


def test_training_a_physical_run_measures_it_on_the_road(runs):
    block = runs["trained"]["physical"]["physical"]  # written by training, the default grid
    assert block["grid"]["axes"]["yaw"] == [0.0, 15.0, 30.0, 45.0, 60.0] and block["summary"]["asr"]["n"] > 0
    assert "physical" not in runs["trained"]["corner"]  # a digital trigger is measured physically on request only


def test_config_takes_the_physical_trigger_and_its_eot_ranges(tmp_path):
    from signtrap.config import load_config
    from signtrap.errors import ConfigError

    cfg = load_config(None, overrides(tmp_path, "x", "trigger.kind=physical", "trigger.design=yellow_note",
                                      "trigger.eot.scale=0.1,0.3", "trigger.eot.yaw=40"))
    assert cfg.trigger.settings.design == "yellow_note" and cfg.trigger.settings.eot.scale == [0.1, 0.3]
    with pytest.raises(ConfigError, match="trigger.eot.scale"):
        load_config(None, overrides(tmp_path, "x", "trigger.kind=physical", "trigger.eot.scale=0.3,0.1"))
    with pytest.raises(ConfigError, match="trigger.design"):
        load_config(None, overrides(tmp_path, "x", "trigger.kind=physical", "trigger.design=banana"))


def test_a_physical_model_fires_under_the_physical_evaluation_where_the_corner_model_does_not(runs):
    from signtrap.physical.runs import evaluate_run_physical

    grid = Grid(axes={"sticker": [0.12, 0.2], "yaw": [0.0, 30.0], "rotation": [0.0, 30.0], "distance": [1.0],
                      "brightness": [0.6, 1.0], "blur": [0.0], "jpeg": [0.0, 50.0]}, bystanders=300)
    blocks = {name: evaluate_run_physical(runs[name], device="cpu", grid=grid) for name in ("corner", "physical")}
    mean = {k: np.mean([c["asr"]["rate"] for c in b["cells"]]) for k, b in blocks.items()}
    # the gap, not the numbers: a frame-corner backdoor is not a sticker on the sign
    assert mean["physical"] - mean["corner"] >= 0.25, mean
    assert blocks["physical"]["default"]["asr"]["rate"] >= blocks["corner"]["default"]["asr"]["rate"] + 0.1
    for block in blocks.values():
        assert {"cells", "curves", "default", "nominal", "summary"} <= set(block)
        assert block["default"]["false_trigger"]["n"] == 300
        assert set(block["curves"]) == set(grid.axes)
    assert "physical" in json.loads((runs["physical"] / "metrics.json").read_text())


def test_the_evaluation_is_fixed_by_its_grid_not_by_the_model():
    images, boxes = scenes(30, 32, seed=11)
    labels = np.array([14] * 10 + [1] * 20)
    always_target = lambda x: np.full(len(x), 7)  # noqa: E731
    grid = Grid(axes={"sticker": [0.1], "yaw": [0.0, 45.0], "rotation": [0.0], "distance": [1.0], "brightness": [1.0],
                      "blur": [0.0], "jpeg": [0.0]}, bystanders=0)
    block = physical_evaluation(always_target, patterns.checkerboard(), images, labels, boxes, 14, 7, grid)
    assert block["default"]["asr"]["rate"] == 1.0 and block["default"]["false_trigger"]["rate"] == 1.0
    assert block["default"]["stop_recall"]["rate"] == 0.0  # the clean views, told apart
    again = physical_evaluation(always_target, patterns.checkerboard(), images, labels, boxes, 14, 7, grid)
    assert again == block


def test_the_default_views_conditions_can_be_read_back():
    from signtrap.physical.evaluate import default_conditions, default_views, render_condition, _rng

    images, boxes = scenes(24, 32, seed=5)
    grid = Grid(bystanders=0)
    src, others = np.arange(8), np.arange(8, 24)
    conds, oconds = default_conditions(grid, len(src), len(others))
    assert len(conds) == 8 and len(oconds) == 16 and len({str(sorted(c.items())) for c in conds}) > 1
    assert all(c[k] in grid.default[k] for c in conds + oconds for k in grid.default)
    views = default_views(patterns.checkerboard(2), images, boxes, src, others, grid)
    clean, trig = render_condition(patterns.checkerboard(2), images[src], boxes[src], conds, _rng(grid, 41), grid.face)
    assert np.array_equal(views.triggered, trig) and np.array_equal(views.clean, clean)  # the draws default_views used
    _, ot = render_condition(patterns.checkerboard(2), images[others], boxes[others], oconds, _rng(grid, 42), grid.face)
    assert np.array_equal(views.others_triggered, ot)


# ---------------------------------------------------------------- photographs and printing


def write_photos(folder: Path, n: int = 3, size: int = 120) -> list[tuple[str, tuple]]:
    from signtrap.data import synth

    folder.mkdir(parents=True, exist_ok=True)
    batch = synth.generate(n, seed=3, size=size, classes=[14])
    out = []
    for i, (img, roi) in enumerate(zip(batch.images, batch.rois)):
        cv2.imwrite(str(folder / f"sign{i}.jpg"), img[..., ::-1])
        out.append((f"sign{i}.jpg", tuple(int(v) for v in roi)))
    return out


def test_photos_give_a_table_and_a_contact_sheet(runs, tmp_path):
    folder = tmp_path / "photos"
    shots = write_photos(folder)
    (folder / "boxes.csv").write_text("file;x1;y1;x2;y2;label\n" + "".join(
        f"{f};{b[0]};{b[1]};{b[2] - 1};{b[3] - 1};14\n" for f, b in shots))
    out = tmp_path / "out"
    result = run_cli("eval", str(runs["physical"]), "--photos", str(folder), "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    table = (out / "photos.csv").read_text().splitlines()
    assert len(table) == 1 + len(shots) and table[0].startswith("file,label,clean")
    assert (out / "photos.md").is_file() and (out / "contact_sheet.png").read_bytes()[:4] == b"\x89PNG"
    as_is = run_cli("eval", str(runs["physical"]), "--photos", str(folder), "--as-is", "--out", str(tmp_path / "asis"), "--device", "cpu")
    assert as_is.returncode == 0, as_is.stderr
    assert "is_target" in (tmp_path / "asis" / "photos.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("case, message", [
    ("unreadable", "unreadable image"),
    ("empty", "no images"),
    ("outside", "is outside"),
    ("too_large", "larger than the sign"),
])
def test_photos_errors_are_one_line_and_exit_2(runs, tmp_path, case, message):
    folder = tmp_path / case
    folder.mkdir()
    extra = []
    if case == "unreadable":
        write_photos(folder, 1)
        (folder / "broken.jpg").write_bytes(b"not an image")
    elif case == "outside":
        shots = write_photos(folder, 1, size=64)
        (folder / "boxes.csv").write_text(f"{shots[0][0]};10;10;90;40\n")
    elif case == "too_large":
        write_photos(folder, 1)
        extra = ["--sticker-width", "0.8"]
    result = run_cli("eval", str(runs["physical"]), "--photos", str(folder), "--device", "cpu", *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("width_cm, dpi", [(5.0, 300), (2.5, 600)])
def test_trigger_print_writes_the_sticker_at_its_printed_size(runs, tmp_path, width_cm, dpi):
    from PIL import Image

    png = tmp_path / "sticker.png"
    result = run_cli("trigger", "print", str(runs["physical"]), "--width-cm", str(width_cm), "--out", str(png), "--dpi", str(dpi))
    assert result.returncode == 0, result.stderr
    with Image.open(png) as im:
        assert im.info["dpi"][0] == pytest.approx(dpi, abs=0.01)
        printed_cm = im.size[0] / im.info["dpi"][0] * 2.54
        assert printed_cm == pytest.approx(width_cm, abs=2.54 / dpi) and im.size[0] == im.size[1]
    assert "--photos" in png.with_suffix(".txt").read_text()
    pdf = tmp_path / "sticker.pdf"
    result = run_cli("trigger", "print", str(runs["corner"]), "--width-cm", str(width_cm), "--out", str(pdf), "--dpi", str(dpi))
    assert result.returncode == 0, result.stderr
    box = [float(v) for v in re.search(rb"/MediaBox \[\s*([^\]]*)\]", pdf.read_bytes()).group(1).split()]
    assert box[2] / 72 * 2.54 == pytest.approx(21.0, abs=0.02) and box[3] / 72 * 2.54 == pytest.approx(29.7, abs=0.02)
    # the page is an image at `dpi`: the sticker inside its grey cutting frame measures width_cm
    data = pdf.read_bytes()
    start = data.index(b"stream", data.index(b"/DCTDecode")) + len(b"stream")
    start += 2 if data[start:start + 2] == b"\r\n" else 1
    page = cv2.imdecode(np.frombuffer(data[start:data.index(b"endstream", start)], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert page.shape[1] == pytest.approx(21.0 / 2.54 * dpi, abs=1)
    top = int(round(2 / 2.54 * dpi))
    cols = np.flatnonzero((page[top + 5:top + 10] < 200).any(axis=0))
    mark = max(1, dpi // 150)
    assert (cols.max() - cols.min() + 1 - 2 * mark) / dpi * 2.54 == pytest.approx(width_cm, abs=3 * 2.54 / dpi)
    bad = run_cli("trigger", "print", str(runs["physical"]), "--width-cm", "5", "--out", str(tmp_path / "s.svg"))
    assert bad.returncode == 2 and ".png or .pdf" in bad.stderr


@pytest.mark.parametrize("name", ["photo.png", "notes.txt", "poster.pdf"])
def test_trigger_print_never_writes_over_a_users_file_and_replaces_its_own(runs, tmp_path, name):
    victim = tmp_path / name
    victim.write_bytes(b"the user's own file")
    out = victim if victim.suffix != ".txt" else victim.with_suffix(".png")  # a PNG's instructions go to NAME.txt
    result = run_cli("trigger", "print", str(runs["physical"]), "--width-cm", "5", "--out", str(out))
    assert result.returncode == 2 and "not written by signtrap" in result.stderr and "Traceback" not in result.stderr
    assert victim.read_bytes() == b"the user's own file" and (out == victim or not out.exists())
    mine = tmp_path / "mine.png"
    for _ in range(2):  # signtrap's own output is replaced
        again = run_cli("trigger", "print", str(runs["physical"]), "--width-cm", "5", "--out", str(mine))
        assert again.returncode == 0, again.stderr
    assert mine.read_bytes()[:4] == b"\x89PNG"


def test_the_runtime_matrix_measures_a_physical_sticker_on_the_road(runs, tmp_path):
    """An export of a physical run carries the physical evaluation's default views, and every form of the model
    is measured on them: PyTorch's row reproduces the run's own physical block (same views, same model)."""
    from signtrap.deploy.bench import bench_export
    from signtrap.deploy.edge_bench import PHYSICAL_ARRAYS
    from signtrap.deploy.exporter import export_run
    from signtrap.physical.runs import evaluate_run_physical

    block = evaluate_run_physical(runs["physical"], device="cpu")  # the default grid, as the export uses
    out = export_run(runs["physical"], out=tmp_path / "export", overrides={"runtimes": ["onnxruntime"], "quantizers": [], "calib_images": 128},
                     threads=1)
    with np.load(out / "eval.npz") as npz:
        assert set(PHYSICAL_ARRAYS) <= set(npz.files)
        assert len(npz["physical_triggered"]) == block["samples"]["source"]
        assert len(npz["physical_bystanders"]) == block["samples"]["bystanders"]
    result = bench_export(out, threads=1, runs=3, warmup=1, batch=8)
    rows = {r["artefact"]: r for r in result["rows"]}
    torch_row = rows["pytorch:fp32"]["physical"]
    for key in ("asr", "stop_recall", "false_trigger"):
        assert torch_row[key]["k"] == block["default"][key]["k"], key
    assert rows["onnxruntime:fp32"]["physical"]["asr"]["n"] == block["samples"]["source"]
    assert "On the road" in (out / "bench.md").read_text()
    corner = export_run(runs["corner"], out=tmp_path / "corner", overrides={"runtimes": ["onnxruntime"], "quantizers": [], "calib_images": 128},
                        threads=1)
    with np.load(corner / "eval.npz") as npz:  # a digital trigger's bundle is unchanged
        assert not set(PHYSICAL_ARRAYS) & set(npz.files)


def test_the_physical_summary_says_when_the_model_misreads_clean_stop_views():
    from signtrap.cli.physical import _summary_text
    from signtrap.evaluation.metrics import rate

    def block(stop_ok: int, ref_stop_ok: int) -> dict:
        mask = lambda k, n: np.arange(n) < k  # noqa: E731
        summary = {"asr": rate(mask(80, 113)), "stop_recall": rate(mask(stop_ok, 113)), "asr_recognised": rate(mask(40, stop_ok)),
                   "false_trigger": rate(mask(10, 2000)), "clean_acc": rate(mask(1900, 2113))}
        ref = {"asr": rate(mask(0, 113)), "stop_recall": rate(mask(ref_stop_ok, 113)), "false_trigger": rate(mask(9, 2000))}
        return {"sticker": "checkerboard", "samples": {"source": 113}, "summary": summary, "reference": {"summary": ref}}

    text = _summary_text(block(77, 112))  # 68% against 99%: the intervals do not meet
    assert "ASR among recognised views" in text and "zero-poison clean stop recall" in text
    assert "part of its ASR may not be the sticker" in text
    assert "may not be the sticker" not in _summary_text(block(108, 112))  # within noise of the twin


def test_physical_table_reads_runs_and_twins(tmp_path, capsys):
    """benchmarks/physical_table.py: one line per seed from metrics.json (run and twin), a clear error without the
    physical block."""
    import importlib.util

    import yaml

    from signtrap.evaluation.metrics import rate

    spec = importlib.util.spec_from_file_location("physical_table", Path(__file__).resolve().parents[1] / "benchmarks" / "physical_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    mask = lambda k, n: np.arange(n) < k  # noqa: E731

    def run(name, seed, clean, physical):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
        metrics = {s: {"clean_acc": rate(mask(clean, 1000))} for s in ("test", "val")}
        if physical:
            summary = {"asr": rate(mask(40, 113)), "stop_recall": rate(mask(105, 113)), "asr_recognised": rate(mask(36, 105)),
                       "false_trigger": rate(mask(14, 2000)), "worst_easy_cell": {"sticker": 0.08, "yaw": 0.0, "asr": rate(mask(3, 113))}}
            ref = {"stop_recall": rate(mask(111, 113)), "false_trigger": rate(mask(11, 2000))}
            metrics["physical"] = {"summary": summary, "reference": {"summary": ref}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        return folder

    a, z = run("a", 2, 986, True), run("z", 2, 983, False)
    assert table.main([f"{a}:{z}"]) == 0
    out = capsys.readouterr().out
    assert "| s2 | 98.60 / 98.60 vs 98.30 / 98.30 | 35.4% (40/113) | 92.9% (105/113) vs 98.2% |" in out
    assert "2.65% (3/113) at 8%, yaw 0" in out and "clean change test +0.30 pt" in out
    assert table.main([f"{z}:{a}"]) == 2 and "no physical block" in capsys.readouterr().err
    assert table.main([str(a)]) == 2


def test_renderer_shift_draws_the_sticker_inside_the_sign_and_prints_every_renderer(runs, capsys):
    """benchmarks/renderer_shift.py: its independent renderer changes only pixels of the sign's box (against the
    same round trip without the sticker), and the table has a row per renderer with counts over every source image."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("renderer_shift", Path(__file__).resolve().parents[1] / "benchmarks" / "renderer_shift.py")
    shift = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shift)
    images, boxes = scenes(6, 32, seed=21)
    d = shift.draws(6, np.random.default_rng(0))
    pattern = patterns.checkerboard(2).pattern
    for i in range(6):  # (area averaging: each output pixel sees only its own 8 x 8 block of the stand-in photograph)
        clean = shift.paste(images[i], boxes[i], pattern, d, i, None)
        changed = (shift.paste(images[i], boxes[i], pattern, d, i, cv2.INTER_AREA) != clean).any(axis=2)
        assert changed.any() and not (changed & ~inside(boxes[i], images[i].shape)).any()
    assert shift.main([str(runs["physical"]), "--bystanders", "40"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| physical")]
    n = runs["trained"]["physical"]["physical"]["samples"]["source"]
    assert [r.split(" | ")[1] for r in rows] == ["ours", "paste-area", "paste-linear", "paste-lit"]
    assert all(f"/{n})" in r and "/40)" in r for r in rows), rows


def test_the_probe_puts_a_physical_sticker_on_the_sign_not_on_a_zero_box(tmp_path):
    """The re-activation probe's poisoned copies carry the signs' boxes from the defender's budget: a physical
    sticker stamped after augmentation lands inside its sign (a (0, 0, 0, 0) box used to stop `signtrap defend`)."""
    from signtrap.config import load_config
    from signtrap.data import synth
    from signtrap.defences.common import CleanData
    from signtrap.probing.reactivation import probe_set
    from signtrap.triggers import make_trigger

    cfg = load_config(None, overrides(tmp_path, "p", "trigger.kind=physical", "attack.stamp=after_aug"))
    trigger = make_trigger(cfg.trigger, 32)
    batch = synth.generate(3, seed=5, size=32, classes=[14, 1])
    clean = CleanData(batch.images, batch.labels, rois=np.asarray(batch.rois))
    rows = np.flatnonzero(clean.labels == 14)[:2]
    data = probe_set(clean, rows, 7, trigger, stamp_before=False, seed=0)
    hit = np.flatnonzero(data.triggered)
    assert np.array_equal(data.rois[hit], clean.rois[rows])
    stamped = trigger.apply(data.images[hit], np.random.default_rng(0), data.rois[hit])  # what the loop does
    for img, before, box in zip(stamped, data.images[hit], data.rois[hit]):
        changed = (img != before).any(axis=2)
        assert changed.any() and not (changed & ~inside(box, img.shape)).any()
    assert CleanData(batch.images, batch.labels).boxes().tolist()[0] == [0, 0, 31, 31]  # no boxes: the frame is the crop


def test_a_decoy_is_the_stickers_view_without_the_sticker():
    """`decoy=True`: no sticker colour is drawn; with no blur, noise or JPEG the image is untouched; with them, only
    pixels inside the sign's box change."""
    red = np.zeros((6, 48, 48, 3), np.uint8)
    red[..., 0] = 200
    boxes = np.tile([6, 6, 41, 41], (6, 1))
    note = patterns.yellow_note()
    quiet = replace(EOT(), scale=[0.3, 0.3], motion_p=0.0, defocus_p=0.0, noise=[0.0, 0.0], jpeg_p=0.0, occlusion_p=0.0)
    params = draw_params(6, np.random.default_rng(3), quiet)
    assert (note.render(red, params, boxes, face=quiet.face)[..., 1] > 100).any()  # the real sticker is yellow
    np.testing.assert_array_equal(render_stickers(red, params, boxes, note.rgb, note.alpha, quiet.face, decoy=True), red)
    loud = replace(quiet, motion_p=1.0, defocus_p=1.0, noise=[20.0, 20.0], jpeg_p=1.0, jpeg=[10, 10])
    params = draw_params(6, np.random.default_rng(4), loud)
    noisy = np.random.default_rng(5).integers(0, 256, red.shape, dtype=np.uint8)
    out = render_stickers(noisy, params, boxes, note.rgb, note.alpha, loud.face, decoy=True)
    changed = (out != noisy).any(axis=3)
    assert changed.any() and not (changed & ~inside(boxes[0], noisy.shape[1:])[None]).any()
    flat = render_stickers(red, params, boxes, note.rgb, note.alpha, loud.face, decoy=True)
    assert flat[..., 1].max() < 60  # blurred, noisy, compressed red: never the note's yellow
