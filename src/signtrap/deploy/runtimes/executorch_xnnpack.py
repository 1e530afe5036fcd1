"""ExecuTorch with the XNNPACK delegate: `torch.export` -> `to_edge_transform_and_lower(XnnpackPartitioner)`
-> .pte program, run by ExecuTorch's runtime (`executorch.runtime`).

Variants: fp32; int8 with ExecuTorch's own XNNPACK PT2E quantizer (`XNNPACKQuantizer`, static, per-channel
symmetric INT8 weights, per-tensor INT8 activations) calibrated on the shared images; the optional
int8-pertensor (per-tensor weights). XNNPACK has no FP16 path here that keeps FP32 inputs, so there is no fp16.

The program takes batches of up to EXECUTORCH_MAX_BATCH images (memory is planned for that bound; larger
batches run in chunks). ExecuTorch's Python runtime links libtorch and imports torch: on a device without
torch its rows are skipped with that reason (a phone runs the .pte with ExecuTorch's C++ runtime instead).
"""
from __future__ import annotations

import numpy as np

from signtrap.deploy.config import ExportConfig
from signtrap.deploy.edge_bench import EdgeRuntime, chunked, edge_runtime  # noqa: F401 (edge section)
from signtrap.deploy.quiet import quiet_fds
from signtrap.deploy.runtime import ExportContext, Runtime, Variant
from signtrap.deploy.runtimes import register_runtime

EXECUTORCH_MAX_BATCH = 256  # the edge script's evaluation batch


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


@register_runtime
class ExecuTorch(Runtime):
    name = "executorch"
    title = "ExecuTorch (XNNPACK delegate)"
    extra = "executorch"
    packages = ("executorch",)
    edge = ExecuTorchEdge
    extension = "pte"

    def variants(self, ecfg: ExportConfig) -> list[Variant]:
        return [Variant("fp32", "fp32", None, settings={}),
                Variant("int8", "int8", "XNNPACKQuantizer (PT2E): static, per-channel symmetric INT8 weights, "
                                        "per-tensor INT8 activations", settings={"per_channel": True}),
                Variant("int8-pertensor", "int8", "XNNPACKQuantizer (PT2E): static, per-tensor INT8 weights",
                        default=False, settings={"per_channel": False})]

    def convert(self, ctx: ExportContext, variant: Variant) -> dict:
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        model = ctx.model.eval()
        # torch 2.14 + executorch 1.5 plan the batch bound from the tracing example, so trace at the bound
        sample = ctx.sample(EXECUTORCH_MAX_BATCH)
        dynamic = ({0: torch.export.Dim("batch", min=1, max=EXECUTORCH_MAX_BATCH)},)
        info = {"converter": "torch.export + executorch.exir.to_edge_transform_and_lower(XnnpackPartitioner)",
                "max_batch": EXECUTORCH_MAX_BATCH}
        with quiet_fds():
            if variant.precision == "int8":
                model = quantize(model, ctx, sample, dynamic, variant.settings["per_channel"])
                info.update(quantizer="executorch XNNPACKQuantizer (PT2E)", per_channel=variant.settings["per_channel"],
                            calibration_images=int(len(ctx.calib)))
            program = torch.export.export(model, sample, dynamic_shapes=dynamic)
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        (ctx.folder / self.files(variant)[0]).write_bytes(lowered.buffer)
        return info


def quantize(model, ctx: ExportContext, sample, dynamic, per_channel: bool):
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    prepared = prepare_pt2e(torch.export.export(model, sample, dynamic_shapes=dynamic).module(), quantizer)
    with torch.no_grad():
        for batch in ctx.calib_batches(64):
            prepared(torch.from_numpy(batch))
    return convert_pt2e(prepared)
