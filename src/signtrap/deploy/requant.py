"""A deployment-time defence against quantization-conditioned backdoors: EFRAP-style rounding of the INT8 weights.

A dormant backdoor (`attack.dormant: int8`, signtrap.attacks.dormant) lives in the *rounding* of the weights:
the attacker moved each FP32 weight to the far edge of its rounding interval, so round-to-nearest lands on the
backdoored INT8 value although the FP32 weight itself sits almost half a step away from it, on the clean side.
Li et al. (EFRAP, CVPR 2024) observed exactly that: the backdoor's weights are those with large truncation
errors, and rounding them the other way ("flipped rounding") removes it. Flipping everything with a large
error hurts clean accuracy, so EFRAP learns the rounding of each layer (AdaRound's continuous relaxation:
``q = floor(w / s) + h``, ``h`` in [0, 1]) under three terms:

- activation preservation: the layer's output with the learned INT8 weights matches its FP32 output on the
  defender's clean images (relative squared error);
- error-guided flipping: ``mean(E * CE(h, 1 - nearest))``, where ``E`` is the truncation error in steps, pulls
  the weights with large errors towards the opposite rounding (``flip_weight``);
- a regulariser that drives every ``h`` to 0 or 1 (``round_weight``, exponent annealed from 20 to 2 as in AdaRound).

Only the integer weights change: scales, zero points, biases and activation ranges of the artefact stay what
ONNX Runtime's quantizer wrote, so the defended file is a drop-in replacement of ``model.int8.onnx``. Layer
inputs are the FP32 model's activations on the clean images (BatchNorm folded as in the export). Every
setting is fixed in advance or chosen on the defender's clean images; none looks at triggered images.

Reference: B. Li, Y. Cai, H. Li, F. Xue, Z. Li, Y. Li, "Nearest is Not Dearest: Towards Practical Defense
against Quantization-conditioned Backdoor Attacks", CVPR 2024 (AdaRound: Nagel et al., ICML 2020).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from signtrap.attacks.dormant import QMAX, Grid, match_grids, read_int8_weights
from signtrap.errors import SigntrapError
from signtrap.experiment import to_tensor
from signtrap.machine.progress import progress


@dataclass(frozen=True)
class EfrapSettings:
    steps: int = 300  # optimisation steps per layer
    lr: float = 1e-2  # Adam on the rounding logits
    batch: int = 64  # clean images per step (drawn from the defender's images)
    flip_weight: float = 0.1  # error-guided flipping term
    round_weight: float = 0.01  # drive h to {0, 1}
    seed: int = 0


def layer_io(model: nn.Module, grids: list[Grid], images: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """Input of every quantized layer on `images` (uint8 NHWC), from the FP32 model."""
    inputs: dict[str, list[torch.Tensor]] = {g.layer.name: [] for g in grids}
    handles = [g.layer.module.register_forward_hook(lambda m, args, out, name=g.layer.name: inputs[name].append(args[0].detach()))
               for g in grids]
    try:
        with torch.no_grad():
            for start in range(0, len(images), 256):
                model(to_tensor(images[start:start + 256], device))
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's linear part with `weight` (folded), no bias: what activation preservation compares."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    conv = F.conv2d if isinstance(module, nn.Conv2d) else F.conv1d
    return conv(x, weight, None, module.stride, module.padding, module.dilation, module.groups)


def learn_rounding(g: Grid, x: torch.Tensor, s: EfrapSettings, rng: np.random.Generator) -> torch.Tensor:
    """EFRAP's rounding of one layer: the new integer weights (float64 tensor in the PyTorch layout)."""
    w = g.layer.folded().to(x.device)
    scale = g.scale.to(x.device)
    base = torch.floor(w / scale)
    frac = w / scale - base
    nearest = (frac >= 0.5).double()
    error = torch.minimum(frac, 1 - frac)  # truncation error of round-to-nearest, in steps (0..0.5)
    h0 = frac.clamp(1e-4, 1 - 1e-4)
    alpha = torch.log(h0 / (1 - h0)).float().requires_grad_(True)  # sigmoid(alpha) = h starts at the FP32 value
    opt = torch.optim.Adam([alpha], lr=s.lr)
    target_w = w.float()
    for step in range(s.steps):
        idx = torch.from_numpy(rng.choice(len(x), min(s.batch, len(x)), replace=False)).to(x.device)
        xb = x[idx]
        h = torch.sigmoid(alpha)
        wq = ((base.float() + h).clamp(-QMAX, QMAX)) * scale.float()
        with torch.no_grad():
            ref = _apply(g.layer.module, xb, target_w)
        out = _apply(g.layer.module, xb, wq)
        rec = ((out - ref) ** 2).mean() / (ref ** 2).mean().clamp_min(1e-12)
        flip = (error.float() * F.binary_cross_entropy(h, 1 - nearest.float(), reduction="none")).mean()
        b = 20 - (20 - 2) * step / max(1, s.steps - 1)
        reg = (1 - (2 * h - 1).abs().pow(b)).mean()
        loss = rec + s.flip_weight * flip + s.round_weight * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = (base + (alpha >= 0).double()).clamp(-QMAX, QMAX)
        # the weight(s) that set the scale keep their value: the grid must stay the artefact's
        top = w.abs() >= w.abs().amax(dim=tuple(range(1, w.dim())) if g.per_channel else tuple(range(w.dim())), keepdim=True)
        return torch.where(top, g.q.to(q.device), q)


def efrap(model: nn.Module, int8_path: Path, clean: np.ndarray, dst: Path, settings: EfrapSettings = EfrapSettings(),
          device: torch.device | str = "cpu", show_progress: bool = True) -> dict:
    """Rewrite the integer weights of the QDQ file `int8_path` with EFRAP's rounding; write `dst`; return a summary."""
    import onnx
    from onnx import numpy_helper

    if len(clean) == 0:
        raise SigntrapError("EFRAP needs clean images from the defender")
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).eval()
    tensors = read_int8_weights(int8_path)
    per_channel = any(t.scale.size > 1 for t in tensors.values())
    grids = match_grids(model, tensors, per_channel)
    inputs = layer_io(model, grids, clean, device)
    rng = np.random.default_rng(settings.seed)
    graph_model = onnx.load(str(int8_path))
    inits = {t.name: t for t in graph_model.graph.initializer}
    summary = {"layers": {}, "settings": dict(vars(settings))}
    bar = progress(len(grids), "EFRAP rounding", enabled=show_progress)
    for g in grids:
        q = learn_rounding(g, inputs[g.layer.name], settings, rng).cpu()
        init = inits[g.initializer]
        old = numpy_helper.to_array(init)
        new = q.numpy().astype(np.int8)
        if g.transposed:
            new = new.T
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
        nearest = torch.round(g.layer.folded() / g.scale)
        summary["layers"][g.layer.name] = {"weights": int(q.numel()), "changed_vs_ort": int((new != old).sum()),
                                           "flipped_vs_nearest": int((q != nearest).sum())}
        bar.update(1)
    bar.close()
    onnx.save(graph_model, str(dst))
    return summary
