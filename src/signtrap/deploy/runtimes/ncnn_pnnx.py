"""ncnn (Tencent), converted with pnnx: FP32, FP16 and INT8 with ncnn's own post-training quantization scheme.

- fp32: `pnnx.export` (TorchScript trace -> pnnx -> ncnn .param/.bin), FP32 weights, run with FP16/BF16
  storage and arithmetic off;
- fp16: FP16 weights (pnnx fp16=1) run with ncnn's FP16 storage/packing/arithmetic options on (used where
  the CPU supports them: FP16 storage on x86 with F16C, FP16 arithmetic on ARMv8.2);
- int8 (default): ncnn's INT8 scheme, as its ncnn2table + ncnn2int8 tools do it, run on ncnn's INT8 GEMM
  kernels (Winograd convolution off at run time: `settings.winograd: false` in model.json). The pip packages
  `ncnn` and `pnnx` ship neither tool (only the Python bindings and the pnnx converter), so this file carries
  both steps, following ncnn's algorithm and file format: the FP32 net runs on the calibration images through
  ncnn's own extractor; weight scales are per output channel 127/absmax (8-bit weights everywhere);
  activation scales come from ncnn2table's KL method (2048-bin histogram of |x|, threshold that minimises the
  KL divergence to 128 levels); the .param/.bin are rewritten with int8_scale_term, INT8 weights and the scale
  tables, and convolution pairs get their requantize fused (ncnn2int8's fuse_requantize). Inference then uses
  ncnn's own INT8 kernels. GEMM, not Winograd, is the default because on these 32x32 inputs ncnn's INT8
  Winograd F43 kernels were both slower (x86, one thread: 0.49 ms vs 0.28 ms per image, FP32 0.6-0.75 ms) and
  less accurate (their 6-bit weights) than its INT8 GEMM ones.
- int8-aciq (optional): as int8, activation thresholds from ncnn2table's ACIQ method (Gaussian clipping) instead of KL;
- int8-winograd (optional; the default before): KL thresholds, ncnn2table's 6-bit weights (31/absmax) for 3x3
  stride-1 convolutions and Winograd convolution on at run time (ncnn's INT8 Winograd F43 kernels), exactly as
  ncnn's own tools and default options do it. Artefacts whose model.json records no `winograd` setting (made
  before int8 switched to GEMM) run with Winograd on, as they were made.

Conversion decomposes Tensor.std/var into mean/sub/mul/sum/sqrt while tracing: ncnn has no std layer.
ncnn runs one image at a time (CHW); a batch is a loop of extractors.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import struct

import numpy as np
import torch

from signtrap.deploy.config import ExportConfig
from signtrap.deploy.edge_bench import BenchError, EdgeRuntime, edge_runtime  # noqa: F401 (edge section)
from signtrap.deploy.quiet import quiet_fds
from signtrap.deploy.runtime import ExportContext, Runtime, Variant
from signtrap.deploy.runtimes import register_runtime
from signtrap.errors import SigntrapError

FP16_TAG, INT8_TAG = 0x01306B47, 0x000D4B38
QUANTIZED = ("Convolution", "ConvolutionDepthWise", "InnerProduct")
# layers whose .bin payload this quantizer can step over: type -> function(params) -> [(kind, count)]
# kind "tagged": a 4-byte storage tag then the data; "raw": float32 without tag
WEIGHTLESS = {"Input", "Split", "BinaryOp", "UnaryOp", "Reduction", "Pooling", "Pooling1D", "Pooling3D", "ReLU",
              "Sigmoid", "HardSwish", "HardSigmoid", "Swish", "Mish", "GELU", "ELU", "Clip", "TanH", "Flatten",
              "Reshape", "Concat", "Slice", "Crop", "Permute", "Softmax", "Eltwise", "Noop", "Padding", "Interp",
              "Dropout", "ShuffleChannel", "Squeeze", "ExpandDims", "Exp", "Log", "Power", "AbsVal", "Threshold"}


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


@register_runtime
class Ncnn(Runtime):
    name = "ncnn"
    title = "ncnn (CPU, pnnx conversion)"
    extra = "ncnn"
    packages = ("ncnn", "pnnx")
    edge = NcnnEdge
    # ncnn's OpenMP threads spin-wait at every layer: on a busy host two threads ran ~1000x slower than one
    # (OMP_WAIT_POLICY=PASSIVE avoids it), so the export-time gate and calibration run single-threaded
    check_threads = 1

    def variants(self, ecfg: ExportConfig) -> list[Variant]:
        return [Variant("fp32", "fp32"),
                Variant("fp16", "fp16", "FP16 weights, ncnn FP16 storage/arithmetic options"),
                Variant("int8", "int8", "ncnn INT8 (ncnn2table KL activations, 8-bit per-channel weights, ncnn2int8 "
                        "format), GEMM kernels (Winograd off)", settings={"method": "kl", "winograd": False}),
                Variant("int8-aciq", "int8", "ncnn INT8 with ncnn2table's ACIQ activation thresholds, GEMM kernels",
                        default=False, settings={"method": "aciq", "winograd": False}),
                Variant("int8-winograd", "int8", "ncnn INT8, KL activations, 6-bit 3x3 weights, Winograd F43 kernels "
                        "(ncnn's own default; slower and less accurate on 32x32 inputs)",
                        default=False, settings={"method": "kl", "winograd": True})]

    def files(self, variant: Variant) -> list[str]:
        stem = f"model.{self.name}.{variant.name}"
        return [f"{stem}.param", f"{stem}.bin"]

    def convert(self, ctx: ExportContext, variant: Variant) -> dict:
        param, weights = (ctx.folder / f for f in self.files(variant))
        src_param, src_bin = pnnx_convert(ctx, fp16=variant.precision == "fp16")
        if variant.precision != "int8":
            shutil.copyfile(src_param, param)
            shutil.copyfile(src_bin, weights)
            return {"converter": "pnnx.export", "fp16_weights": variant.precision == "fp16"}
        net = NcnnNet.read(src_param, src_bin)
        table = calibrate(net, src_param, src_bin, ctx, variant.settings["method"], variant.settings.get("winograd", True))
        fused = net.quantize(table)
        net.write(param, weights)
        return {"converter": "pnnx.export", "quantizer": "ncnn2table + ncnn2int8 scheme (signtrap/deploy/runtimes/ncnn_pnnx.py)",
                "activation_thresholds": variant.settings["method"], "quantized_layers": sorted(table),
                "fused_requantize": fused, "calibration_images": int(len(ctx.calib))}


def pnnx_convert(ctx: ExportContext, fp16: bool):
    """The pnnx conversion of the model (once per weight precision and export), in the scratch folder."""
    stem = ctx.scratch / f"ncnn-{'fp16' if fp16 else 'fp32'}"
    param, weights = stem.with_suffix(".param"), stem.with_suffix(".bin")
    if not param.is_file():
        import pnnx

        stem.mkdir(exist_ok=True)
        with decomposed_std(), quiet_fds():
            pnnx.export(ctx.model.eval(), str(stem / "model.pt"), ctx.sample(1), fp16=fp16,
                        ncnnparam=str(param), ncnnbin=str(weights), ncnnpy=str(stem / "model_ncnn.py"),
                        pnnxparam=str(stem / "model.pnnx.param"), pnnxbin=str(stem / "model.pnnx.bin"),
                        pnnxpy=str(stem / "model_pnnx.py"), pnnxonnx=str(stem / "model.pnnx.onnx"))
        if not param.is_file():
            raise SigntrapError("pnnx wrote no ncnn model (see pnnx's output by running pnnx by hand)")
        unsupported = [line.split()[0] for line in param.read_text().splitlines()[2:] if "." in line.split()[0]]
        if unsupported:
            raise SigntrapError(f"pnnx left operators ncnn cannot run: {', '.join(sorted(set(unsupported)))}")
    return param, weights


@contextlib.contextmanager
def decomposed_std():
    """Trace Tensor.std/var/torch.std/torch.var as mean, subtraction, square, sum and sqrt (ncnn has no std layer)."""
    def var(x, dim=None, unbiased=True, keepdim=False, *, correction=None):
        if isinstance(dim, bool):
            unbiased, dim = dim, None
        dims = tuple(range(x.dim())) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
        n = math.prod(x.shape[d] for d in dims)
        ddof = (1 if unbiased else 0) if correction is None else correction
        dev = x - x.mean(dim=dims, keepdim=True)
        return (dev * dev).sum(dim=dims, keepdim=keepdim) / (n - ddof)

    def std(x, *args, **kwargs):
        return var(x, *args, **kwargs).sqrt()

    saved = {(owner, name): getattr(owner, name) for owner in (torch.Tensor, torch) for name in ("std", "var")}
    try:
        for owner in (torch.Tensor, torch):
            owner.std, owner.var = std, var
        yield
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


# ---------------------------------------------------------------- ncnn's INT8 scheme (ncnn2table + ncnn2int8)


class NcnnNet:
    """An ncnn .param/.bin pair as layers and weight blocks, enough to quantize convolutions and inner products."""

    def __init__(self, layers: list[dict], blob_count: int):
        self.layers, self.blob_count = layers, blob_count

    @classmethod
    def read(cls, param_path, bin_path) -> "NcnnNet":
        lines = [line.split() for line in param_path.read_text().splitlines() if line.strip()]
        if lines[0] != ["7767517"]:
            raise SigntrapError(f"{param_path.name}: not an ncnn text param file")
        layer_count, blob_count = int(lines[1][0]), int(lines[1][1])
        data = memoryview(bin_path.read_bytes())
        offset, layers = 0, []
        for tokens in lines[2:2 + layer_count]:
            kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
            bottoms, tops = tokens[4:4 + n_in], tokens[4 + n_in:4 + n_in + n_out]
            params = dict(t.split("=", 1) for t in tokens[4 + n_in + n_out:])
            layer = {"type": kind, "name": name, "bottoms": bottoms, "tops": tops, "params": params, "blocks": []}
            for block, count in payload(kind, params):
                if block == "tagged":
                    tag = struct.unpack_from("<I", data, offset)[0]
                    if tag != 0:
                        raise SigntrapError(f"{name}: weights stored with tag {tag:#x}; quantize from FP32 weights")
                    offset += 4
                array = np.frombuffer(data, np.float32, count, offset).copy()
                offset += 4 * count
                layer["blocks"].append((block, array))
            layers.append(layer)
        if offset != len(data):
            raise SigntrapError(f"{bin_path.name}: {len(data) - offset} bytes left over after the last layer; "
                                "a layer type with weights this quantizer does not know")
        return cls(layers, blob_count)

    def quantize(self, table: dict[str, tuple[np.ndarray, float]]) -> list[str]:
        """Apply {layer: (weight scales, input scale)} as ncnn2int8 does; returns the fused requantize pairs."""
        for layer in self.layers:
            if layer["name"] not in table:
                continue
            scales, input_scale = table[layer["name"]]
            (_, weights), *rest = layer["blocks"]
            per_row = weights.reshape(len(scales), -1) * scales[:, None]
            q = np.clip(np.sign(per_row) * np.floor(np.abs(per_row) + 0.5), -127, 127).astype(np.int8)  # C round()
            layer["blocks"] = [("int8", q.reshape(-1)), *rest, ("raw", scales.astype(np.float32)),
                               ("raw", np.array([input_scale], np.float32))]
            layer["params"]["8"] = "1" if layer["type"] == "ConvolutionDepthWise" else "2"
        return self.fuse_requantize(table)

    def fuse_requantize(self, table) -> list[str]:
        """Convolution -> Convolution (directly, or through a Split whose consumers are all INT8 convolutions):
        the first requantizes its output with the second's input scale (int8_scale_term + 100)."""
        consumers = {}
        for layer in self.layers:
            for blob in layer["bottoms"]:
                consumers.setdefault(blob, []).append(layer)
        convs = ("Convolution", "ConvolutionDepthWise")

        def int8_conv(layer):
            return layer["type"] in convs and layer["name"] in table and len(layer["bottoms"]) == 1

        fused = []
        for layer in self.layers:
            if not int8_conv(layer):
                continue
            users = consumers.get(layer["tops"][0], [])
            if len(users) == 1 and users[0]["type"] == "Split":
                users = [u for blob in users[0]["tops"] for u in consumers.get(blob, [])]
                if not users or not all(int8_conv(u) for u in users):
                    continue
            if len(users) != 1 and not all(int8_conv(u) for u in users) or not users or not int8_conv(users[0]):
                continue
            layer["params"]["8"] = str(int(layer["params"]["8"]) + 100)
            layer["blocks"].append(("raw", np.array([table[users[0]["name"]][1]], np.float32)))
            fused.append(f"{layer['name']}->{users[0]['name']}")
        return fused

    def write(self, param_path, bin_path) -> None:
        lines = ["7767517", f"{len(self.layers)} {self.blob_count}"]
        chunks = []
        for layer in self.layers:
            params = " ".join(f"{k}={v}" for k, v in layer["params"].items())
            lines.append(f"{layer['type']:<24} {layer['name']:<24} {len(layer['bottoms'])} {len(layer['tops'])} "
                         f"{' '.join(layer['bottoms'] + layer['tops'])} {params}".rstrip())
            for block, array in layer["blocks"]:
                if block == "int8":
                    pad = (-len(array)) % 4
                    chunks += [struct.pack("<I", INT8_TAG), array.tobytes(), b"\0" * pad]
                elif block == "tagged":
                    chunks += [struct.pack("<I", 0), array.astype(np.float32).tobytes()]
                else:
                    chunks.append(array.astype(np.float32).tobytes())
        param_path.write_text("\n".join(lines) + "\n")
        bin_path.write_bytes(b"".join(chunks))


def payload(kind: str, params: dict) -> list[tuple[str, int]]:
    """The weight blocks of one layer in its .bin, as ncnn's load_model reads them."""
    def p(key, default=0):
        return int(float(params.get(key, default)))

    if kind in ("Convolution", "ConvolutionDepthWise", "Deconvolution", "DeconvolutionDepthWise"):
        if p("8"):
            raise SigntrapError("the model is already INT8-quantized")
        return [("tagged", p("6"))] + ([("raw", p("0"))] if p("5") else [])
    if kind == "InnerProduct":
        if p("8"):
            raise SigntrapError("the model is already INT8-quantized")
        return [("tagged", p("2"))] + ([("raw", p("0"))] if p("1") else [])
    if kind == "MemoryData":
        return [("raw", max(p("0"), 1) * max(p("1"), 1) * max(p("11"), 1) * max(p("2"), 1))]
    if kind == "BatchNorm":
        return [("raw", p("0"))] * 4
    if kind == "Scale":
        return [("raw", p("0"))] + ([("raw", p("0"))] if p("1") else [])
    if kind == "PReLU":
        return [("raw", p("0"))]
    if kind in WEIGHTLESS:
        return []
    raise SigntrapError(f"ncnn INT8: layer type {kind} is not supported by signtrap's ncnn quantizer")


def weight_scales(layer: dict, winograd: bool = True) -> np.ndarray:
    """ncnn2table: 127/absmax per output channel (per group for depthwise), 31/absmax for 3x3 s1 d1 convolutions
    (the 6-bit weights of the INT8 Winograd F43 kernels; not needed when Winograd is off)."""
    params = {k: int(float(v)) for k, v in layer["params"].items() if "," not in v}
    weights = layer["blocks"][0][1]
    rows = params.get("7", 1) if layer["type"] == "ConvolutionDepthWise" else params["0"]
    absmax = np.abs(weights.reshape(rows, -1)).max(axis=1)
    kw = params.get("1", 1)
    f43 = (layer["type"] == "Convolution" and kw == params.get("11", kw) == 3
           and params.get("2", 1) == params.get("12", 1) == 1 and params.get("3", 1) == params.get("13", 1) == 1)
    levels = 31.0 if winograd and f43 else 127.0
    return np.where(absmax > 0, levels / np.maximum(absmax, 1e-30), 1.0).astype(np.float32)


def calibrate(net: NcnnNet, param, weights, ctx: ExportContext, method: str,
              winograd: bool = True) -> dict[str, tuple[np.ndarray, float]]:
    """Activation scales of every convolution/inner product's input blob from the FP32 net on the calibration images."""
    import ncnn

    targets = [layer for layer in net.layers if layer["type"] in QUANTIZED]
    runner = ncnn.Net()
    runner.opt.use_fp16_storage = runner.opt.use_fp16_packed = runner.opt.use_fp16_arithmetic = False
    runner.opt.use_bf16_storage = False
    runner.opt.num_threads = 1  # see Ncnn.check_threads
    runner.load_param(str(param))
    runner.load_model(str(weights))
    input_name = runner.input_names()[0]
    blobs = [layer["bottoms"][0] for layer in targets]
    samples = {blob: [] for blob in blobs}
    for batch in ctx.calib_batches(64):
        for image in batch:
            extractor = runner.create_extractor()
            extractor.input(input_name, ncnn.Mat(np.ascontiguousarray(image)))
            for blob in blobs:
                status, out = extractor.extract(blob)
                if status != 0:
                    raise SigntrapError(f"ncnn calibration: cannot extract blob {blob}")
                samples[blob].append(np.abs(np.array(out, np.float32).reshape(-1)))
    table = {}
    for layer, blob in zip(targets, blobs):
        values = np.concatenate(samples[blob])
        threshold = kl_threshold(values) if method == "kl" else aciq_threshold(float(values.max()), len(samples[blob][0]))
        table[layer["name"]] = (weight_scales(layer, winograd), 127.0 / threshold if threshold > 0 else 1.0)
    return table


def kl_threshold(abs_values: np.ndarray, bins: int = 2048, target: int = 128) -> float:
    """ncnn2table's KL method on |activation| values: the clipping threshold (in activation units)."""
    absmax = float(abs_values.max())
    if absmax == 0:
        return 0.0
    nonzero = abs_values[abs_values != 0]
    index = np.minimum((nonzero / absmax * bins).astype(np.int64), bins - 1)
    hist = np.bincount(index, minlength=bins).astype(np.float64)
    hist /= hist.sum()
    eps = 1e-4
    best, best_t = np.inf, target
    for t in range(target, bins):
        p = hist[:t] + eps
        p[t - 1] += hist[t:].sum()
        width = t / target
        j = np.arange(t)
        ka = np.minimum((j / width).astype(np.int64), target - 1)
        split = (ka + 1) * width  # the quantized-bin edge that may cut unit bin j
        over_b = np.clip(j + 1 - split, 0, None) * (ka < target - 1)
        over_a = 1.0 - over_b
        kb = np.minimum(ka + 1, target - 1)
        q = (np.bincount(ka, over_a * hist[:t], target) + np.bincount(kb, over_b * hist[:t], target)) / width
        expand = eps + over_a * q[ka] + over_b * q[kb]
        kl = float(np.sum(p * np.log(p / expand)))
        if kl < best:
            best, best_t = kl, t
    return (best_t + 0.5) * absmax / bins


def aciq_threshold(absmax: float, n: int, bits: int = 8) -> float:
    """ncnn2table's ACIQ method: Gaussian clipping from the absmax over all images and the blob's size per image."""
    alpha = (0, 1.71063519, 2.15159277, 2.55913646, 2.93620062, 3.28691474, 3.6151146, 3.92403714)[bits - 1]
    const = 0.5 * 0.35 * (1 + math.sqrt(math.pi * math.log(4)))
    std = absmax * 2 * const / math.sqrt(2 * math.log(n))
    return alpha * std
