#!/usr/bin/env python3
"""signtrap edge benchmark: accuracy, backdoor success and latency of an exported model, on the device itself.

This one file needs only Python >= 3.8, numpy and the package of whichever runtime is installed on the
device (onnxruntime or onnxruntime-gpu, openvino, ai-edge-litert, executorch, ncnn). `signtrap export`
writes it into every export folder; copy the folder onto a Raspberry Pi, phone, Jetson or Intel box and run

    python3 edge_bench.py                         # from inside the export folder
    python3 edge_bench.py --dir export/NAME       # or point it at one
    python3 edge_bench.py --threads 4 --runtimes ncnn,litert --variants int8 --runs 500 --batch 64

Before loading anything it checks that every file it will read is a plain file inside the folder, listed in
model.json with its SHA-256, and unchanged. It then evaluates every artefact (runtime x precision /
quantizer variant) whose runtime is installed here on the bundled eval.npz (clean accuracy, attack success
rate, stop recall, false-trigger rate, prediction flips against the PyTorch FP32 model with a per-class flip
table), times batch-1 latency (p50/p90/p99 after warm-up) and throughput at a larger batch, and writes
bench.json and bench.md (the schema of `signtrap bench`, which runs this same code, so both report
identical accuracy and ASR). Runtimes that are not installed are listed as skipped, with what to install.

How the file is made (for signtrap developers): signtrap/deploy/edge_bench.py is the runtime-independent
core. Every runtime plugin under signtrap/deploy/runtimes/ holds one torch-free "edge section" between
`# >>> edge section` and `# <<< edge section` markers; `signtrap export` pastes those sections, unchanged,
in place of the RUNTIME SECTIONS line below (signtrap.deploy.runtimes.assemble_edge_script). Inside
signtrap the same classes are imported from the plugin files, so there is one copy of each runner.

Metric definitions (the same as signtrap.evaluation.metrics):
- clean accuracy: clean images predicted as their label;
- ASR: triggered source-class images whose true label is not the target, predicted as the target
  (every non-target class for an all-to-one attack);
- stop recall: clean source-class images predicted correctly;
- false-trigger rate: triggered images of classes other than source and target, predicted as the target.
A physical sticker's export (trigger kind `physical`) also carries the physical evaluation's default views
(physical_clean, physical_triggered, physical_bystanders: the sticker rendered on the sign by signtrap, fixed at
export); every artefact is measured on them as well ("On the road" in bench.md): physical ASR, stop recall on
the same views without the sticker, and the false-trigger rate with the sticker on other signs.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import platform
import stat
import sys
import time

try:
    import numpy as np
except ImportError:  # reported as one line by main()
    np = None

SCHEMA = "signtrap.bench/2"
MANIFEST = "model.json"
EXPORT_FORMAT = "signtrap.export/2"
EVAL_BATCH = 256  # batch size for the accuracy passes; fixed so every tool sees identical predictions
PHYSICAL_ARRAYS = ("physical_clean", "physical_triggered", "physical_bystanders")  # a physical sticker's export: views on the road
MAX_THREADS = 256  # sane upper bounds for the timing settings
MAX_THREADS_PER_CPU = 8
MAX_BATCH = 4096
MAX_RUNS = 100000
MAX_WARMUP = 10000
# flips on triggered inputs that concentrate on one predicted class: a behaviour that appears only
# after conversion or quantization (a dormant backdoor) is flagged by the audit
AUDIT_MIN_FLIPS = 5
AUDIT_MIN_SHARE = 0.6


class BenchError(Exception):
    """A problem with the export folder or the arguments: printed as one line, exit status 2."""


# ---------------------------------------------------------------- integrity and inputs


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        block = fh.read(chunk)
        while block:
            digest.update(block)
            block = fh.read(chunk)
    return digest.hexdigest()


def read_manifest(directory):
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise BenchError("%s: not found; not an export folder (run `signtrap export` first)" % path)
    try:
        with open(path, "r", encoding="utf-8") as fh:
            manifest = json.load(fh)
    except ValueError as exc:
        raise BenchError("%s: not valid JSON (%s)" % (path, exc))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise BenchError("%s: no 'files' table of SHA-256 hashes; refusing an unverifiable export" % path)
    if manifest.get("format") != EXPORT_FORMAT or not isinstance(manifest.get("artefacts"), list):
        raise BenchError("%s: format %r is not %s (export it again with this version of signtrap)"
                         % (path, manifest.get("format"), EXPORT_FORMAT))
    return manifest


def safe_file(directory, name):
    """The path of `name` inside `directory`; refuse anything but a plain, regular file name in that folder."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name) or os.path.basename(name) != name):
        raise BenchError("%s: file name %r in %s is not a plain file name inside the folder" % (directory, name, MANIFEST))
    path = os.path.join(directory, name)
    if os.path.islink(path):
        raise BenchError("%s: is a symbolic link; refusing to follow it" % path)
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        raise BenchError("%s: missing (listed in %s); the export is incomplete" % (path, MANIFEST))
    if not stat.S_ISREG(mode):
        raise BenchError("%s: not a regular file" % path)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(directory):
        raise BenchError("%s: resolves outside the export folder" % path)
    return path


def verify_files(directory, manifest, names):
    """Check that each of `names` is listed in model.json's file table and has its recorded SHA-256."""
    table = manifest["files"]
    for name in names:
        path = safe_file(directory, name)
        entry = table.get(name)
        if entry is None:
            raise BenchError("%s: not listed in %s's file table; refusing to load an unverified file" % (path, MANIFEST))
        expected = entry.get("sha256") if isinstance(entry, dict) else entry
        if not isinstance(expected, str) or len(expected) != 64:
            raise BenchError("%s: no SHA-256 recorded in %s" % (path, MANIFEST))
        actual = sha256_file(path)
        if actual != expected:
            raise BenchError("%s: SHA-256 mismatch (recorded %s..., file has %s...); the file was modified or "
                             "corrupted, refusing to use it" % (path, expected[:12], actual[:12]))


def verify_export(directory):
    """Check every file in model.json's table and every file an artefact or the bundle names; return the manifest."""
    manifest = read_manifest(directory)
    needed = set(manifest["files"]) | {manifest.get("bundle", "eval.npz")}
    for art in manifest["artefacts"]:
        if not isinstance(art, dict) or not isinstance(art.get("files"), list) or not art["files"]:
            raise BenchError("%s: an artefact entry in %s has no file list" % (directory, MANIFEST))
        for key in ("id", "runtime", "variant", "precision"):
            if not isinstance(art.get(key), str):
                raise BenchError("%s: artefact entry without '%s' in %s" % (directory, key, MANIFEST))
        needed.update(art["files"])
    verify_files(directory, manifest, sorted(needed))
    return manifest


def load_bundle(directory, manifest):
    """eval.npz as plain arrays (no pickle), checked against the model's input size and layout."""
    path = safe_file(directory, manifest.get("bundle", "eval.npz"))
    try:
        with np.load(path, allow_pickle=False) as npz:
            bundle = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise BenchError("%s: unreadable evaluation bundle (%s)" % (path, str(exc).splitlines()[0][:120]))
    for key in ("images", "labels", "triggered", "reference_clean", "reference_triggered"):
        if key not in bundle:
            raise BenchError("%s: missing array '%s'" % (path, key))
    size = int(manifest["input_size"])
    for key in ("images", "triggered"):
        arr = bundle[key]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
            raise BenchError("%s: '%s' must be uint8 NHWC RGB, got %s %s" % (path, key, arr.dtype, arr.shape))
        if arr.shape[1:3] != (size, size):
            raise BenchError("%s: '%s' images are %dx%d but the model takes %dx%d inputs"
                             % (path, key, arr.shape[1], arr.shape[2], size, size))
    physical = [k for k in PHYSICAL_ARRAYS if k in bundle]
    if physical and len(physical) != len(PHYSICAL_ARRAYS):
        raise BenchError("%s: the physical views are incomplete (has %s, needs %s)" % (path, ", ".join(physical), ", ".join(PHYSICAL_ARRAYS)))
    for key in physical:
        arr = bundle[key]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
            raise BenchError("%s: '%s' must be uint8 NHWC RGB at %dx%d, got %s %s" % (path, key, size, size, arr.dtype, arr.shape))
    if physical and len(bundle["physical_clean"]) != len(bundle["physical_triggered"]):
        raise BenchError("%s: physical_clean and physical_triggered differ in length" % path)
    n = len(bundle["labels"])
    if any(len(bundle[k]) != n for k in ("images", "triggered", "reference_clean", "reference_triggered")):
        raise BenchError("%s: images, triggered, labels and reference predictions differ in length" % path)
    if n == 0:
        raise BenchError("%s: the evaluation bundle is empty" % path)
    for key in ("labels", "reference_clean", "reference_triggered"):
        bundle[key] = bundle[key].astype(np.int64)
    return bundle


def to_input(images):
    """uint8 NHWC -> float32 NCHW in [0, 1] (pixel / 255): the layout every exported model takes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


# ---------------------------------------------------------------- metrics (same definitions as signtrap.evaluation.metrics)


def wilson(successes, n, z=1.959964):
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def rate(mask_success):
    n = int(mask_success.size)
    k = int(mask_success.sum())
    return {"rate": (k / n) if n else None, "k": k, "n": n, "ci95": wilson(k, n)}


def backdoor_metrics(labels, clean_preds, triggered_preds, source, target, all_to_one=False):
    labels = np.asarray(labels, np.int64)
    clean_preds = np.asarray(clean_preds, np.int64)
    triggered_preds = np.asarray(triggered_preds, np.int64)
    sources = (labels != target) if all_to_one else (labels == source)
    bystanders = ~sources & (labels != target)
    return {
        "clean_acc": rate(clean_preds == labels),
        "asr": rate(triggered_preds[sources] == target),
        "stop_recall": rate(clean_preds[labels == source] == source),
        "false_trigger": rate(triggered_preds[bystanders] == target),
        "target_recall": rate(clean_preds[labels == target] == target),
    }


def physical_metrics(bundle, run, source, target):
    """On the road (a physical sticker's export only): the physical evaluation's default views of the source-class
    signs, with the sticker (ASR) and without (stop recall), and the sticker on other signs (false-trigger)."""
    if "physical_triggered" not in bundle:
        return None
    clean = predict(run, bundle["physical_clean"])
    trig = predict(run, bundle["physical_triggered"])
    out = {"asr": rate(trig == target), "stop_recall": rate(clean == source),
           "asr_recognised": rate(trig[clean == source] == target)}
    if len(bundle["physical_bystanders"]):
        out["false_trigger"] = rate(predict(run, bundle["physical_bystanders"]) == target)
    return out


def flip_rate(preds, reference):
    """Fraction of predictions that differ from the reference (FP32) predictions."""
    preds, reference = np.asarray(preds), np.asarray(reference)
    return float(np.mean(preds != reference)) if preds.size else None


def flip_table(labels, preds, reference):
    """Predictions that differ from the reference, counted per (true class, FP32 prediction, new prediction)."""
    flipped = np.flatnonzero(np.asarray(preds) != np.asarray(reference))
    counts = {}
    for i in flipped:
        key = (int(labels[i]), int(reference[i]), int(preds[i]))
        counts[key] = counts.get(key, 0) + 1
    rows = [{"true": t, "fp32": r, "pred": p, "count": c} for (t, r, p), c in counts.items()]
    rows.sort(key=lambda e: (-e["count"], e["true"], e["pred"]))
    return {"flips": int(flipped.size), "images": int(len(preds)), "table": rows}


def audit(labels, clean, triggered, ref_clean, ref_triggered):
    """The deployed-artefact audit: flip tables on clean and triggered inputs, and a warning when the flips on
    triggered inputs concentrate on one predicted class (behaviour that exists only after conversion)."""
    out = {"clean": flip_table(labels, clean, ref_clean), "triggered": flip_table(labels, triggered, ref_triggered),
           "concentration": None, "warning": None}
    trig = out["triggered"]
    per_class = {}
    for e in trig["table"]:
        per_class[e["pred"]] = per_class.get(e["pred"], 0) + e["count"]
    if per_class:
        top, count = max(per_class.items(), key=lambda kv: (kv[1], -kv[0]))
        share = count / float(trig["flips"])
        clean_to_top = sum(e["count"] for e in out["clean"]["table"] if e["pred"] == top)
        out["concentration"] = {"class": int(top), "flips": int(count), "share": share, "clean_flips_to_class": int(clean_to_top)}
        if count >= AUDIT_MIN_FLIPS and share >= AUDIT_MIN_SHARE:
            out["warning"] = ("%d of %d prediction flips on triggered inputs go to class %d (%.0f%%; %d clean flips "
                              "go there): behaviour that the FP32 model does not have appears after conversion or "
                              "quantization; check for a backdoor that wakes only in deployment"
                              % (count, trig["flips"], top, 100.0 * share, clean_to_top))
    return out


# ---------------------------------------------------------------- runtimes


class EdgeRuntime(object):
    """Device-side half of a runtime plugin: availability, loading an artefact, running a batch.

    Subclasses live in the plugin files (signtrap/deploy/runtimes/*.py) between the edge-section markers.
    `load` returns (run, info): run maps a float32 NCHW array in [0, 1] to float32 logits (N, classes),
    info is a dict recorded in the row (backend, precision actually executed, ...).
    """

    name = ""  # registry name, e.g. "openvino"
    artefacts_of = None  # run the artefacts of another runtime (ONNX Runtime's GPU providers); default: own
    modules = ()  # modules to import on the device
    install = ""  # what to install on a device, e.g. "pip install openvino"

    def owner(self):
        return self.artefacts_of or self.name

    def missing(self):
        """None when this runtime can run here, else the reason (one line, with what to install)."""
        for module in self.modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # ImportError, or a broken install raising something else
                return "%s cannot be imported (%s: %s); %s" % (module, type(exc).__name__, first_line(exc), self.install)
        return None

    def version(self):
        return ""

    def environment(self):
        return {}

    def load(self, paths, artefact, threads):
        raise NotImplementedError


EDGE_RUNTIMES = {}


def edge_runtime(cls):
    """Register a runtime's device side by its name (used by the plugin files' edge sections)."""
    EDGE_RUNTIMES[cls.name] = cls()
    return cls


def first_line(exc):
    text = str(exc)
    return text.splitlines()[0][:200] if text else ""


def chunked(run, x, max_batch):
    """Run `x` in chunks of at most `max_batch` images (runtimes with a bounded batch)."""
    if len(x) <= max_batch:
        return run(x)
    return np.concatenate([run(x[i:i + max_batch]) for i in range(0, len(x), max_batch)])


# >>> edge section: executorch_xnnpack
@edge_runtime
class ExecuTorchEdge(EdgeRuntime):
    """ExecuTorch's runtime with the XNNPACK delegate; the batch bound is read from the program itself."""

    name = "executorch"
    modules = ("executorch.runtime",)  # imports torch: ExecuTorch's Python bindings link libtorch
    install = ("pip install executorch (its Python runtime needs torch; without torch run the .pte with "
               "ExecuTorch's C++ executor_runner)")

    def version(self):
        import executorch.version

        return executorch.version.__version__

    def load(self, paths, artefact, threads):
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        if portable_lib._threadpool_get_thread_count() != int(threads):  # the reset prints a line: only when needed
            portable_lib._unsafe_reset_threadpool(int(threads))
        method = Runtime.get().load_program(paths[0]).load_method("forward")
        bound = int(method.metadata.input_tensor_meta(0).sizes()[0])

        def run_bounded(x):
            return method.execute([torch.from_numpy(np.ascontiguousarray(x))])[0].numpy()

        def run(x):
            return chunked(run_bounded, x, bound)

        return run, {"provider": "XNNPACK delegate", "max_batch": bound,
                     "threadpool": int(portable_lib._threadpool_get_thread_count())}
# <<< edge section: executorch_xnnpack


# >>> edge section: litert_tflite
@edge_runtime
class LiteRtEdge(EdgeRuntime):
    """LiteRT's interpreter (XNNPACK delegate); quantized inputs/outputs are (de)quantized with their own scales."""

    name = "litert"
    modules = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")  # either one
    install = "pip install ai-edge-litert (or tflite-runtime)"

    def _interpreter_class(self):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            from tflite_runtime.interpreter import Interpreter
        return Interpreter

    def missing(self):
        try:
            self._interpreter_class()
        except Exception as exc:
            return "neither %s can be imported (%s); %s" % (" nor ".join(self.modules), first_line(exc), self.install)
        return None

    def version(self):
        for module in ("ai_edge_litert", "tflite_runtime"):
            try:
                return "%s %s" % (module, importlib.import_module(module).__version__)
            except (ImportError, AttributeError):
                continue
        return ""

    def load(self, paths, artefact, threads):
        interpreter = self._interpreter_class()(model_path=paths[0], num_threads=int(threads))
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        shape = {"batch": None}

        def run(x):
            if shape["batch"] != len(x):
                interpreter.resize_tensor_input(inp["index"], [len(x)] + list(inp["shape"][1:]), strict=False)
                interpreter.allocate_tensors()
                shape["batch"] = len(x)
            if inp["dtype"] != np.float32:  # full-integer model: quantize with the input tensor's scale
                scale, zero = inp["quantization"]
                info = np.iinfo(inp["dtype"])
                x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
            interpreter.set_tensor(inp["index"], x)
            interpreter.invoke()
            y = interpreter.get_tensor(out["index"])
            if out["dtype"] != np.float32:
                scale, zero = out["quantization"]
                y = (y.astype(np.float32) - zero) * np.float32(scale)
            return y

        return run, {"provider": "interpreter (XNNPACK)", "input_dtype": np.dtype(inp["dtype"]).name,
                     "output_dtype": np.dtype(out["dtype"]).name}
# <<< edge section: litert_tflite


# >>> edge section: ncnn_pnnx
@edge_runtime
class NcnnEdge(EdgeRuntime):
    """ncnn's CPU inference: one extractor per image; FP16 options on only for FP16 artefacts."""

    name = "ncnn"
    modules = ("ncnn",)
    install = "pip install ncnn"

    def version(self):
        import ncnn

        return getattr(ncnn, "__version__", "")

    def load(self, paths, artefact, threads):
        import ncnn

        net = ncnn.Net()
        fp16 = artefact["precision"] == "fp16"
        net.opt.use_fp16_storage = fp16
        net.opt.use_fp16_packed = fp16
        net.opt.use_fp16_arithmetic = fp16
        net.opt.use_bf16_storage = False
        net.opt.use_vulkan_compute = False
        net.opt.num_threads = int(threads)
        winograd = (artefact.get("settings") or {}).get("winograd", True)
        net.opt.use_winograd_convolution = winograd
        if net.load_param(paths[0]) != 0 or net.load_model(paths[1]) != 0:
            raise BenchError("%s: ncnn could not load the .param/.bin pair" % artefact["id"])
        input_name, output_name = net.input_names()[0], net.output_names()[0]

        def run(x):
            out = []
            for image in x:
                extractor = net.create_extractor()
                extractor.input(input_name, ncnn.Mat(np.ascontiguousarray(image)))
                status, y = extractor.extract(output_name)
                if status != 0:
                    raise BenchError("%s: ncnn extract failed (status %d)" % (artefact["id"], status))
                out.append(np.array(y).reshape(-1))
            return np.stack(out).astype(np.float32)

        return run, {"provider": "ncnn CPU", "fp16_options": fp16, "winograd": winograd}
# <<< edge section: ncnn_pnnx


# >>> edge section: onnx_runtime
@edge_runtime
class OnnxRuntimeEdge(EdgeRuntime):
    """ONNX Runtime on its CPU execution provider (the GPU providers reuse `session`)."""

    name = "onnxruntime"
    modules = ("onnxruntime",)
    install = "pip install onnxruntime"
    provider = "CPUExecutionProvider"

    def version(self):
        import onnxruntime

        return onnxruntime.__version__

    def environment(self):
        import onnxruntime

        return {"providers_available": onnxruntime.get_available_providers(), "device": onnxruntime.get_device()}

    def missing(self):
        reason = EdgeRuntime.missing(self)
        if reason is None:
            import onnxruntime

            if self.provider not in onnxruntime.get_available_providers():
                return "%s is not available in this onnxruntime build (%s); %s" % (
                    self.provider, ", ".join(onnxruntime.get_available_providers()), self.install)
        return reason

    def provider_options(self, artefact):
        return {}

    def session(self, path, artefact, threads):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = [(self.provider, self.provider_options(artefact))]
        if self.provider != "CPUExecutionProvider":
            providers.append(("CPUExecutionProvider", {}))
        return ort.InferenceSession(path, sess_options=opts, providers=providers)

    def load(self, paths, artefact, threads):
        session = self.session(paths[0], artefact, threads)
        shape = session.get_inputs()[0].shape
        if len(shape) != 4 or shape[1] != 3:
            raise BenchError("%s: the graph takes input %s, not N x 3 x H x W" % (artefact["files"][0], shape))
        input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

        def run(x):
            return session.run([output_name], {input_name: x})[0]

        used = session.get_providers()
        if used[0] != self.provider:
            raise BenchError("%s: ONNX Runtime fell back to %s instead of %s" % (artefact["id"], used[0], self.provider))
        return run, {"provider": self.provider, "providers_used": used}
# <<< edge section: onnx_runtime


# >>> edge section: onnx_runtime_gpu
class OnnxRuntimeGpuEdge(EdgeRuntime):
    """ONNX Runtime's CPU runner (OnnxRuntimeEdge, looked up when used) with a GPU execution provider."""

    artefacts_of = "onnxruntime"
    modules = ("onnxruntime",)
    install = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu (never both; needs an NVIDIA GPU "
               "with CUDA 12 and cuDNN 9)")
    provider = ""

    def _cpu(self):
        return type(EDGE_RUNTIMES["onnxruntime"])

    def version(self):
        return self._cpu().version(self)

    def environment(self):
        return self._cpu().environment(self)

    def missing(self):
        return self._cpu().missing(self)

    def provider_options(self, artefact):
        return {}

    def session(self, path, artefact, threads):
        return self._cpu().session(self, path, artefact, threads)

    def load(self, paths, artefact, threads):
        return self._cpu().load(self, paths, artefact, threads)


@edge_runtime
class OnnxRuntimeCudaEdge(OnnxRuntimeGpuEdge):
    name = "onnxruntime-cuda"
    provider = "CUDAExecutionProvider"


@edge_runtime
class OnnxRuntimeTensorrtEdge(OnnxRuntimeGpuEdge):
    name = "onnxruntime-tensorrt"
    provider = "TensorrtExecutionProvider"
    install = OnnxRuntimeGpuEdge.install + " and TensorRT (pip install tensorrt)"

    def provider_options(self, artefact):
        return {"trt_fp16_enable": artefact["precision"] == "fp16", "trt_int8_enable": artefact["precision"] == "int8"}
# <<< edge section: onnx_runtime_gpu


# >>> edge section: openvino_ir
@edge_runtime
class OpenVinoEdge(EdgeRuntime):
    """OpenVINO's CPU plugin; the artefact is an IR pair (model .xml, weights .bin)."""

    name = "openvino"
    modules = ("openvino",)
    install = "pip install openvino"
    # FP32 parity needs f32 on CPUs whose default is bf16; INT8 keeps its non-quantized parts in f32
    hints = {"fp32": "f32", "fp16": "f16", "int8": "f32"}

    def version(self):
        import openvino

        return openvino.get_version()

    def environment(self):
        import openvino

        core = openvino.Core()
        return {"devices": core.available_devices,
                "cpu_capabilities": [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")],
                "cpu_default_inference_precision": str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))}

    def load(self, paths, artefact, threads):
        import openvino

        core = openvino.Core()
        model = core.read_model(paths[0], paths[1])
        # no CPU pinning: pinned threads share their cores with every other process, which made batch-1
        # latency 3-15x worse on a busy machine (the other runtimes do not pin either)
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": self.hints[artefact["precision"]],
                                                     "INFERENCE_NUM_THREADS": int(threads), "ENABLE_CPU_PINNING": False,
                                                     "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
        request = compiled.create_infer_request()
        output = compiled.output(0)

        def run(x):
            return request.infer({0: x})[output]

        executed = compiled.get_property("INFERENCE_PRECISION_HINT")
        return run, {"provider": "CPU plugin", "inference_precision": getattr(executed, "to_string", executed.__str__)(),
                     "cpu_pinning": False}
# <<< edge section: openvino_ir


# ---------------------------------------------------------------- measurements


def predict(run, images, batch=EVAL_BATCH):
    preds = []
    for start in range(0, len(images), batch):
        logits = np.asarray(run(to_input(images[start:start + batch])))
        if logits.ndim != 2 or logits.shape[0] != min(batch, len(images) - start):
            raise BenchError("the model returned logits of shape %s for a batch of %d"
                             % (logits.shape, min(batch, len(images) - start)))
        preds.append(logits.argmax(axis=1))
    return np.concatenate(preds).astype(np.int64)


def latency_ms(run, image, warmup, runs):
    """Batch-1 latency percentiles in milliseconds, after `warmup` untimed runs."""
    x = to_input(image[None])
    for _ in range(warmup):
        run(x)
    times = np.empty(runs, np.float64)
    for i in range(runs):
        start = time.perf_counter()
        run(x)
        times[i] = time.perf_counter() - start
    times *= 1000.0
    return {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
            "p99": float(np.percentile(times, 99)), "mean": float(times.mean()), "min": float(times.min()),
            "runs": int(runs), "warmup": int(warmup)}


def throughput(run, images, batch, runs):
    """Images per second at `batch`, median of a few timed repeats after one warm-up batch."""
    reps = int(math.ceil(batch / float(len(images))))
    x = to_input(np.concatenate([images] * reps)[:batch] if reps > 1 else images[:batch])
    run(x)
    iters = max(3, runs // 20)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    med = float(np.median(times))
    return {"batch": int(batch), "images_per_s": batch / med, "batch_ms_median": 1000.0 * med, "repeats": iters}


def measure(run, bundle, attack, settings):
    """Accuracy/backdoor metrics, flips and the audit against the PyTorch FP32 predictions, and timings."""
    clean = predict(run, bundle["images"])
    trig = predict(run, bundle["triggered"])
    row = backdoor_metrics(bundle["labels"], clean, trig, attack["source"], attack["target"],
                           all_to_one=attack.get("kind") == "all_to_one")
    ref_clean, ref_trig = bundle["reference_clean"], bundle["reference_triggered"]
    row["flip_vs_fp32"] = {"clean": flip_rate(clean, ref_clean), "triggered": flip_rate(trig, ref_trig),
                           "all": flip_rate(np.concatenate([clean, trig]), np.concatenate([ref_clean, ref_trig])),
                           "reference": "PyTorch FP32 predictions recorded at export"}
    row["audit"] = audit(bundle["labels"], clean, trig, ref_clean, ref_trig)
    physical = physical_metrics(bundle, run, attack["source"], attack["target"])
    if physical is not None:
        row["physical"] = physical
    row["latency_ms"] = latency_ms(run, bundle["images"][0], settings["warmup"], settings["runs"])
    row["throughput"] = throughput(run, bundle["images"], settings["batch"], settings["runs"])
    return row


def select_runtimes(requested=None):
    """Edge runtimes to run: the named ones (unknown names refused) or all registered."""
    if not requested:
        return [EDGE_RUNTIMES[k] for k in sorted(EDGE_RUNTIMES)]
    out = []
    for name in requested:
        if name not in EDGE_RUNTIMES:
            raise BenchError("unknown runtime '%s'; choose from: %s" % (name, ", ".join(sorted(EDGE_RUNTIMES))))
        if EDGE_RUNTIMES[name] not in out:
            out.append(EDGE_RUNTIMES[name])
    return out


def check_variants(manifest, variants):
    known = sorted(set(a["variant"] for a in manifest["artefacts"]) | set(a["precision"] for a in manifest["artefacts"]))
    for v in variants or ():
        if v not in known:
            raise BenchError("unknown variant '%s'; this export has: %s" % (v, ", ".join(known)))


def bench_artefacts(directory, manifest, bundle, settings, runtimes, variants=None, log=None, explicit=False):
    """One row per (runtime, artefact); runtimes that cannot run here are returned in `skipped`.

    With `explicit` (the user named the runtimes), a runtime that cannot run here is an error instead.
    """
    attack = manifest["attack"]
    rows, skipped = [], []
    for rt in runtimes:
        arts = [a for a in manifest["artefacts"] if a["runtime"] == rt.owner()
                and (not variants or a["variant"] in variants or a["precision"] in variants)]
        if not arts:
            if explicit:
                raise BenchError("this export has no %s artefacts%s (export with --runtimes %s)"
                                 % (rt.owner(), " of the chosen variants" if variants else "", rt.owner()))
            continue
        reason = rt.missing()
        if reason:
            if explicit:
                raise BenchError("runtime '%s' cannot run here: %s" % (rt.name, reason))
            skipped.append({"runtime": rt.name, "artefacts": [a["id"] for a in arts], "reason": reason})
            if log:
                log("skipping %s: %s" % (rt.name, reason))
            continue
        for art in arts:
            row = {"runtime": rt.name, "runtime_version": rt.version(), "artefact": art["id"], "variant": art["variant"],
                   "precision": art["precision"], "quantizer": art.get("quantizer"), "files": list(art["files"]),
                   "file_bytes": sum(os.path.getsize(os.path.join(directory, f)) for f in art["files"]),
                   "threads": settings["threads"]}
            if log:
                log("benchmarking %s %s" % (rt.name, art["variant"]))
            try:
                run, info = rt.load([safe_file(directory, f) for f in art["files"]], art, settings["threads"])
                row.update(info)
                row.update(measure(run, bundle, attack, settings))
            except BenchError:
                raise
            except Exception as exc:  # a runtime that cannot load or run this artefact: record it, keep going
                row["error"] = "%s: %s" % (type(exc).__name__, first_line(exc))
            rows.append(row)
    if not explicit:  # artefacts no runtime here knows (an export made by a newer signtrap)
        known = set(rt.owner() for rt in EDGE_RUNTIMES.values())
        for name in sorted(set(a["runtime"] for a in manifest["artefacts"]) - known):
            skipped.append({"runtime": name, "artefacts": [a["id"] for a in manifest["artefacts"] if a["runtime"] == name],
                            "reason": "this edge script has no runner for runtime '%s'" % name})
    return rows, skipped


def environment(runtimes=()):
    versions = {"python": sys.version.split()[0], "numpy": np.__version__}
    runtime_env = {}
    for rt in runtimes:
        if rt.missing() is None:
            versions[rt.name] = rt.version()
            runtime_env[rt.name] = rt.environment()
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
            "platform": platform.platform(), "machine": platform.machine(), "python": sys.version.split()[0],
            "numpy": np.__version__, "runtimes": runtime_env, "versions": versions}


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") or line.startswith("Model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def report(directory, manifest, settings, rows, skipped, tool, runtimes=()):
    warnings = ["%s: %s" % (r["artefact"], r["audit"]["warning"]) for r in rows if (r.get("audit") or {}).get("warning")]
    return {"schema": SCHEMA, "tool": tool, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "export": {"dir": os.path.abspath(directory), "name": manifest.get("name"),
                       "model": manifest.get("model_name"), "input_size": manifest.get("input_size"),
                       "attack": manifest.get("attack"), "samples": manifest.get("samples"),
                       "defence": (manifest.get("source") or {}).get("defence"),
                       "model_json_sha256": sha256_file(os.path.join(directory, MANIFEST))},
            "settings": settings, "environment": environment(runtimes), "rows": rows, "skipped": skipped,
            "rejected_at_export": manifest.get("rejected") or [], "audit_warnings": warnings}


def _pct(entry):
    return "n/a" if not entry or entry.get("rate") is None else "%.2f" % (100.0 * entry["rate"])


def markdown(result):
    """The bench.json rows as a Markdown table (the persistence matrix), then skipped runtimes and warnings."""
    env, s = result["environment"], result["settings"]
    defence = result["export"].get("defence")
    lines = ["# Benchmark: %s%s" % (result["export"].get("name") or result["export"]["dir"],
                                    " (defence %s)" % defence if defence else ""), "",
             "%s; %d usable CPU(s); Python %s; %d thread(s); batch-1 latency over %d runs after %d warm-up; "
             "throughput at batch %d. Flips are against the PyTorch FP32 predictions." % (
                 env["cpu"], env.get("usable_cpus") or 0, env["python"], s["threads"], s["runs"], s["warmup"], s["batch"]), "",
             "| runtime | variant | clean acc %% | ASR %% | stop recall %% | false-trigger %% | flips %% "
             "| p50 ms | p90 ms | p99 ms | img/s @%d | size KiB |" % s["batch"],
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append("| %s | %s | error: %s |||||||||| " % (r["runtime"], r["variant"], r["error"]))
            continue
        flips = r.get("flip_vs_fp32")
        flip = "%.2f" % (100.0 * flips["all"]) if flips and flips.get("all") is not None else "-"
        lat = r["latency_ms"]
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %.3f | %.3f | %.3f | %.0f | %.0f |" % (
            r["runtime"], r["variant"], _pct(r["clean_acc"]), _pct(r["asr"]), _pct(r["stop_recall"]),
            _pct(r["false_trigger"]), flip, lat["p50"], lat["p90"], lat["p99"], r["throughput"]["images_per_s"],
            r["file_bytes"] / 1024.0))
    on_road = [r for r in result["rows"] if "error" not in r and r.get("physical")]
    if on_road:
        lines += ["", "On the road: the physical evaluation's default views (the sticker rendered on the sign; "
                  "stop recall is the same views without it).", "",
                  "| runtime | variant | physical ASR % | stop recall % | ASR among recognised % | false-trigger % |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in on_road:
            p = r["physical"]
            lines.append("| %s | %s | %s | %s | %s | %s |" % (r["runtime"], r["variant"], _pct(p["asr"]), _pct(p["stop_recall"]),
                                                           _pct(p.get("asr_recognised")), _pct(p.get("false_trigger"))))
    for sk in result.get("skipped") or ():
        lines.append("")
        lines.append("Skipped %s (%s): %s" % (sk["runtime"], ", ".join(sk["artefacts"]), sk["reason"]))
    for rj in result.get("rejected_at_export") or ():
        lines.append("")
        lines.append("Rejected at export (not written): %s" % rj["reason"])
    for w in result.get("audit_warnings") or ():
        lines.append("")
        lines.append("WARNING %s" % w)
    return "\n".join(lines) + "\n"


def write_text_atomic(path, text):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def ours(path):
    """Whether an existing output file is one this script (or `signtrap bench`) wrote: a bench.json of our schema,
    or a bench.md with our heading. Anything else at --out is the user's and is never replaced."""
    try:
        if path.endswith(".md"):
            with open(path, encoding="utf-8") as fh:
                return fh.readline().startswith("# Benchmark: ")
        with open(path, encoding="utf-8") as fh:
            return str(json.load(fh).get("schema", "")).startswith("signtrap.bench/")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return False


def check_output(path):
    """The folder of the output file exists and files can be created in it, and neither output file (bench.json
    and bench.md beside it) is someone else's: checked before the benchmark runs (not found out after it)."""
    if os.path.isdir(path):
        raise BenchError("%s: is a folder; --out names the bench.json file to write" % path)
    for target in (path, os.path.splitext(path)[0] + ".md"):
        if os.path.lexists(target) and not ours(target):
            raise BenchError("%s: not written by signtrap's benchmark; refusing to replace it. Move it elsewhere, or "
                             "choose another --out" % target)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise BenchError("%s: the output folder %s; create it or choose another --out" % (folder, what))
    probe = os.path.join(folder, ".edge_bench.%d.check" % os.getpid())
    try:
        with open(probe, "w", encoding="utf-8"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise BenchError("%s: the output folder is not writable (%s); choose another --out" % (folder, exc.strerror or exc))


def write_outputs(result, json_path, md_path=None):
    write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    if md_path:
        write_text_atomic(md_path, markdown(result))


def settings_from(threads=None, runs=200, warmup=20, batch=64):
    """Validated timing settings; out-of-range values are one-line errors (exit status 2)."""
    cpus = usable_cpus()
    threads = cpus if not threads else int(threads)
    limit = min(MAX_THREADS, MAX_THREADS_PER_CPU * cpus)
    if not 1 <= threads <= limit:
        raise BenchError("--threads %d is outside 1..%d (at most %d per usable CPU, %d here, and never more than %d)"
                         % (threads, limit, MAX_THREADS_PER_CPU, cpus, MAX_THREADS))
    if not 1 <= batch <= MAX_BATCH:
        raise BenchError("--batch %d is outside 1..%d" % (batch, MAX_BATCH))
    if not 1 <= runs <= MAX_RUNS:
        raise BenchError("--runs %d is outside 1..%d" % (runs, MAX_RUNS))
    if not 0 <= warmup <= MAX_WARMUP:
        raise BenchError("--warmup %d is outside 0..%d" % (warmup, MAX_WARMUP))
    return {"threads": threads, "runs": int(runs), "warmup": int(warmup), "batch": int(batch), "eval_batch": EVAL_BATCH}


def split_list(text):
    return [p for p in (text or "").replace(" ", "").split(",") if p]


def failed_everything(rows):
    """True when nothing could be measured: no rows, or every row an error."""
    return not rows or all("error" in r for r in rows)


# ---------------------------------------------------------------- command line


def build_parser():
    p = argparse.ArgumentParser(prog="edge_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="export folder (default: the folder holding this script)")
    p.add_argument("--threads", type=int, default=0, help="threads per runtime (default: usable CPUs)")
    p.add_argument("--runtimes", help="comma list of runtimes (default: every runtime installed here)")
    p.add_argument("--variants", help="comma list of variants or precisions, e.g. fp32,int8 (default: all)")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed warm-up runs (default 20)")
    p.add_argument("--batch", type=int, default=64, help="batch size for throughput (default 64)")
    p.add_argument("--out", help="bench.json path (default: DIR/bench.json; bench.md is written beside it)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if np is None:
        print("edge_bench: error: numpy is not installed (pip install numpy)", file=sys.stderr)
        return 2
    directory = args.dir or os.path.dirname(os.path.abspath(__file__))
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        if not os.path.isdir(directory):
            raise BenchError("%s: not a directory" % directory)
        out = args.out or os.path.join(directory, "bench.json")
        check_output(out)  # before the benchmark, not after it
        manifest = verify_export(directory)  # before loading any model or array
        variants = split_list(args.variants) or None
        check_variants(manifest, variants)
        settings = settings_from(args.threads, args.runs, args.warmup, args.batch)
        requested = split_list(args.runtimes)
        runtimes = select_runtimes(requested)
        bundle = load_bundle(directory, manifest)
        rows, skipped = bench_artefacts(directory, manifest, bundle, settings, runtimes, variants, log, bool(requested))
        result = report(directory, manifest, settings, rows, skipped, "edge_bench.py", runtimes)
        write_outputs(result, out, os.path.splitext(out)[0] + ".md")
    except OSError as exc:  # the folder changed while the benchmark ran: still one line
        print("edge_bench: error: %s: %s" % (exc.filename or out, exc.strerror or exc), file=sys.stderr)
        return 2
    except BenchError as exc:
        print("edge_bench: error: %s" % exc, file=sys.stderr)
        return 2
    if not args.quiet:
        print(markdown(result))
    print(out)
    if failed_everything(rows):
        reasons = [r["error"] for r in rows] + [s["runtime"] + ": " + s["reason"] for s in skipped]
        print("edge_bench: error: nothing could be benchmarked here (%s)" % "; ".join(reasons)[:600], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
