"""ONNX Runtime on an NVIDIA GPU: the CUDA and TensorRT execution providers (runtimes `onnxruntime-cuda` and
`onnxruntime-tensorrt`), running ONNX Runtime's FP32, FP16 and INT8 (explicit QDQ) artefacts.

They write no files of their own: `signtrap bench` and the edge script run the onnxruntime artefacts through
each provider where it is available, and list it as skipped, with the reason, where it is not (no GPU, or
the CPU-only `onnxruntime` package instead of `onnxruntime-gpu`). The two packages must never be installed
together, as both own the `onnxruntime` module: `pip uninstall -y onnxruntime && pip install 'signtrap[gpu]'`.
TensorRT builds FP16 engines for FP16 artefacts (trt_fp16_enable) and INT8 engines from the Q/DQ scales of
INT8 artefacts (trt_int8_enable; no calibration table is needed for explicit quantization).
"""
from __future__ import annotations

from signtrap.deploy.edge_bench import EDGE_RUNTIMES, EdgeRuntime, edge_runtime  # noqa: F401 (edge section)
from signtrap.deploy.runtime import Runtime
from signtrap.deploy.runtimes import register_runtime


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


class OnnxRuntimeGpu(Runtime):
    extra = "gpu"
    packages = ("onnxruntime",)
    exports = False

    def variants(self, ecfg):
        return []


@register_runtime
class OnnxRuntimeCuda(OnnxRuntimeGpu):
    name = "onnxruntime-cuda"
    title = "ONNX Runtime (CUDA execution provider)"
    edge = OnnxRuntimeCudaEdge

    def distributions(self):
        return ("onnxruntime-gpu",)


@register_runtime
class OnnxRuntimeTensorrt(OnnxRuntimeGpu):
    name = "onnxruntime-tensorrt"
    title = "ONNX Runtime (TensorRT execution provider)"
    edge = OnnxRuntimeTensorrtEdge

    def distributions(self):
        return ("onnxruntime-gpu", "tensorrt")
