"""The FP32 ONNX graph of a model (dynamic batch): ONNX Runtime's FP32 artefact and the input of every
converter that reads ONNX (OpenVINO)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from signtrap.deploy.quiet import quiet
from signtrap.errors import SigntrapError
from signtrap.machine.progress import say

INPUT_NAME, OUTPUT_NAME = "images", "logits"


def export_fp32(model: nn.Module, path: Path, size: int, exporter: str = "auto", opset: int = 18) -> dict:
    """Write an FP32 ONNX graph with a dynamic batch axis; returns which exporter produced it."""
    model = model.cpu().eval()
    dummy = torch.rand(2, 3, size, size)
    errors = []
    if exporter in ("auto", "dynamo"):
        try:
            with quiet():
                torch.onnx.export(model, (dummy,), str(path), dynamo=True, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=opset, external_data=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                                  verbose=False)
            return {"exporter": "dynamo", "torch": torch.__version__, "opset": opset}
        except Exception as exc:  # unsupported op, torch.export limitation...: fall back below
            errors.append(f"dynamo: {type(exc).__name__}: {_first(exc)}")
            if exporter == "dynamo":
                raise SigntrapError(f"ONNX export failed ({errors[-1]})") from None
            say(f"dynamo ONNX export failed ({errors[-1]}); falling back to the TorchScript exporter")
    try:
        with quiet():
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:
        errors.append(f"torchscript: {type(exc).__name__}: {_first(exc)}")
        raise SigntrapError(f"ONNX export failed ({'; '.join(errors)})") from None
    return {"exporter": "torchscript", "torch": torch.__version__, "opset": opset, "fallback_reason": errors[0] if errors else None}


def _first(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""
