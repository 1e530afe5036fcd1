"""ONNX Runtime, CPU execution provider: FP32 ONNX graph, FP16 graph (FP32 inputs/outputs), and INT8 static
QDQ quantization with ONNX Runtime's own quantizer (`onnxruntime.quantization.quantize_static`).

Variants: fp32, fp16, int8 (export.calib_method / export.per_channel; default MinMax, per-tensor, S8S8) and the
optional quantizer variants int8-perchannel, int8-entropy and int8-percentile (`--quantizers`). The ONNX files
keep the names model.VARIANT.onnx: they are also what ONNX Runtime's GPU providers run (onnx_runtime_gpu.py).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from signtrap.deploy.config import ExportConfig
from signtrap.deploy.edge_bench import BenchError, EdgeRuntime, edge_runtime  # noqa: F401 (edge section)
from signtrap.deploy.onnx_graph import INPUT_NAME
from signtrap.deploy.quiet import quiet
from signtrap.deploy.runtime import ExportContext, Runtime, Variant
from signtrap.deploy.runtimes import register_runtime
from signtrap.errors import SigntrapError

CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


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


@register_runtime
class OnnxRuntime(Runtime):
    name = "onnxruntime"
    title = "ONNX Runtime (CPU execution provider)"
    extra = "onnxruntime"  # a core dependency; the extra exists for symmetry
    packages = ("onnx", "onnxruntime")
    edge = OnnxRuntimeEdge
    extension = "onnx"

    def variants(self, ecfg: ExportConfig) -> list[Variant]:
        default = {"calibration": ecfg.calib_method, "per_channel": ecfg.per_channel}
        out = [Variant("fp32", "fp32"), Variant("fp16", "fp16", "float16 weights and activations, FP32 inputs/outputs"),
               Variant("int8", "int8", describe(**default), settings=default)]
        for name, settings in (("int8-perchannel", {"calibration": "minmax", "per_channel": True}),
                               ("int8-entropy", {"calibration": "entropy", "per_channel": False}),
                               ("int8-percentile", {"calibration": "percentile", "per_channel": False})):
            out.append(Variant(name, "int8", describe(**settings), default=False, settings=settings))
        return out

    def files(self, variant: Variant) -> list[str]:
        return [f"model.{variant.name}.onnx"]

    def convert(self, ctx: ExportContext, variant: Variant) -> dict:
        dst = ctx.folder / self.files(variant)[0]
        src = ctx.onnx_fp32()
        if variant.precision == "fp32":
            shutil.copyfile(src, dst)
            return dict(ctx.onnx_info)
        if variant.precision == "fp16":
            return convert_fp16(src, dst)
        return quantize_int8(src, dst, ctx, **variant.settings)


def describe(calibration: str, per_channel: bool) -> str:
    return (f"ONNX Runtime static QDQ, S8S8, {CALIBRATION[calibration]} calibration, "
            f"{'per-channel' if per_channel else 'per-tensor'} weights")


def convert_fp16(src: Path, dst: Path) -> dict:
    import onnx

    model = onnx.load(str(src))
    try:
        from onnxconverter_common import float16  # type: ignore

        converted, tool = float16.convert_float_to_float16(model, keep_io_types=True), "onnxconverter_common"
    except ImportError:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with quiet():
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


class CalibrationReader:
    """onnxruntime.quantization.CalibrationDataReader over the export's calibration batches."""

    def __init__(self, ctx: ExportContext):
        self.ctx = ctx
        self.rewind()

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self):
        self.batches = self.ctx.calib_batches(64)


def quantize_int8(src: Path, dst: Path, ctx: ExportContext, calibration: str = "minmax", per_channel: bool = False) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="signtrap-quant-", dir=ctx.scratch) as tmp:
        pre = Path(tmp) / "pre.onnx"
        with quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(dst), CalibrationReader(ctx), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                            calibrate_method=getattr(CalibrationMethod, CALIBRATION[calibration]),
                            extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False})
    return {"quantizer": "onnxruntime.quantization.quantize_static", "format": "QDQ", "activation": "QInt8",
            "weight": "QInt8", "calibration_method": calibration, "per_channel": per_channel,
            "pre_process": "quant_pre_process"}

