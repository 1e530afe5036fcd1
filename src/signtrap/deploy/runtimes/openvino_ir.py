"""OpenVINO (CPU plugin): IR converted from the FP32 ONNX graph with `openvino.convert_model`; FP16 IR
(compressed weights, executed with inference precision f16 where the CPU supports it); INT8 with NNCF
post-training quantization (`nncf.quantize`, OpenVINO's own quantizer) on the shared calibration images.

Variants: fp32, fp16, int8 (NNCF preset PERFORMANCE: symmetric activations and weights, fast bias correction)
and the optional int8-mixed (preset MIXED: asymmetric activations) and int8-accurate (full bias correction).
FP32 and INT8 artefacts are compiled with INFERENCE_PRECISION_HINT=f32: on CPUs with AMX or AVX512-BF16 the
CPU plugin would otherwise run the float parts in bf16 and miss the FP32 parity gate.
"""
from __future__ import annotations

from signtrap.deploy.config import ExportConfig
from signtrap.deploy.edge_bench import EdgeRuntime, edge_runtime  # noqa: F401 (edge section)
from signtrap.deploy.quiet import quiet
from signtrap.deploy.runtime import ExportContext, Runtime, Variant
from signtrap.deploy.runtimes import register_runtime

PRESETS = {"int8": ("PERFORMANCE", True), "int8-mixed": ("MIXED", True), "int8-accurate": ("PERFORMANCE", False)}


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


@register_runtime
class OpenVino(Runtime):
    name = "openvino"
    title = "OpenVINO (CPU plugin)"
    extra = "openvino"
    packages = ("openvino", "nncf")
    edge = OpenVinoEdge

    def variants(self, ecfg: ExportConfig) -> list[Variant]:
        out = [Variant("fp32", "fp32"), Variant("fp16", "fp16", "FP16-compressed IR, inference precision f16")]
        for name, (preset, fast) in PRESETS.items():
            out.append(Variant(name, "int8", f"NNCF post-training quantization, preset {preset}, "
                                             f"{'fast ' if fast else ''}bias correction",
                               default=name == "int8", settings={"preset": preset, "fast_bias_correction": fast}))
        return out

    def files(self, variant: Variant) -> list[str]:
        stem = f"model.{self.name}.{variant.name}"
        return [f"{stem}.xml", f"{stem}.bin"]

    def convert(self, ctx: ExportContext, variant: Variant) -> dict:
        import openvino

        xml = ctx.folder / self.files(variant)[0]
        with quiet():
            model = openvino.convert_model(str(ctx.onnx_fp32()))
        info = {"converter": "openvino.convert_model (from the FP32 ONNX graph)", "openvino": openvino.get_version()}
        if variant.precision == "int8":
            model, quant = quantize(model, ctx, **variant.settings)
            info.update(quant)
        openvino.save_model(model, str(xml), compress_to_fp16=variant.precision == "fp16")
        return info


def quantize(model, ctx: ExportContext, preset: str, fast_bias_correction: bool):
    import nncf

    batches = list(ctx.calib_batches(64))
    with quiet():
        quantized = nncf.quantize(model, nncf.Dataset(batches), preset=getattr(nncf.QuantizationPreset, preset),
                                  subset_size=len(batches), fast_bias_correction=fast_bias_correction)
    return quantized, {"quantizer": "nncf.quantize", "nncf": nncf.__version__, "preset": preset,
                       "fast_bias_correction": fast_bias_correction, "subset": f"{len(ctx.calib)} images in {len(batches)} batches"}
