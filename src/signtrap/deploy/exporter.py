"""`signtrap export RUN`: every runtime's artefacts, a portable evaluation bundle, the edge script and a hashed manifest.

For each chosen runtime (default: every registered runtime whose converter packages are installed) and
each of its variants (FP32, FP16 where supported, INT8 with the runtime's own quantizer, plus optional
quantizer variants named by `export.quantizers`), the plugin converts the model and the artefact goes
through a gate against PyTorch FP32 on the evaluation bundle:
- FP32: |logit difference| within parity_atol + parity_rtol x |logit| and the same top-1 on every image
  (clean and triggered) except exact near-ties;
- FP16 and INT8: finite logits and top-1 agreement of at least min_agreement on the clean images.
An FP32 artefact that fails is fatal (the conversion itself is wrong). An FP16 or INT8 artefact that fails
its conversion or its gate is left out (none of its files is written) and listed with the reason under
"rejected" in model.json -- a runtime whose INT8 disagrees with FP32 is itself a finding; `export.strict`
makes such a rejection fail the whole export too. The folder is built in a temporary
directory beside the destination and renamed into place only when every step has passed: a failed export
writes nothing.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from signtrap.runs import checkpoint
from signtrap.deploy import edge_bench, runtimes
from signtrap.deploy.config import ExportConfig
from signtrap.deploy.onnx_graph import INPUT_NAME, OUTPUT_NAME
from signtrap.deploy.runtime import ExportContext, Runtime, Variant, run_batches
from signtrap.errors import SigntrapError
from signtrap.experiment import Experiment, load_run_config, predict_logits
from signtrap.fileio import atomic_dir, sha256_file, umask, write_json
from signtrap.machine import cores
from signtrap.machine.progress import say
from signtrap.physical.block import bundle_views
from signtrap.runs import layout

CALIB_STREAM = 0xCA1B
EDGE_SCRIPT = "edge_bench.py"
BUNDLE = "eval.npz"


# ---------------------------------------------------------------- which runtimes and variants


def plan(ecfg: ExportConfig) -> tuple[list[tuple[Runtime, list[Variant]]], dict[str, str]]:
    """[(runtime, variants to export)] and {runtime: why it is skipped}; bad names are one-line errors."""
    registry = runtimes.discover()
    skipped: dict[str, str] = {}
    if ecfg.runtimes:
        chosen = []
        for name in ecfg.runtimes:
            rt = runtimes.get(name)
            if not rt.exports:  # a GPU provider of ONNX Runtime runs ONNX Runtime's artefacts
                rt = runtimes.get(rt.edge.artefacts_of)
            reason = rt.missing()
            if reason:
                raise SigntrapError(f"runtime '{rt.name}' cannot export here: {reason}")
            if rt not in chosen:
                chosen.append(rt)
    else:
        chosen = []
        for name in sorted(registry):
            rt = registry[name]
            if not rt.exports:
                continue
            reason = rt.missing()
            if reason:
                skipped[name] = reason
            else:
                chosen.append(rt)
        if not chosen:
            raise SigntrapError("no runtime can export here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    wanted = set(ecfg.quantizers)
    optional = {(rt.name, v.name) for rt in chosen for v in rt.variants(ecfg) if not v.default}
    for q in wanted - {"all"}:
        if not any(q in (v, f"{r}:{v}") for r, v in optional):
            choices = sorted({v for _, v in optional} | {f"{r}:{v}" for r, v in optional})
            raise SigntrapError(f"unknown quantizer variant '{q}' for runtimes {', '.join(rt.name for rt in chosen)}; "
                                f"choose from: all, {', '.join(choices) or '(none)'}")
    out = []
    for rt in chosen:
        variants = [v for v in rt.variants(ecfg)
                    if v.default or "all" in wanted or v.name in wanted or f"{rt.name}:{v.name}" in wanted]
        out.append((rt, variants))
    return out, skipped


# ---------------------------------------------------------------- the gate


def gate(art_id: str, precision: str, logits: np.ndarray, reference: np.ndarray, n_clean: int, ecfg: ExportConfig) -> dict:
    """Compare an artefact's logits with PyTorch FP32 on the bundle (clean images first); raise on failure."""
    if logits.shape != reference.shape:
        raise SigntrapError(f"{art_id}: gate failed: output shape {logits.shape} != PyTorch {reference.shape}; nothing was written")
    finite = bool(np.isfinite(logits).all())
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    agree = logits.argmax(1) == reference.argmax(1)
    result = {"images": int(len(logits)), "clean_images": int(n_clean), "finite": finite,
              "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
              "top1_agreement": float(agree.mean()), "top1_agreement_clean": float(agree[:n_clean].mean()),
              "disagreements": int((~agree).sum())}
    if precision == "fp32":
        tolerance = ecfg.parity_atol + ecfg.parity_rtol * np.abs(reference.astype(np.float64))
        top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
        hard = int(np.sum(~agree & (top2[:, 1] - top2[:, 0] >= ecfg.parity_tie_margin)))
        worst = float((diff - tolerance).max())
        result.update(kind="parity", atol=ecfg.parity_atol, rtol=ecfg.parity_rtol, tie_margin=ecfg.parity_tie_margin,
                      disagreements_beyond_ties=hard, worst_excess_over_tolerance=worst)
        result["passed"] = bool(finite and worst <= 0 and hard == 0)
        if not result["passed"]:
            raise SigntrapError(
                f"{art_id}: parity gate failed: FP32 artefact vs PyTorch on {len(logits)} images: max |logit diff| "
                f"{result['max_abs_logit_diff']:.3g} (tolerance {ecfg.parity_atol:g} + {ecfg.parity_rtol:g} x |logit|), "
                f"top-1 agreement {100 * result['top1_agreement']:.3f}% ({hard} disagreements beyond near-ties)"
                f"{'' if finite else ', non-finite logits'}; nothing was written")
    else:
        result.update(kind="agreement", min_agreement=ecfg.min_agreement)
        result["passed"] = bool(finite and result["top1_agreement_clean"] >= ecfg.min_agreement)
        if not result["passed"]:
            raise SigntrapError(
                f"{art_id}: gate failed: {precision.upper()} artefact agrees with PyTorch FP32 on "
                f"{100 * result['top1_agreement_clean']:.2f}% of {n_clean} clean images (minimum "
                f"{100 * ecfg.min_agreement:.0f}%, export.min_agreement){'' if finite else ', non-finite logits'}; "
                "nothing was written")
    return result


# ---------------------------------------------------------------- calibration and bundle


def calibration_images(exp: Experiment, ecfg: ExportConfig) -> tuple[np.ndarray, dict]:
    """Clean training images (a seeded sample across the training split); `mixed` stamps the trigger on a share."""

    rng = np.random.default_rng([exp.cfg.seed, CALIB_STREAM])
    train = exp.splits.train
    rows = np.sort(rng.choice(train, size=min(ecfg.calib_images, len(train)), replace=False))
    images = np.array(exp.data.images[rows])
    info = {"source": "training split (clean)", "images": int(len(rows)), "triggered": 0, "seed": exp.cfg.seed}
    if ecfg.calibration == "mixed":
        k = max(1, int(round(ecfg.calib_trigger_fraction * len(rows))))
        pick = np.sort(rng.choice(len(rows), size=k, replace=False))
        images[pick] = exp.trigger.apply(images[pick], rng, exp.data.rois[rows[pick]])
        info.update(source="training split, part triggered", triggered=int(k))
    return images, info


def write_bundle(path: Path, exp: Experiment, reference: np.ndarray) -> dict:
    """eval.npz: the test split clean and triggered, labels, and PyTorch FP32's predictions on both."""
    s = exp.eval_set("test")
    n = len(s.labels)
    preds = reference.argmax(1).astype(np.int64)
    a = exp.cfg.attack
    physical, physical_info = ({}, None)
    if exp.cfg.trigger.kind == "physical" and a.kind == "source_specific":  # a sticker on the sign: measured on the road too
        physical, physical_info = bundle_views(exp)
    np.savez_compressed(path, images=np.ascontiguousarray(s.images, np.uint8), labels=s.labels.astype(np.int64),
                        triggered=np.ascontiguousarray(s.triggered, np.uint8), reference_clean=preds[:n],
                        reference_triggered=preds[n:], **{k: np.ascontiguousarray(v, np.uint8) for k, v in physical.items()})
    source_rows = (s.labels != a.target) if a.kind == "all_to_one" else (s.labels == a.source)
    info = {"split": "test", "images": int(n), "source_images": int(source_rows.sum()),
            "layout": "uint8 NHWC RGB; 'triggered' is every test image with the trigger stamped; "
                      "reference_* are PyTorch FP32 predictions (the flip reference)"}
    if physical_info:
        info["physical"] = physical_info
    return info


# ---------------------------------------------------------------- export


def default_out(cfg, defence: str | None) -> Path:
    name = cfg.name + (f"-{layout.DEFENCE_PREFIX}{defence}" if defence else "")
    return Path(cfg.export.out_dir) / name


def export_run(run: Path, defence: str | None = None, out: Path | None = None, overrides: dict | None = None,
               threads: int = 0) -> Path:
    """Export a trained (or defended) run; returns the export folder."""
    run = Path(run)
    model_dir = layout.model_dir(run, defence)
    if defence and not model_dir.is_dir():
        raise SigntrapError(f"{model_dir}: no such defence output (run `signtrap defend {run} --method {defence}` first)")
    cfg = load_run_config(model_dir)
    ecfg = replace(cfg.export, **(overrides or {}))
    ecfg.check()
    chosen, skipped = plan(ecfg)  # every name checked before anything heavy runs
    held = cores.claimed()  # api.export and the pipeline hold cores of the machine's budget: 0 means those
    threads = threads or (held.threads if held is not None else cores.allowance())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _export(run, model_dir, cfg, ecfg, chosen, skipped, defence, out, threads)
    finally:
        torch.set_num_threads(before)


def _export(run: Path, model_dir: Path, cfg, ecfg: ExportConfig, chosen, skipped: dict, defence: str | None,
            out: Path | None, threads: int) -> Path:
    model, meta = checkpoint.verified_load(model_dir, "model.pt", "cpu")
    model.eval()
    ckpt = model_dir / "model.pt"
    out = Path(out) if out else default_out(cfg, defence)
    started = time.perf_counter()
    exp = Experiment.from_config(cfg)
    size = int(meta["input_size"])
    checkpoint.verify_provenance(model_dir, meta, cfg, exp)  # checkpoint, config, cache and split agree
    for name, reason in skipped.items():
        say(f"skipping runtime {name}: {reason}")
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(prefix="signtrap-export-") as scratch:
        say(f"export {model_dir} -> {out} ({', '.join(rt.name for rt, _ in chosen)})")
        s = exp.eval_set("test")
        eval_images = np.concatenate([s.images, s.triggered])
        reference = predict_logits(model, eval_images, "cpu", edge_bench.EVAL_BATCH)
        bundle = write_bundle(tmp / BUNDLE, exp, reference)
        calib, calib_info = calibration_images(exp, ecfg)
        ctx = ExportContext(model=model, size=size, folder=tmp, scratch=Path(scratch), calib=calib,
                            calib_info=calib_info, ecfg=ecfg, threads=threads)
        artefacts, blocks, rejected = [], {}, []
        for rt, variants in chosen:
            written = []
            for v in variants:
                try:
                    written.append(convert_and_gate(rt, v, ctx, eval_images, reference, len(s.labels)))
                except SigntrapError as exc:
                    if ecfg.strict or v.precision == "fp32":
                        raise
                    kept = {f for a in [*artefacts, *written] for f in a["files"]}
                    for name in set(rt.files(v)) - kept:  # our own temporary folder, never the destination
                        (tmp / name).unlink(missing_ok=True)
                    rejected.append({"id": f"{rt.name}:{v.name}", "runtime": rt.name, "variant": v.name,
                                     "precision": v.precision, "reason": str(exc)})
                    say(f"rejected {exc}")
            artefacts.extend(written)
            blocks[rt.name] = rt.report_block(written)
        (tmp / EDGE_SCRIPT).write_text(runtimes.assemble_edge_script(), encoding="utf-8")
        by_id = {a["id"]: a for a in artefacts}
        manifest = {
            "format": edge_bench.EXPORT_FORMAT, "name": out.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model_name": meta["model_name"], "classes": meta["classes"], "num_classes": meta["num_classes"],
            "input_size": size, "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "channels": "RGB",
                                          "range": "[0, 1] = pixel / 255", "batch": "dynamic"},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", meta["num_classes"]], "kind": "logits"},
            "normalisation": meta["normalisation"], "trigger": meta["trigger"], "attack": meta["attack"],
            "source": {"run": str(run.resolve()), "defence": defence, "checkpoint": str(ckpt.resolve()),
                       "checkpoint_sha256": sha256_file(ckpt), "epoch": meta.get("epoch"), "data_hash": meta.get("data_hash")},
            "calibration": {"mode": ecfg.calibration, **calib_info},
            "onnx": ctx.onnx_info or None,
            "parity": (by_id.get("onnxruntime:fp32") or {}).get("gate"),
            "agreement_vs_fp32": {a["id"]: a["agreement"] for a in artefacts},
            "artefacts": artefacts, "rejected": rejected, "runtimes": blocks, "runtimes_skipped": skipped,
            "bundle": BUNDLE, "samples": bundle, "edge_script": EDGE_SCRIPT,
            "seconds": round(time.perf_counter() - started, 2),
        }
        names = [f for a in artefacts for f in a["files"]] + [BUNDLE, EDGE_SCRIPT]
        manifest["files"] = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in names}
        write_json(tmp / edge_bench.MANIFEST, manifest)
        for f in tmp.iterdir():  # the user's umask, as an ordinary create would give (atomic_dir does the folder)
            f.chmod(0o666 & ~umask())
    worst = max((a["agreement"]["flip_rate"] for a in artefacts), default=0.0)
    if rejected:
        say(f"{len(rejected)} artefact(s) rejected (listed in model.json): {', '.join(r['id'] for r in rejected)}")
    say(f"exported {len(artefacts)} artefacts to {out}; largest prediction flip rate against PyTorch FP32 {100 * worst:.2f}%")
    return out


def convert_and_gate(rt: Runtime, variant: Variant, ctx: ExportContext, eval_images: np.ndarray,
                     reference: np.ndarray, n_clean: int) -> dict:
    """Convert one variant, load it with the runtime's own edge code, gate it; the manifest entry."""
    art_id = f"{rt.name}:{variant.name}"
    say(f"{art_id}: converting{f' ({variant.quantizer})' if variant.quantizer else ''}")
    started = time.perf_counter()
    try:
        info = rt.convert(ctx, variant)
    except SigntrapError:
        raise
    except Exception as exc:  # a converter's own failure: one line naming the artefact
        raise SigntrapError(f"{art_id}: conversion failed ({type(exc).__name__}: {edge_bench.first_line(exc)}); "
                            "nothing was written") from None
    files = rt.files(variant)
    for name in files:
        if not (ctx.folder / name).is_file():
            raise SigntrapError(f"{art_id}: the converter did not write {name}; nothing was written")
    entry = {"id": art_id, "runtime": rt.name, "variant": variant.name, "precision": variant.precision,
             "quantizer": variant.quantizer, "settings": dict(variant.settings), "files": files, "conversion": info,
             "conversion_seconds": round(time.perf_counter() - started, 2)}
    try:
        run, load_info = rt.edge().load([str(ctx.folder / f) for f in files], entry, rt.check_threads or ctx.threads)
        logits = run_batches(run, eval_images)
    except Exception as exc:
        raise SigntrapError(f"{art_id}: the converted artefact does not run ({type(exc).__name__}: "
                            f"{edge_bench.first_line(exc)}); nothing was written") from None
    entry["gate"] = gate(art_id, variant.precision, logits, reference, n_clean, ctx.ecfg)
    preds, ref = logits.argmax(1), reference.argmax(1)
    entry["agreement"] = {"flip_rate": edge_bench.flip_rate(preds, ref), "flip_rate_clean": edge_bench.flip_rate(preds[:n_clean], ref[:n_clean]),
                          "flip_rate_triggered": edge_bench.flip_rate(preds[n_clean:], ref[n_clean:]), "images": int(len(preds))}
    entry["runtime_info"] = load_info
    return entry
