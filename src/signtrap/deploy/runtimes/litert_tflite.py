"""LiteRT (TensorFlow Lite): .tflite flatbuffers converted from PyTorch with litert-torch, run by LiteRT's
interpreter (ai-edge-litert, or the older tflite-runtime) with its default XNNPACK delegate.

Variants:
- fp32: `litert_torch.convert` of the FP32 model;
- fp16: FP16 weights (AI Edge Quantizer float casting), dequantized to FP32 at load; on x86 the
  arithmetic stays FP32, ARM CPUs with FP16 arithmetic may run it in FP16;
- int8: static INT8 with LiteRT's quantizer, the AI Edge Quantizer, on the layers that carry weights
  (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED: per-channel symmetric INT8 weights, per-tensor asymmetric
  INT8 activations; min/max calibration on the shared images) - the scope OpenVINO's NNCF and ncnn quantize;
- int8-full (optional): full-integer model (recipe static_wi8_ai8 on every supported op, INT8 input and
  output), what a microcontroller or an Edge TPU runs. Models that standardise each image (signnet's
  ImageStandardize divides by the per-image standard deviation) lose that division's precision in INT8
  activations: on the tiny test model it agrees with FP32 on ~55% of images and fails the gate;
- int8-pt2e (optional): litert-torch's PT2E quantizer (per-channel symmetric, static, histogram observers)
  applied in PyTorch before conversion; float input.
The graph is converted with batch 1; the interpreter resizes the batch dimension when a batch arrives.
"""
from __future__ import annotations

import importlib
import shutil

import numpy as np

from signtrap.deploy.config import ExportConfig
from signtrap.deploy.edge_bench import EdgeRuntime, edge_runtime, first_line  # noqa: F401 (edge section)
from signtrap.deploy.quiet import quiet_fds
from signtrap.deploy.runtime import ExportContext, Runtime, Variant
from signtrap.deploy.runtimes import register_runtime


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


@register_runtime
class LiteRt(Runtime):
    name = "litert"
    title = "LiteRT / TensorFlow Lite (interpreter, XNNPACK)"
    extra = "litert"
    packages = ("ai_edge_litert", "litert_torch", "ai_edge_quantizer")
    edge = LiteRtEdge
    extension = "tflite"

    def distributions(self):
        return ("ai-edge-litert", "litert-torch", "ai-edge-quantizer", "litert-converter")

    def variants(self, ecfg: ExportConfig) -> list[Variant]:
        return [Variant("fp32", "fp32"),
                Variant("fp16", "fp16", "AI Edge Quantizer float casting: FP16 weights, FP32 compute on x86"),
                Variant("int8", "int8", "AI Edge Quantizer static INT8 on conv/fully-connected layers: per-channel "
                                        "weights, per-tensor asymmetric activations", settings={"scope": "weighted"}),
                Variant("int8-full", "int8", "AI Edge Quantizer static_wi8_ai8: full integer, INT8 input and output",
                        default=False, settings={"scope": "all"}),
                Variant("int8-pt2e", "int8", "litert-torch PT2E quantizer: static, per-channel symmetric weights",
                        default=False)]

    def convert(self, ctx: ExportContext, variant: Variant) -> dict:
        dst = ctx.folder / self.files(variant)[0]
        if variant.name == "int8-pt2e":
            return convert_pt2e(ctx, dst)
        fp32 = float_model(ctx)
        if variant.precision == "fp32":
            shutil.copyfile(fp32, dst)
            return {"converter": "litert_torch.convert", "input_shape": [1, 3, ctx.size, ctx.size]}
        return quantize(fp32, dst, ctx, variant.precision, variant.settings.get("scope"))


def float_model(ctx: ExportContext):
    """The FP32 .tflite (converted once per export, in the scratch folder)."""
    path = ctx.scratch / "litert.fp32.tflite"
    if not path.is_file():
        import litert_torch

        with quiet_fds():
            litert_torch.convert(ctx.model.eval(), ctx.sample(1)).export(str(path))
    return path


def quantize(fp32, dst, ctx: ExportContext, precision: str, scope: str | None) -> dict:
    from ai_edge_quantizer import quantizer, recipe_manager
    from ai_edge_quantizer.qtyping import TFLOperationName

    if precision == "fp16":
        q = quantizer.Quantizer(str(fp32), [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
                                            "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                                                          "compute_precision": "FLOAT", "explicit_dequantize": True}}])
        with quiet_fds():
            q.quantize().export_model(str(dst), overwrite=True)
        return {"quantizer": "ai_edge_quantizer float_casting", "weights": "float16"}
    ops = ([TFLOperationName.ALL_SUPPORTED] if scope == "all" else
           [TFLOperationName.CONV_2D, TFLOperationName.DEPTHWISE_CONV_2D, TFLOperationName.FULLY_CONNECTED])
    manager = recipe_manager.RecipeManager()
    for op in ops:
        manager.add_static_config(regex=".*", operation_name=op, activation_num_bits=8, weight_num_bits=8)
    q = quantizer.Quantizer(str(fp32), manager.get_quantization_recipe())
    signature, name = signature_input(fp32)
    samples = [{name: batch[i:i + 1]} for batch in ctx.calib_batches(64) for i in range(len(batch))]
    with quiet_fds():
        calibration = q.calibrate({signature: samples}, num_threads=max(1, ctx.threads))
        q.quantize(calibration).export_model(str(dst), overwrite=True)
    return {"quantizer": "ai_edge_quantizer static INT8 (min/max)", "ops": [str(op.value) for op in ops],
            "calibration_images": len(samples), "weights": "int8 per-channel symmetric",
            "activations": "int8 per-tensor asymmetric", "io": "int8" if scope == "all" else "float32"}


def signature_input(path) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    signature = next(iter(signatures))
    return signature, signatures[signature]["inputs"][0]


def convert_pt2e(ctx: ExportContext, dst) -> dict:
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as convert, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    with quiet_fds():
        prepared = prepare_pt2e(torch.export.export(ctx.model.eval(), ctx.sample(1)).module(), quantizer)
        with torch.no_grad():
            for batch in ctx.calib_batches(64):  # the graph was exported with batch 1
                for image in batch:
                    prepared(torch.from_numpy(image[None]))
        converted = convert(prepared, fold_quantize=False)
        litert_torch.convert(converted, ctx.sample(1), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(dst))
    return {"quantizer": "litert_torch PT2EQuantizer (symmetric, per-channel, static)",
            "calibration_images": int(len(ctx.calib))}
