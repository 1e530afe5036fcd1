"""Export settings (the `export:` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    enabled: bool = True
    out_dir: str = "export"  # exports go to OUT_DIR/NAME (OUT_DIR/NAME-defence-METHOD for a defence)
    exporter: str = "auto"  # auto: dynamo, falling back to the TorchScript exporter | dynamo | torchscript
    opset: int = 18
    # INT8 static quantization (ONNX Runtime, QDQ, S8S8)
    calibration: str = "clean"  # clean: clean training images | mixed: some of them carry the trigger
    calib_method: str = "minmax"  # minmax | entropy | percentile
    per_channel: bool = False
    calib_images: int = 512
    calib_trigger_fraction: float = 0.25  # share of calibration images stamped with the trigger when mixed
    # parity gate: ONNX Runtime FP32 against PyTorch on the whole evaluation bundle
    parity_atol: float = 1e-3  # max |logit difference|
    # top-1 must agree on every image, except near-ties whose PyTorch top-2 margin is below this
    parity_tie_margin: float = 2e-3
    # signtrap bench defaults
    bench_runs: int = 200
    bench_warmup: int = 20
    bench_batch: int = 64

    def check(self) -> None:
        from signtrap.config import one_of, require

        require(bool(self.out_dir), "export.out_dir", "must not be empty")
        one_of(self.exporter, "export.exporter", ("auto", "dynamo", "torchscript"))
        require(13 <= self.opset <= 23, "export.opset", f"{self.opset} is outside 13..23 (per-channel QDQ needs 13+)")
        one_of(self.calibration, "export.calibration", ("clean", "mixed"))
        one_of(self.calib_method, "export.calib_method", ("minmax", "entropy", "percentile"))
        require(1 <= self.calib_images <= 100_000, "export.calib_images", f"{self.calib_images} is outside 1..100000")
        require(0.0 < self.calib_trigger_fraction < 1.0, "export.calib_trigger_fraction",
                f"{self.calib_trigger_fraction} is outside (0, 1)")
        require(0.0 < self.parity_atol <= 1.0, "export.parity_atol", f"{self.parity_atol} is outside (0, 1]")
        require(0.0 <= self.parity_tie_margin <= 1.0, "export.parity_tie_margin", f"{self.parity_tie_margin} is outside [0, 1]")
        require(self.bench_runs >= 1, "export.bench_runs", "must be at least 1")
        require(self.bench_warmup >= 0, "export.bench_warmup", "must be >= 0")
        require(self.bench_batch >= 1, "export.bench_batch", "must be at least 1")
