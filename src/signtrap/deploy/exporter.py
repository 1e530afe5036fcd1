"""`signtrap export RUN`: ONNX FP32/FP16/INT8 files, a portable evaluation bundle and a hashed manifest.

The folder is built in a temporary directory beside the destination and renamed into place only when
every step, including the FP32 parity gate, has passed: a failed export writes nothing.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from signtrap import checkpoint
from signtrap.deploy import edge_bench
from signtrap.deploy.config import ExportConfig
from signtrap.errors import SigntrapError
from signtrap.experiment import Experiment, load_run_config, predict_logits
from signtrap.fileio import atomic_dir, sha256_file, write_json
from signtrap.progress import say

INPUT_NAME, OUTPUT_NAME = "images", "logits"
CALIB_STREAM = 0xCA1B
FILES = {"fp32": "model.fp32.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
EDGE_SCRIPT = Path(edge_bench.__file__)


# ---------------------------------------------------------------- FP32


def export_fp32(model: nn.Module, path: Path, size: int, exporter: str = "auto", opset: int = 18) -> dict:
    """Write an FP32 ONNX graph with a dynamic batch axis; returns which exporter produced it."""
    model = model.cpu().eval()
    dummy = torch.rand(2, 3, size, size)
    errors = []
    if exporter in ("auto", "dynamo"):
        try:
            with _quiet():
                torch.onnx.export(model, (dummy,), str(path), dynamo=True, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=opset, external_data=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                                  verbose=False)
            return {"exporter": "dynamo", "torch": torch.__version__, "opset": opset}
        except Exception as exc:  # unsupported op, torch.export limitation...: fall back below
            errors.append(f"dynamo: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            if exporter == "dynamo":
                raise SigntrapError(f"ONNX export failed ({errors[-1]})") from None
            say(f"dynamo ONNX export failed ({errors[-1]}); falling back to the TorchScript exporter")
    try:
        with _quiet():
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:
        errors.append(f"torchscript: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        raise SigntrapError(f"ONNX export failed ({'; '.join(errors)})") from None
    return {"exporter": "torchscript", "torch": torch.__version__, "opset": opset, "fallback_reason": errors[0] if errors else None}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings; keep the CLI output to our own lines."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------- parity gate


def parity_gate(onnx_path: Path, model: nn.Module, images: np.ndarray, atol: float = 1e-3,
                tie_margin: float = 2e-3, threads: int = 0) -> dict:
    """Compare ONNX Runtime FP32 logits with PyTorch on `images` (uint8 NHWC); raise beyond tolerance.

    Passes when the max absolute logit difference is at most `atol` and the top-1 predictions agree on
    every image whose PyTorch top-2 margin is at least `tie_margin` (a disagreement on an exact near-tie
    is float rounding, not a broken graph).
    """
    session = edge_bench.make_session(str(onnx_path), "CPUExecutionProvider", threads or edge_bench.default_threads())
    run = edge_bench.session_runner(session)
    ort_logits = np.concatenate([run(edge_bench.to_input(images[s:s + 512])) for s in range(0, len(images), 512)])
    torch_logits = predict_logits(model.cpu().eval(), images, "cpu", 512)
    if ort_logits.shape != torch_logits.shape:
        raise SigntrapError(f"{onnx_path.name}: parity gate failed: ONNX Runtime output shape {ort_logits.shape} "
                            f"!= PyTorch {torch_logits.shape}")
    diff = np.abs(ort_logits.astype(np.float64) - torch_logits.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    agree = ort_logits.argmax(1) == torch_logits.argmax(1)
    top2 = np.sort(torch_logits, axis=1)[:, -2:] if torch_logits.shape[1] > 1 else np.zeros((len(images), 2))
    margin = top2[:, 1] - top2[:, 0]
    hard_disagreements = int(np.sum(~agree & (margin >= tie_margin)))
    result = {"images": int(len(images)), "max_abs_logit_diff": max_diff, "mean_abs_logit_diff": float(diff.mean()) if diff.size else 0.0,
              "top1_agreement": float(agree.mean()) if agree.size else 1.0, "disagreements": int((~agree).sum()),
              "disagreements_beyond_ties": hard_disagreements, "atol": atol, "tie_margin": tie_margin,
              "finite": bool(np.isfinite(ort_logits).all())}
    result["passed"] = bool(result["finite"] and max_diff <= atol and hard_disagreements == 0)
    if not result["passed"]:
        raise SigntrapError(
            f"{onnx_path.name}: parity gate failed: ONNX Runtime FP32 vs PyTorch on {len(images)} images: max |logit diff| "
            f"{max_diff:.3g} (tolerance {atol:g}), top-1 agreement {100 * result['top1_agreement']:.3f}% "
            f"({hard_disagreements} disagreements beyond near-ties); nothing was written")
    return result


# ---------------------------------------------------------------- FP16 and INT8


def convert_fp16(src: Path, dst: Path) -> dict:
    import onnx

    model = onnx.load(str(src))
    try:
        from onnxconverter_common import float16  # type: ignore

        converted, tool = float16.convert_float_to_float16(model, keep_io_types=True), "onnxconverter_common"
    except ImportError:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with _quiet():
            converted = convert_float_to_float16(model, keep_io_types=True)
        tool = "onnxruntime.transformers.float16"
    toposort(converted.graph)  # the converter appends the input Casts at the end of the node list
    onnx.save(converted, str(dst))
    return {"converter": tool, "keep_io_types": True}


def toposort(graph) -> None:
    """Reorder `graph.node` (in place) so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise SigntrapError("FP16 conversion produced a graph with a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over uint8 NHWC images."""

    def __init__(self, images: np.ndarray, batch: int = 64):
        self.images, self.batch, self.pos = images, batch, 0

    def get_next(self):
        if self.pos >= len(self.images):
            return None
        chunk = self.images[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {INPUT_NAME: edge_bench.to_input(chunk)}

    def rewind(self):
        self.pos = 0


def calibration_images(exp: Experiment, ecfg: ExportConfig) -> tuple[np.ndarray, dict]:
    """Clean training images (a seeded sample across the training split); `mixed` stamps the trigger on a share."""
    from signtrap.attacks.triggers import stamp_placed

    rng = np.random.default_rng([exp.cfg.seed, CALIB_STREAM])
    train = exp.splits.train
    rows = np.sort(rng.choice(train, size=min(ecfg.calib_images, len(train)), replace=False))
    images = np.array(exp.data.images[rows])
    info = {"source": "training split (clean)", "images": int(len(rows)), "triggered": 0, "seed": exp.cfg.seed}
    if ecfg.calibration == "mixed":
        k = max(1, int(round(ecfg.calib_trigger_fraction * len(rows))))
        pick = np.sort(rng.choice(len(rows), size=k, replace=False))
        images[pick] = stamp_placed(images[pick], exp.trigger, rng, exp.data.rois[rows[pick]])
        info.update(source="training split, part triggered", triggered=int(k))
    return images, info


def quantize_int8(src: Path, dst: Path, calib: np.ndarray, method: str = "minmax", per_channel: bool = False) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="signtrap-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        with _quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(dst), _Reader(calib), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                            calibrate_method=methods[method],
                            extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False})
    return {"format": "QDQ", "activation": "QInt8", "weight": "QInt8", "calibration_method": method,
            "per_channel": per_channel, "pre_process": "quant_pre_process"}


# ---------------------------------------------------------------- bundle and manifest


def write_bundle(path: Path, exp: Experiment) -> dict:
    s = exp.eval_set("test")
    np.savez_compressed(path, images=np.ascontiguousarray(s.images, np.uint8), labels=s.labels.astype(np.int64),
                        triggered=np.ascontiguousarray(s.triggered, np.uint8))
    a = exp.cfg.attack
    source_rows = (s.labels != a.target) if a.kind == "all_to_one" else (s.labels == a.source)
    return {"split": "test", "images": int(len(s.labels)), "source_images": int(source_rows.sum()),
            "layout": "uint8 NHWC RGB; 'triggered' is every test image with the trigger stamped"}


def default_out(cfg, defence: str | None) -> Path:
    name = cfg.name + (f"-defence-{defence}" if defence else "")
    return Path(cfg.export.out_dir) / name


def export_run(run: Path, defence: str | None = None, out: Path | None = None, overrides: dict | None = None,
               threads: int = 0) -> Path:
    """Export a trained (or defended) run; returns the export folder."""
    run = Path(run)
    model_dir = run / f"defence-{defence}" if defence else run
    if defence and not model_dir.is_dir():
        raise SigntrapError(f"{model_dir}: no such defence output (run `signtrap defend {run} --method {defence}` first)")
    cfg = load_run_config(model_dir)
    ecfg = replace(cfg.export, **(overrides or {}))
    ecfg.check()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _export(run, model_dir, cfg, ecfg, defence, out, threads)
    finally:
        torch.set_num_threads(before)


def _export(run: Path, model_dir: Path, cfg, ecfg: ExportConfig, defence: str | None, out: Path | None, threads: int) -> Path:
    model, meta = checkpoint.verified_load(model_dir, "model.pt", "cpu")
    ckpt = model_dir / "model.pt"
    out = Path(out) if out else default_out(cfg, defence)
    started = time.perf_counter()
    exp = Experiment.from_config(cfg)
    size = int(meta["input_size"])
    if exp.data.size != size:
        raise SigntrapError(f"{model_dir}: the model takes {size}px inputs but the run's data is {exp.data.size}px")
    with atomic_dir(out) as tmp:
        say(f"export {model_dir} -> {out}")
        bundle = write_bundle(tmp / "eval.npz", exp)
        s = exp.eval_set("test")
        eval_images = np.concatenate([s.images, s.triggered])
        exported = export_fp32(model, tmp / FILES["fp32"], size, ecfg.exporter, ecfg.opset)
        say(f"FP32 graph written with the {exported['exporter']} exporter; checking parity against PyTorch")
        parity = parity_gate(tmp / FILES["fp32"], model, eval_images, ecfg.parity_atol, ecfg.parity_tie_margin, threads)
        fp16 = convert_fp16(tmp / FILES["fp32"], tmp / FILES["fp16"])
        calib, calib_info = calibration_images(exp, ecfg)
        say(f"INT8 static quantization ({ecfg.calib_method}, {'per-channel' if ecfg.per_channel else 'per-tensor'}, "
            f"{calib_info['images']} calibration images, {calib_info['triggered']} triggered)")
        int8 = quantize_int8(tmp / FILES["fp32"], tmp / FILES["int8"], calib, ecfg.calib_method, ecfg.per_channel)
        agreement = variant_agreement(tmp, eval_images, threads)
        shutil.copyfile(EDGE_SCRIPT, tmp / "edge_bench.py")
        manifest = {
            "format": "signtrap.export/1", "name": out.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model_name": meta["model_name"], "classes": meta["classes"], "num_classes": meta["num_classes"],
            "input_size": size, "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "channels": "RGB",
                                          "range": "[0, 1] = pixel / 255", "batch": "dynamic"},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", meta["num_classes"]], "kind": "logits"},
            "normalisation": meta["normalisation"], "trigger": meta["trigger"], "attack": meta["attack"],
            "source": {"run": str(run.resolve()), "defence": defence, "checkpoint": str(ckpt.resolve()),
                       "checkpoint_sha256": sha256_file(ckpt), "epoch": meta.get("epoch"), "data_hash": meta.get("data_hash")},
            "export": {**exported, "fp16": fp16, "int8": {**int8, "calibration": ecfg.calibration, "calibration_data": calib_info}},
            "parity": parity, "agreement_vs_fp32": agreement, "bundle": "eval.npz", "samples": bundle,
            "variants": {v: {"file": f} for v, f in FILES.items()},
            "seconds": round(time.perf_counter() - started, 2),
        }
        manifest["files"] = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for name in (*FILES.values(), "eval.npz", "edge_bench.py")}
        write_json(tmp / edge_bench.MANIFEST, manifest)
        tmp.chmod(0o755)  # a shareable artefact, not mkdtemp's private 0700
        for f in tmp.iterdir():
            f.chmod(0o644)
    say(f"exported to {out}: parity max |diff| {parity['max_abs_logit_diff']:.2e}, "
        f"FP16 flips {100 * agreement['fp16']['flip_rate']:.2f}%, INT8 flips {100 * agreement['int8']['flip_rate']:.2f}%")
    return out


def variant_agreement(folder: Path, images: np.ndarray, threads: int = 0) -> dict:
    """Prediction flip rate of FP16 and INT8 against FP32 on the bundle (reported, never a failure)."""
    threads = threads or edge_bench.default_threads()
    preds = {}
    for variant, name in FILES.items():
        session = edge_bench.make_session(str(folder / name), "CPUExecutionProvider", threads)
        preds[variant] = edge_bench.predict(edge_bench.session_runner(session), images)
    return {v: {"flip_rate": edge_bench.flip_rate(preds[v], preds["fp32"]), "images": int(len(images))} for v in ("fp16", "int8")}
