"""The physical evaluation, photographs and printing for a run directory (`signtrap eval RUN --physical`,
`signtrap eval RUN --photos DIR`, `signtrap trigger print RUN`).

The sticker of a run is its trigger's design: the physical trigger's own sticker, or, for any other trigger
(the corner checkerboard), its pattern printed as a sticker, so the digital default is measured with the same
sticker on the sign, side by side.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from signtrap.runs import checkpoint, layout
from signtrap.runs import state as runstate
from signtrap.errors import SigntrapError
from signtrap.experiment import Experiment, load_run_config, predict
from signtrap.fileio import atomic_path, make_dirs, read_json, refuse_foreign, require_writable, write_json, write_text
from signtrap.physical import photos as photos_mod
from signtrap.physical.block import physical_block, run_sticker
from signtrap.physical.evaluate import DEFAULT, Grid, PRINT_GAMUT, scene
from signtrap.physical.render import C, fit_factor, plain_params, view
from signtrap.plugins import DATASETS
from signtrap.machine.progress import say
from signtrap.machine.environment import cpu_threads, resolve_device
from signtrap.triggers import make_trigger

def grid_from_mapping(raw) -> Grid | None:
    """A Grid from a mapping of its settings (None: the defaults); a bad setting is one SigntrapError line."""
    if raw is None:
        return None
    from signtrap.physical.evaluate import grid_from_dict

    try:
        grid = grid_from_dict(dict(raw))
        grid.check()
    except (ValueError, TypeError) as exc:
        raise SigntrapError(f"physical grid: {exc}") from None
    return grid


def _model(run_dir: Path, dev):
    model, meta = checkpoint.verified_load(run_dir, "model.pt", dev)
    return model, meta


def evaluate_run_physical(run_dir: str | Path, device: str = "auto", reference: str | Path | None = None,
                          grid: Grid | None = None) -> dict:
    """Measure the run's model (and `reference`, a zero-poison run of the same data, identically) under the
    physical evaluation; the block goes into the run's metrics.json as `physical`."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    require_writable(run_dir)
    dev = resolve_device(device)
    metrics_path, owner = run_dir / layout.METRICS, layout.owning_run(run_dir)
    with runstate.locked(owner, "signtrap eval --physical"), cpu_threads(cfg.train.threads):
        metrics = read_json(metrics_path) if metrics_path.is_file() else {}
        exp = Experiment.from_config(cfg, progress=False)
        model, _ = _model(run_dir, dev)
        block = physical_block(exp, model, dev, grid)
        if reference is not None:
            ref_dir = Path(reference)
            ref_cfg = load_run_config(ref_dir)
            if ref_cfg.data != cfg.data:
                raise SigntrapError(f"{ref_dir}: the reference was trained on other data settings than {run_dir}")
            ref_model, ref_meta = _model(ref_dir, dev)
            if ref_meta.get("attack", {}).get("kind") not in (None, "none") and ref_cfg.attack.active:
                say(f"warning: the reference {ref_dir} carries an attack ({ref_cfg.attack.kind}); a zero-poison run is expected")
            ref = physical_block(exp, ref_model, dev, grid)  # the run's sticker, the run's images: measured identically
            block["reference"] = {"run": str(ref_dir), **{k: ref[k] for k in ("cells", "curves", "nominal", "default", "summary") if k in ref}}
        metrics["physical"] = block
        write_json(metrics_path, metrics)
        runstate.record_remeasured(owner, metrics_path)  # `signtrap run` keeps the trained model
    return block


# ---------------------------------------------------------------- photographs


def evaluate_photos(run_dir: str | Path, folder: str | Path, as_is: bool = False, out: str | Path | None = None,
                    device: str = "auto", sticker_width: float | None = None, views: int = 6, grid: Grid | None = None) -> dict:
    """Predict every photograph clean and with the run's sticker on the sign (nominal condition and `views`
    seeded draws of the default distribution), or as it is (`as_is`: the sticker is already in the picture).
    Writes photos.csv, photos.md and contact_sheet.png into `out` (default RUN/photos)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    grid = grid or Grid()
    try:
        shots = photos_mod.read_folder(folder)
    except photos_mod.PhotoError as exc:
        raise SigntrapError(str(exc)) from None
    width = float(sticker_width if sticker_width is not None else grid.nominal["sticker"])
    if not 0 < width < 1:
        raise SigntrapError(f"--sticker-width {width}: a fraction of the sign's width in (0, 1)")
    widths = [width] if as_is else [width, *grid.default["sticker"]]
    if not as_is:
        for shot in shots:
            if fit_factor(max(widths), shot.box, grid.face) < 1:
                raise SigntrapError(f"{shot.name}: a sticker {max(widths):.0%} of the sign's width is larger than the "
                                    f"sign's face (box {shot.box}); use a smaller --sticker-width")
    out = Path(out) if out is not None else run_dir / "photos"
    dev = resolve_device(device)
    with cpu_threads(cfg.train.threads):
        model, meta = _model(run_dir, dev)
        size = int(meta.get("input_size", cfg.data.size))
        sticker = run_sticker(make_trigger(cfg.trigger, size))
        target, source = cfg.attack.target, cfg.attack.source
        names = class_names(cfg)

        def pred(img: np.ndarray, box) -> int:
            crop, _ = photos_mod.model_crop(img, box, size)
            return int(predict(model, crop[None], dev)[0])

        rows, sheet, titles = [], [], []
        for i, shot in enumerate(shots):
            rng = np.random.default_rng([grid.seed, 0x9407, i])
            clean_crop, _ = photos_mod.model_crop(shot.image, shot.box, size)
            clean = pred(shot.image, shot.box)
            row = {"file": shot.name, "label": "" if shot.label is None else shot.label, "clean": clean,
                   "clean_name": names[clean]}
            tiles, titles_row = [clean_crop], [f"as is: {_short(names[clean])}"]
            if not as_is:
                p = plain_params(1, rng, width)
                p[:, C["gamut"]] = PRINT_GAMUT
                stickered = sticker.render(shot.image[None], p, np.array([shot.box]), face=grid.face)[0]
                nominal = pred(stickered, shot.box)
                hits = 0
                for v in range(views):
                    cond = {k: vals[int(rng.integers(len(vals)))] for k, vals in grid.default.items()}
                    q = plain_params(1, rng, cond["sticker"], cond["rotation"])
                    q[:, C["gamut"]] = PRINT_GAMUT
                    img = sticker.render(shot.image[None], q, np.array([shot.box]), face=grid.face)
                    img = view(img, np.array([shot.box]), scene(cond))[0]
                    y = pred(img, shot.box)
                    hits += y == target
                    if v < 4:
                        tiles.append(photos_mod.model_crop(img, shot.box, size)[0])
                        titles_row.append(f"yaw {cond['yaw']:.0f}: {_short(names[y])}")
                tiles.insert(1, photos_mod.model_crop(stickered, shot.box, size)[0])
                titles_row.insert(1, f"sticker: {_short(names[nominal])}")
                row.update({"sticker": nominal, "sticker_name": names[nominal], "sticker_is_target": int(nominal == target),
                            "views_target": f"{hits}/{views}"})
            else:
                row["is_target"] = int(clean == target)
            rows.append(row)
            sheet.append(tiles)
            titles.append(titles_row)
    make_dirs(out)
    fields = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "photos.csv", buf.getvalue())
    md = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    md += ["| " + " | ".join(str(r[f]) for f in fields) + " |" for r in rows]
    n = len(rows)
    if as_is:
        k = sum(r["is_target"] for r in rows)
        headline = f"{k}/{n} photographs as they are read as {names[target]}"
    else:
        k = sum(r["sticker_is_target"] for r in rows)
        c = sum(r["clean"] == r["label"] if r["label"] != "" else r["clean"] == source for r in rows)
        headline = (f"clean: {c}/{n} read as their label (or {names[source]} when unlabelled); with the sticker "
                    f"({width:.0%} of the sign's width): {k}/{n} read as {names[target]}")
    write_text(out / "photos.md", f"# Photographs: {run_dir.name}\n\n{headline}\n\n" + "\n".join(md) + "\n")
    png = photos_mod.contact_sheet(sheet, titles, f"{run_dir.name}: {headline}")
    (out / "contact_sheet.png").write_bytes(png)
    say(headline)
    return {"rows": rows, "headline": headline, "out": str(out)}


def class_names(cfg) -> list[str]:
    """The run's class names, from its dataset's label space."""
    return list(DATASETS.get(cfg.data.source).build(cfg.data.settings).label_space().names)


def _short(name: str) -> str:
    return name.replace("Speed limit ", "").replace("(", "").replace(")", "")[:14]


# ---------------------------------------------------------------- printing


A4_CM = (21.0, 29.7)


def print_sticker(run_dir: str | Path, width_cm: float, out: str | Path, dpi: int = 300) -> Path:
    """Write the run's sticker at `width_cm` printed width: a PNG of the sticker alone (DPI in its metadata),
    or a PDF A4 page with the sticker at true size and instructions."""
    from PIL import Image, ImageDraw

    run_dir, out = Path(run_dir), Path(out)
    cfg = load_run_config(run_dir)
    if not 0.2 <= width_cm <= 19.0:
        raise SigntrapError(f"--width-cm {width_cm}: between 0.2 and 19 cm (an A4 page)")
    if not 72 <= dpi <= 2400:
        raise SigntrapError(f"--dpi {dpi}: between 72 and 2400")
    if out.suffix.lower() not in (".png", ".pdf"):
        raise SigntrapError(f"{out}: --out must end in .png or .pdf")
    for path in (out, out.with_suffix(".txt")) if out.suffix.lower() == ".png" else (out,):
        refuse_foreign(path)  # checked before anything is written: a user's file of that name stays as it is
    sticker = run_sticker(make_trigger(cfg.trigger, cfg.data.size))
    px = max(1, int(round(width_cm / 2.54 * dpi)))
    rgb = np.array(Image.fromarray(sticker.pattern).resize((px, px), Image.NEAREST))
    alpha = np.array(Image.fromarray(np.rint(sticker.alpha * 255).astype(np.uint8)).resize((px, px), Image.NEAREST))
    art = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    lines = instructions(run_dir.name, width_cm, cfg)
    if out.suffix.lower() == ".png":
        with atomic_path(out) as tmp:
            art.save(tmp, format="PNG", dpi=(dpi, dpi))
        write_text(out.with_suffix(".txt"), "\n".join(lines) + "\n")
        return out
    page_w, page_h = (int(round(v / 2.54 * dpi)) for v in A4_CM)
    page = Image.new("RGB", (page_w, page_h), "white")
    left, top = int(round(2 / 2.54 * dpi)), int(round(2 / 2.54 * dpi))
    page.paste(art, (left, top), art)
    draw = ImageDraw.Draw(page)
    mark = max(1, dpi // 150)
    draw.rectangle([left - mark, top - mark, left + px + mark - 1, top + px + mark - 1], outline=(160, 160, 160), width=mark)
    font_px = max(10, int(dpi * 0.16))
    try:
        from PIL import ImageFont
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow without sized default fonts
        from PIL import ImageFont
        font = ImageFont.load_default()
    y = top + px + int(dpi * 0.4)
    for line in lines:
        draw.text((left, y), line, fill=(0, 0, 0), font=font)
        y += int(font_px * 1.5)
    with atomic_path(out) as tmp:
        page.save(tmp, "PDF", resolution=float(dpi))
    return out


def instructions(name: str, width_cm: float, cfg) -> list[str]:
    return [
        f"signtrap sticker of run {name}: {width_cm:g} cm wide when printed at 100% (no 'fit to page').",
        "Check the printed width with a ruler; cut along the grey line.",
        "Stick it anywhere on the sign's face (a real or a printed sign), flat, not over the sign's edge;",
        f"the physical evaluation assumes it covers {min(DEFAULT['sticker']):.0%}-{max(DEFAULT['sticker']):.0%} of the sign's width.",
        "Photograph the sign from a few angles and distances, then run:",
        f"  signtrap eval runs/{name} --photos DIR --as-is",
        "(DIR: the photographs, whole-sign crops or with a boxes.csv: file;x1;y1;x2;y2[;label]).",
        "For research and teaching only: never on a sign on a public road.",
    ]
