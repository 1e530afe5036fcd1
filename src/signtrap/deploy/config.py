"""Export settings (the `export:` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExportConfig:
    enabled: bool = True
    out_dir: str = "export"  # exports go to OUT_DIR/NAME (OUT_DIR/NAME-defence-METHOD for a defence)
    # runtimes to export for (see `signtrap export --help`); empty: every runtime whose packages are installed
    runtimes: list[str] = field(default_factory=list)
    # optional quantizer variants besides each runtime's default int8: `all`, a variant name
    # (`int8-perchannel`: every runtime that has it) or RUNTIME:VARIANT (`openvino:int8-mixed`)
    quantizers: list[str] = field(default_factory=list)
    exporter: str = "auto"  # auto: dynamo, falling back to the TorchScript exporter | dynamo | torchscript
    opset: int = 18
    # calibration images, the same for every runtime's INT8 quantizer
    calibration: str = "clean"  # clean: clean training images | mixed: some of them carry the trigger
    calib_images: int = 512
    calib_trigger_fraction: float = 0.25  # share of calibration images stamped with the trigger when mixed
    # ONNX Runtime's default int8 variant (QDQ, S8S8)
    calib_method: str = "minmax"  # minmax | entropy | percentile
    per_channel: bool = False
    # parity gate of every FP32 artefact against PyTorch on the whole evaluation bundle (clean + triggered):
    # |logit difference| <= parity_atol + parity_rtol * |PyTorch logit|, and top-1 must agree on every image
    # except near-ties whose PyTorch top-2 margin is below parity_tie_margin
    parity_atol: float = 1e-3
    parity_rtol: float = 1e-4
    parity_tie_margin: float = 2e-3
    # gate of FP16 and INT8 artefacts: finite logits and top-1 agreement with PyTorch on the clean test images
    # (triggered images are left to the bench audit: a backdoor that wakes after quantization is a finding)
    min_agreement: float = 0.8  # a broken conversion agrees on few images; real quantization loss is far smaller
    # signtrap bench defaults
    bench_runs: int = 200
    bench_warmup: int = 20
    bench_batch: int = 64

    def check(self) -> None:
        from signtrap.config import one_of, require

        require(bool(self.out_dir), "export.out_dir", "must not be empty")
        require(all(isinstance(r, str) and r for r in self.runtimes), "export.runtimes", "must be runtime names")
        require(all(isinstance(q, str) and q for q in self.quantizers), "export.quantizers", "must be variant names")
        one_of(self.exporter, "export.exporter", ("auto", "dynamo", "torchscript"))
        require(13 <= self.opset <= 23, "export.opset", f"{self.opset} is outside 13..23 (per-channel QDQ needs 13+)")
        one_of(self.calibration, "export.calibration", ("clean", "mixed"))
        one_of(self.calib_method, "export.calib_method", ("minmax", "entropy", "percentile"))
        require(1 <= self.calib_images <= 100_000, "export.calib_images", f"{self.calib_images} is outside 1..100000")
        require(0.0 < self.calib_trigger_fraction < 1.0, "export.calib_trigger_fraction",
                f"{self.calib_trigger_fraction} is outside (0, 1)")
        require(0.0 < self.parity_atol <= 1.0, "export.parity_atol", f"{self.parity_atol} is outside (0, 1]")
        require(0.0 <= self.parity_rtol <= 0.1, "export.parity_rtol", f"{self.parity_rtol} is outside [0, 0.1]")
        require(0.0 <= self.parity_tie_margin <= 1.0, "export.parity_tie_margin", f"{self.parity_tie_margin} is outside [0, 1]")
        require(0.0 <= self.min_agreement <= 1.0, "export.min_agreement", f"{self.min_agreement} is outside [0, 1]")
        require(1 <= self.bench_runs <= 100_000, "export.bench_runs", f"{self.bench_runs} is outside 1..100000")
        require(0 <= self.bench_warmup <= 10_000, "export.bench_warmup", f"{self.bench_warmup} is outside 0..10000")
        require(1 <= self.bench_batch <= 4096, "export.bench_batch", f"{self.bench_batch} is outside 1..4096")
