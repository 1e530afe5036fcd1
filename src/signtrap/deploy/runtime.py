"""What every runtime plugin provides on the host, and what `signtrap export` hands it.

A runtime plugin (signtrap/deploy/runtimes/NAME.py) subclasses `Runtime`: its name and pip extra, the
packages its converter needs, its variants (FP32, FP16 where the runtime supports it, INT8 with the
runtime's own quantizer, and optional named quantizer variants), `convert` (write one variant's files
into the export folder) and `report_block` (what model.json records about it). Its `edge` class is the
torch-free device side (see signtrap.deploy.edge_bench.EdgeRuntime).

Artefact files are named `model.RUNTIME.VARIANT.EXT` (ONNX Runtime, whose ONNX files every ONNX-capable
runtime can run, keeps `model.VARIANT.onnx`); the artefact id in model.json and bench.json is
`RUNTIME:VARIANT`, e.g. `openvino:int8` or `onnxruntime:int8-perchannel`.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from signtrap.deploy import edge_bench
from signtrap.deploy.config import ExportConfig

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Variant:
    """One artefact a runtime can produce: a precision and, for INT8, the quantizer settings that made it."""

    name: str  # fp32 | fp16 | int8 | int8-SOMETHING
    precision: str  # fp32 | fp16 | int8
    quantizer: str | None = None  # human-readable: whose quantizer, which calibration, granularity
    default: bool = True  # exported unless the user narrows the set; optional quantizer variants are False
    settings: dict = field(default_factory=dict)


@dataclass
class ExportContext:
    """Everything a runtime needs to convert: the FP32 model, calibration images, a scratch folder."""

    model: nn.Module  # FP32 PyTorch model, eval mode, on the CPU
    size: int  # input height = width
    folder: Path  # the (temporary) export folder: write artefacts here, by the names `Runtime.files` gives
    scratch: Path  # intermediate files, deleted after the export
    calib: np.ndarray  # uint8 NHWC calibration images, the same for every runtime
    calib_info: dict
    ecfg: ExportConfig
    threads: int
    onnx_info: dict = field(default_factory=dict)
    _onnx: Path | None = None

    def onnx_fp32(self) -> Path:
        """The FP32 ONNX graph (dynamic batch), exported once per export and shared by ONNX-based converters."""
        if self._onnx is None:
            from signtrap.deploy.onnx_graph import export_fp32

            path = self.scratch / "fp32.onnx"
            self.onnx_info = export_fp32(self.model, path, self.size, self.ecfg.exporter, self.ecfg.opset)
            self._onnx = path
        return self._onnx

    def calib_batches(self, batch: int = 64) -> Iterator[np.ndarray]:
        """Calibration images as float32 NCHW batches in [0, 1]."""
        for start in range(0, len(self.calib), batch):
            yield edge_bench.to_input(self.calib[start:start + batch])

    def sample(self, batch: int = 1) -> tuple[torch.Tensor]:
        """A tracing input for exporters that take example arguments."""
        return (torch.from_numpy(edge_bench.to_input(self.calib[:1].repeat(batch, axis=0))),)


class Runtime:
    """Host side of a runtime plugin. Subclasses set the class attributes and implement `convert`."""

    name: str = ""
    title: str = ""  # e.g. "OpenVINO (CPU plugin)"
    extra: str = ""  # pip extra: pip install 'signtrap[EXTRA]'
    packages: tuple[str, ...] = ()  # import names the converter needs on the host
    edge: type[edge_bench.EdgeRuntime] = edge_bench.EdgeRuntime
    exports: bool = True  # False: runs another runtime's artefacts (ONNX Runtime's GPU providers)
    extension: str = ""
    module: str = ""  # the plugin module, set when registered
    check_threads: int | None = None  # threads for the export-time gate and calibration (None: the export's)

    def variants(self, ecfg: ExportConfig) -> list[Variant]:
        raise NotImplementedError

    def missing(self) -> str | None:
        """None when the converter can run here, else one line naming the package and the extra to install."""
        absent = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if absent:
            return (f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed: "
                    f"pip install 'signtrap[{self.extra}]'")
        return None

    def files(self, variant: Variant) -> list[str]:
        """File names of one variant's artefact (plain names inside the export folder)."""
        return [f"model.{self.name}.{variant.name}.{self.extension}"]

    def convert(self, ctx: ExportContext, variant: Variant) -> dict:
        """Write `self.files(variant)` into ctx.folder; return what to record about the conversion."""
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        out = {}
        for dist in self.distributions():
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return out

    def distributions(self) -> tuple[str, ...]:
        return self.packages

    def report_block(self, artefacts: list[dict]) -> dict:
        """What model.json records for this runtime: versions and the artefacts it wrote."""
        return {"title": self.title, "versions": self.versions(), "artefacts": [a["id"] for a in artefacts],
                "edge_install": self.edge.install}


def run_batches(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int = edge_bench.EVAL_BATCH) -> np.ndarray:
    """Logits for uint8 NHWC `images`, in the edge script's fixed evaluation batches."""
    return np.concatenate([np.asarray(run(edge_bench.to_input(images[s:s + batch])), np.float32)
                           for s in range(0, len(images), batch)])
