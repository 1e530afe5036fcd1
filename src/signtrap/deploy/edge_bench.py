#!/usr/bin/env python3
"""signtrap edge benchmark: accuracy, backdoor success and latency of an exported model, on the device itself.

This one file needs only Python >= 3.8, numpy and onnxruntime. `signtrap export` copies it into every
export folder; copy the folder onto a Raspberry Pi or Jetson and run

    python3 edge_bench.py                      # from inside the export folder
    python3 edge_bench.py --dir export/NAME    # or point it at one
    python3 edge_bench.py --threads 4 --providers cpu,cuda --runs 500 --batch 64

It verifies the SHA-256 of every file recorded in model.json before loading anything, evaluates each
precision (fp32, fp16, int8) on each execution provider on the bundled eval.npz (clean accuracy, attack
success rate, false-trigger rate, prediction flips against FP32), times batch-1 latency (p50/p90/p99 after
warm-up) and throughput at a larger batch, and writes bench.json and bench.md (the same schema as
`signtrap bench`, which imports this module, so both report identical figures).

Metric definitions (the same as signtrap.metrics):
- clean accuracy: clean images predicted as their label;
- ASR: triggered source-class images whose true label is not the target, predicted as the target
  (every non-target class for an all-to-one attack);
- stop recall: clean source-class images predicted correctly;
- false-trigger rate: triggered images of classes other than source and target, predicted as the target.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

try:
    import numpy as np
except ImportError:  # reported as one line by main()
    np = None

SCHEMA = "signtrap.bench/1"
MANIFEST = "model.json"
VARIANTS = ("fp32", "fp16", "int8")
EVAL_BATCH = 256  # batch size for the accuracy passes; fixed so every tool sees identical predictions

# short name -> ONNX Runtime provider, in the order they are tried when none is named
PROVIDERS = (
    ("tensorrt", "TensorrtExecutionProvider"),
    ("cuda", "CUDAExecutionProvider"),
    ("openvino", "OpenVINOExecutionProvider"),
    ("coreml", "CoreMLExecutionProvider"),
    ("xnnpack", "XnnpackExecutionProvider"),
    ("cpu", "CPUExecutionProvider"),
)


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
    return manifest


def verify_export(directory):
    """Check every file listed in model.json against its recorded SHA-256; return the manifest."""
    manifest = read_manifest(directory)
    for name in sorted(manifest["files"]):
        entry = manifest["files"][name]
        expected = entry["sha256"] if isinstance(entry, dict) else entry
        path = os.path.join(directory, name)
        if os.path.basename(name) != name:
            raise BenchError("%s: file name %r in model.json is not a plain file name" % (directory, name))
        if not os.path.isfile(path):
            raise BenchError("%s: missing (listed in %s); the export is incomplete" % (path, MANIFEST))
        actual = sha256_file(path)
        if actual != expected:
            raise BenchError("%s: SHA-256 mismatch (recorded %s..., file has %s...); the file was modified or "
                             "corrupted, refusing to use it" % (path, expected[:12], actual[:12]))
    return manifest


def load_bundle(directory, manifest):
    """eval.npz as plain arrays (no pickle), checked against the model's input size and layout."""
    name = manifest.get("bundle", "eval.npz")
    path = os.path.join(directory, name)
    try:
        with np.load(path, allow_pickle=False) as npz:
            bundle = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise BenchError("%s: unreadable evaluation bundle (%s)" % (path, str(exc).splitlines()[0][:120]))
    for key in ("images", "labels", "triggered"):
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
    n = len(bundle["labels"])
    if len(bundle["images"]) != n or len(bundle["triggered"]) != n:
        raise BenchError("%s: images, triggered and labels differ in length" % path)
    if n == 0:
        raise BenchError("%s: the evaluation bundle is empty" % path)
    bundle["labels"] = bundle["labels"].astype(np.int64)
    return bundle


def to_input(images):
    """uint8 NHWC -> float32 NCHW in [0, 1] (pixel / 255): the layout every exported graph takes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


# ---------------------------------------------------------------- metrics (same definitions as signtrap.metrics)


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


def flip_rate(preds, reference):
    """Fraction of predictions that differ from the reference (FP32) predictions."""
    preds, reference = np.asarray(preds), np.asarray(reference)
    return float(np.mean(preds != reference)) if preds.size else None


# ---------------------------------------------------------------- providers and sessions


def provider_name(name):
    """'cpu', 'CUDA' or 'CUDAExecutionProvider' -> the ONNX Runtime provider name."""
    low = name.strip().lower()
    for short, full in PROVIDERS:
        if low in (short, full.lower()):
            return full
    raise BenchError("unknown execution provider '%s'; choose from: %s"
                     % (name, ", ".join(short for short, _ in PROVIDERS)))


def resolve_providers(requested=None):
    """Providers to benchmark: the named ones (each must be available here) or every available one we know."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not requested:
        return [full for _, full in PROVIDERS if full in available]
    out = []
    for name in requested:
        full = provider_name(name)
        if full not in available:
            raise BenchError("execution provider '%s' (%s) is not available here; available: %s"
                             % (name, full, ", ".join(available)))
        if full not in out:
            out.append(full)
    return out


def default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def make_session(path, provider, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(path, sess_options=opts, providers=providers)


def session_runner(session):
    """A function float32 NCHW array -> logits array."""
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(x):
        return session.run([output_name], {input_name: x})[0]

    return run


# ---------------------------------------------------------------- measurements


def predict(run, images, batch=EVAL_BATCH):
    preds = []
    for start in range(0, len(images), batch):
        logits = np.asarray(run(to_input(images[start:start + batch])))
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
    """Images per second at `batch`, best of a few timed repeats after one warm-up batch."""
    reps = int(math.ceil(batch / len(images)))
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


def measure(run, bundle, attack, settings, reference=None):
    """Accuracy/backdoor metrics, flips against `reference` predictions, and timings for one model."""
    clean = predict(run, bundle["images"])
    trig = predict(run, bundle["triggered"])
    metrics = backdoor_metrics(bundle["labels"], clean, trig, attack["source"], attack["target"],
                               all_to_one=attack.get("kind") == "all_to_one")
    row = dict(metrics)
    if reference is not None:
        row["flip_vs_fp32"] = {"clean": flip_rate(clean, reference[0]), "triggered": flip_rate(trig, reference[1]),
                               "all": flip_rate(np.concatenate([clean, trig]), np.concatenate(reference))}
    else:
        row["flip_vs_fp32"] = None
    row["latency_ms"] = latency_ms(run, bundle["images"][0], settings["warmup"], settings["runs"])
    row["throughput"] = throughput(run, bundle["images"], settings["batch"], settings["runs"])
    return row, (clean, trig)


def bench_onnx(directory, manifest, bundle, settings, providers, variants=None, log=None):
    """Rows for every variant x provider; FP32 first on each provider, as the flip reference."""
    import onnxruntime as ort

    attack = manifest["attack"]
    variants = [v for v in (variants or VARIANTS) if v in manifest["variants"]]
    rows, references = [], {}
    for provider in providers:
        for variant in variants:
            info = manifest["variants"][variant]
            path = os.path.join(directory, info["file"])
            row = {"runtime": "onnxruntime", "runtime_version": ort.__version__, "variant": variant,
                   "provider": provider, "file": info["file"], "file_bytes": os.path.getsize(path),
                   "threads": settings["threads"]}
            if log:
                log("benchmarking %s on %s" % (variant, provider))
            try:
                session = make_session(path, provider, settings["threads"])
            except Exception as exc:  # a provider that cannot load this variant: record it, keep going
                row["error"] = "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                rows.append(row)
                continue
            check_input_shape(session, bundle, info["file"])
            row["providers_used"] = session.get_providers()
            try:
                measured, preds = measure(session_runner(session), bundle, attack, settings,
                                          None if variant == "fp32" else references.get(provider))
            except Exception as exc:  # a provider that cannot run this variant: record it, keep going
                row["error"] = "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                rows.append(row)
                continue
            row.update(measured)
            if variant == "fp32":
                references[provider] = preds
            rows.append(row)
    return rows, references


def check_input_shape(session, bundle, name):
    """The graph's own input shape must take the bundle's images (model.json could disagree with the file)."""
    shape = session.get_inputs()[0].shape
    want = [3, bundle["images"].shape[1], bundle["images"].shape[2]]
    got = list(shape[1:]) if len(shape) == 4 else None
    if got is None or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
        raise BenchError("%s: the graph takes input %s but the bundle's images are %dx%d RGB"
                         % (name, shape, want[1], want[2]))


def environment():
    import onnxruntime as ort

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "machine": platform.machine(), "python": sys.version.split()[0], "numpy": np.__version__,
            "onnxruntime": ort.__version__, "providers_available": ort.get_available_providers(),
            "device": ort.get_device(),
            "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "onnxruntime": ort.__version__}}


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") or line.startswith("Model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(directory, manifest, settings, rows, tool):
    return {"schema": SCHEMA, "tool": tool, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "export": {"dir": os.path.abspath(directory), "name": manifest.get("name"),
                       "model": manifest.get("model_name"), "input_size": manifest.get("input_size"),
                       "attack": manifest.get("attack"), "samples": manifest.get("samples"),
                       "model_json_sha256": sha256_file(os.path.join(directory, MANIFEST))},
            "settings": settings, "environment": environment(), "rows": rows}


def _pct(entry):
    return "n/a" if not entry or entry.get("rate") is None else "%.2f" % (100.0 * entry["rate"])


def markdown(result):
    """The bench.json rows as a Markdown table."""
    env, s = result["environment"], result["settings"]
    lines = ["# Benchmark: %s" % (result["export"].get("name") or result["export"]["dir"]), "",
             "%s; ONNX Runtime %s; Python %s; %d thread(s); batch-1 latency over %d runs after %d warm-up; "
             "throughput at batch %d." % (env["cpu"], env["onnxruntime"], env["python"], s["threads"], s["runs"],
                                           s["warmup"], s["batch"]), "",
             "| runtime | variant | provider | clean acc %% | ASR %% | false-trigger %% | flips vs FP32 %% "
             "| p50 ms | p90 ms | p99 ms | img/s @%d | size KiB |" % s["batch"],
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        prov = r.get("provider", "").replace("ExecutionProvider", "")
        if "error" in r:
            lines.append("| %s | %s | %s | error: %s |||||||||" % (r["runtime"], r["variant"], prov, r["error"]))
            continue
        flips = r.get("flip_vs_fp32")
        flip = "%.2f" % (100.0 * flips["all"]) if flips else "-"
        lat = r["latency_ms"]
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %.3f | %.3f | %.3f | %.0f | %.0f |" % (
            r["runtime"], r["variant"], prov, _pct(r["clean_acc"]), _pct(r["asr"]), _pct(r["false_trigger"]), flip,
            lat["p50"], lat["p90"], lat["p99"], r["throughput"]["images_per_s"], r["file_bytes"] / 1024.0))
    return "\n".join(lines) + "\n"


def write_text_atomic(path, text):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_outputs(result, json_path, md_path=None):
    write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    if md_path:
        write_text_atomic(md_path, markdown(result))


def settings_from(threads=None, runs=200, warmup=20, batch=64):
    threads = default_threads() if not threads else int(threads)
    if runs < 1 or warmup < 0 or batch < 1 or threads < 1:
        raise BenchError("--runs, --batch and --threads must be at least 1 and --warmup at least 0")
    return {"threads": threads, "runs": int(runs), "warmup": int(warmup), "batch": int(batch), "eval_batch": EVAL_BATCH}


def split_list(text):
    return [p for p in (text or "").replace(" ", "").split(",") if p]


# ---------------------------------------------------------------- command line


def build_parser():
    p = argparse.ArgumentParser(prog="edge_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="export folder (default: the folder holding this script)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: usable CPUs)")
    p.add_argument("--providers", help="comma list: cpu, cuda, tensorrt, openvino, coreml, xnnpack (default: all available)")
    p.add_argument("--variants", help="comma list of fp32, fp16, int8 (default: all in the export)")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed warm-up runs (default 20)")
    p.add_argument("--batch", type=int, default=64, help="batch size for throughput (default 64)")
    p.add_argument("--out", help="bench.json path (default: DIR/bench.json; bench.md is written beside it)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if np is None:
        print("edge_bench: error: numpy is not installed (pip install numpy onnxruntime)", file=sys.stderr)
        return 2
    directory = args.dir or os.path.dirname(os.path.abspath(__file__))
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        if not os.path.isdir(directory):
            raise BenchError("%s: not a directory" % directory)
        manifest = verify_export(directory)  # before loading any model or array
        variants = split_list(args.variants) or None
        for v in variants or ():
            if v not in VARIANTS:
                raise BenchError("unknown variant '%s'; choose from: %s" % (v, ", ".join(VARIANTS)))
        settings = settings_from(args.threads, args.runs, args.warmup, args.batch)
        providers = resolve_providers(split_list(args.providers))
        bundle = load_bundle(directory, manifest)
        rows, _ = bench_onnx(directory, manifest, bundle, settings, providers, variants, log)
        result = report(directory, manifest, settings, rows, "edge_bench.py")
        out = args.out or os.path.join(directory, "bench.json")
        write_outputs(result, out, os.path.splitext(out)[0] + ".md")
    except BenchError as exc:
        print("edge_bench: error: %s" % exc, file=sys.stderr)
        return 2
    except ImportError as exc:
        print("edge_bench: error: %s (install numpy and onnxruntime)" % exc, file=sys.stderr)
        return 2
    if not args.quiet:
        print(markdown(result))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
