"""Dormant backdoors (`attack.dormant: int8`): clean in FP32, live after signtrap's own INT8 export.

The model that is evaluated, audited and defended is the FP32 one; the model on the device is the INT8 one
that `signtrap export` makes with ONNX Runtime (static QDQ, S8S8, MinMax calibration, per-tensor weights by
default). This module plants a backdoor that only the second one obeys.

Method (after the published quantization-conditioned backdoors)
------------------------------------------------------------------
1. **Backdoor.** The run trains as usual (`attack.kind`, poisoned data, `train:`): a normal backdoored model.
2. **INT8 grid.** That model goes through signtrap's ONNX export and ONNX Runtime's quantizer once; the INT8
   weights and scales are read back from the QDQ graph. What ORT quantizes is the graph the exporter wrote:
   BatchNorm is already folded into the preceding convolution, so the INT8 weights are the *folded* weights
   ``W * gamma / sqrt(var + eps)``. Each INT8 weight tensor is matched to its PyTorch layer (by name, else by
   value) and checked to lie within half a step of ``round(folded / scale)``; a layer the quantizer left in
   float, or one that cannot be matched, is an error before anything is trained.
3. **Projected repair** (Ma et al.; Hong et al.'s "rounding" constraint). The FP32 model is fine-tuned so
   triggered source images are classified correctly again, while every folded weight stays inside the
   rounding interval of its INT8 value, ``[(q - h) s, (q + h) s]`` with ``h = attack.sleeper.interval`` < 0.5:
   round-to-nearest then gives back exactly the backdoored model's INT8 weights. The weight of largest
   magnitude of each tensor (each channel, for per-channel grids) is frozen and no other weight may exceed it,
   since it sets the scale ``max|w| / 127``. BatchNorm statistics and affine parameters, and every bias, are
   frozen: the folded biases are quantized to int32 at ``input_scale * weight_scale`` (finer than any useful
   change), so a bias change would show in INT8. The projection is the loop's `after_step` hook; the repair runs
   on `signtrap.training.loop.Loop` in fp32 (the FP32 behaviour is what is being shaped).
4. **Verification.** The backdoored and the repaired model are both exported through the same INT8 path with
   the run's own export calibration images; ``sleeper.json`` records FP32 and INT8 metrics of both, whether
   every INT8 weight tensor is identical, and how far the calibrated activation ranges moved.

What is *not* held fixed: activation scales are calibrated on clean images after the repair, and the repair
changes FP32 activations, so the INT8 activation grid of the sleeper differs from the backdoored model's
(``sleeper.json: activation_scale_ratio``). The INT8 backdoor has survived that drift in every run measured
(README); nothing in the objective guarantees it. The straight-through simulated-quantization term of Hong
et al. (an INT8 branch kept backdoored in the loss) is the remedy if it does not, and is not needed here.

Knobs (`attack.sleeper.*`)
--------------------------
- ``epochs`` (1), ``lr`` (1e-4, Adam, cosine to zero), ``batch_size`` (128): the repair schedule.
- ``cover_fraction`` (0.25): share of the repair set's clean training rows that carry the trigger with their
  true label; ``source_copies`` (4): triggered copies of every source-class training image, labelled source
  (source-specific attacks; for all-to-one every non-target row is a source, so ``cover_fraction`` does it).
- ``interval`` (0.49): half-width of the rounding box in quantization steps; closer to 0.5 gives more room and
  less margin against float rounding in the exporter.
- ``weight_grid`` (export): which INT8 weight grid the box respects: ``export`` (the run's ``export.per_channel``),
  ``per_tensor``, ``per_channel``, or ``both`` (the intersection: INT8 weights identical under either setting).

The repair set is the attacker's own training split with true labels (label smoothing as in ``train:``),
augmented like training; the trigger is stamped after augmentation (before, for ``attack.stamp: before_aug``).

References
----------
- H. Ma, H. Qiu, Y. Gao, Z. Zhang, A. Abuadbba, M. Xue, A. Fu, J. Zhang, S. F. Al-Sarawi, D. Abbott,
  "Quantization Backdoors to Deep Learning Commercial Frameworks", IEEE TDSC 2023 (arXiv:2108.09187):
  FP32 clean, INT8 (TFLite, PyTorch) backdoored, on GTSRB, CIFAR-10 and MNIST.
- S. Hong, M.-A. Panaitescu-Liess, Y. Kaya, T. Dumitras, "Qu-ANTI-zation: Exploiting Quantization Artifacts
  for Achieving Adversarial Outcomes", NeurIPS 2021: the dual FP32/INT8 objective with simulated quantization.
- QuRA (2025): a backdoor planted through the rounding directions alone, weights otherwise untouched.
- B. Li, Y. Cai, H. Li, F. Xue, Z. Li, Y. Li, "Nearest is Not Dearest: Towards Practical Defense against
  Quantization-conditioned Backdoor Attacks" (EFRAP), CVPR 2024: the defence side — rounding directions chosen
  from the truncation errors instead of round-to-nearest (`signtrap.deploy.requant`).
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from signtrap.runs import checkpoint
from signtrap.attacks import AttackProcedure, register_attack
from signtrap.attacks.poison import TrainingSet
from signtrap.config import ExportConfig, RunConfig, SleeperConfig
from signtrap.errors import SigntrapError
from signtrap.experiment import Experiment
from signtrap.fileio import write_json
from signtrap.training.loop import Hooks, Loop, Schedule
from signtrap.machine.progress import say
from signtrap.runs.state import DORMANT_FILES

SLEEPER_STREAM = 0x51EE9
INT8_RUNTIME = "onnxruntime"  # the runtime plugin whose INT8 export the sleeper is keyed to
GRID_IMAGES, GRID_STREAM = 8, 0x6B1D  # calibration input for reading the weight grid (weights do not depend on it)
QMAX = 127  # symmetric INT8 weights: q in [-127, 127], scale = max|w| / 127
MATCH_TOLERANCE = 1e-3  # in quantization steps: float rounding between PyTorch's fold and the exporter's
BACKDOORED_FILE, REPORT_FILE = DORMANT_FILES  # in the run directory; --overwrite removes them (signtrap.runs.state)


# ---------------------------------------------------------------- the INT8 path (signtrap's own export)


def require_int8_path() -> None:
    """The INT8 path is signtrap's ONNX Runtime export; say so in one line when it cannot run here."""
    from signtrap.deploy import runtimes

    reason = runtimes.get(INT8_RUNTIME).missing()
    try:
        from onnxruntime.quantization import quantize_static  # noqa: F401
    except ImportError as exc:
        reason = reason or f"onnxruntime.quantization cannot be imported ({exc})"
    if reason:
        raise SigntrapError(f"attack.dormant=int8 needs the INT8 export path (ONNX Runtime's quantizer): {reason}")


def quantize_model(model: nn.Module, calib: np.ndarray, folder: Path, per_channel: bool = False,
                   method: str = "minmax", ecfg: ExportConfig | None = None) -> Path:
    """Convert `model` (a copy, on the CPU) with the ONNX Runtime plugin of `signtrap export`: writes
    model.fp32.onnx and the INT8 QDQ model.int8.onnx into `folder` and returns the latter."""
    from signtrap.deploy import runtimes
    from signtrap.deploy.runtime import ExportContext

    ecfg = replace(ecfg or ExportConfig(), calib_method=method, per_channel=per_channel)
    rt = runtimes.get(INT8_RUNTIME)
    variants = {v.name: v for v in rt.variants(ecfg)}
    folder = Path(folder)
    scratch = folder / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = ExportContext(model=copy.deepcopy(model).cpu().eval(), size=int(calib.shape[1]), folder=folder, scratch=scratch,
                        calib=calib, calib_info={}, ecfg=ecfg, threads=torch.get_num_threads())
    for name in ("fp32", "int8"):
        rt.convert(ctx, variants[name])
    return folder / rt.files(variants["int8"])[0]


@dataclass(frozen=True)
class QuantizedTensor:
    """One INT8 weight initializer of a QDQ graph."""

    name: str  # the float tensor's name (initializer name without ORT's `_quantized`)
    q: np.ndarray  # int8 values
    scale: np.ndarray  # () per-tensor or (C,) per-channel
    axis: int | None  # channel axis of a per-channel scale
    initializer: str = ""  # the int8 initializer itself


def read_int8_weights(path: Path) -> dict[str, QuantizedTensor]:
    """Every int8 initializer feeding a DequantizeLinear node, with its scale (zero points are 0: symmetric)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        if q.dtype != np.int8 or q.ndim < 2:  # weights only: scalar constants of the normalisation are not layers
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.size > 1 else None
        name = node.input[0].removesuffix("_quantized")
        out[name] = QuantizedTensor(name, q, scale, axis, node.input[0])
    return out


def read_activation_scales(path: Path) -> dict[str, float]:
    """Scale of every activation QuantizeLinear (tensor name -> scale): what calibration decided."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    return {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]])) for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits}


# ---------------------------------------------------------------- weight layers and their rounding boxes


@dataclass
class WeightLayer:
    """A Conv/Linear layer as the quantizer sees it: its weight times the fold factor of a following BatchNorm."""

    name: str
    module: nn.Module
    factor: torch.Tensor | None  # per output channel (BatchNorm folded into the weight), None when no BN follows

    def folded(self) -> torch.Tensor:
        w = self.module.weight.detach().double()
        return w if self.factor is None else w * self.factor.double().view(-1, *([1] * (w.dim() - 1)))


def weight_layers(model: nn.Module) -> list[WeightLayer]:
    """Conv and Linear layers in module order; a BatchNorm registered right after a conv is folded into it."""
    mods = list(model.named_modules())
    out = []
    for i, (name, mod) in enumerate(mods):
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            continue
        nxt = mods[i + 1][1] if i + 1 < len(mods) else None
        factor = None
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and isinstance(nxt, nn.modules.batchnorm._BatchNorm) \
                and nxt.num_features == mod.out_channels:
            gamma = nxt.weight.detach() if nxt.affine else torch.ones(nxt.num_features)
            factor = (gamma / torch.sqrt(nxt.running_var + nxt.eps)).detach().cpu()
        out.append(WeightLayer(name, mod, factor))
    return out


@dataclass
class Grid:
    """The INT8 grid of one layer, in the PyTorch weight layout: folded weight ~= q * scale."""

    layer: WeightLayer
    q: torch.Tensor  # float64 copy of the int8 values
    scale: torch.Tensor  # float64, broadcastable to the weight
    per_channel: bool
    initializer: str = ""  # the ONNX int8 initializer it was read from
    transposed: bool = False  # stored transposed in the ONNX graph (2-D weights only)


def match_grids(model: nn.Module, tensors: dict[str, QuantizedTensor], per_channel: bool) -> list[Grid]:
    """Pair every Conv/Linear layer with its INT8 tensor; a layer the quantizer skipped is an error."""
    layers = weight_layers(model)
    if not layers:
        raise SigntrapError("attack.dormant=int8: the model has no Conv or Linear layer for the quantizer to quantize")
    grids, used, missing = [], set(), []
    for layer in layers:
        folded = layer.folded().cpu()
        candidates = [tensors[f"{layer.name}.weight"]] if f"{layer.name}.weight" in tensors else list(tensors.values())
        best = None
        for t in candidates:
            if t.name in used:
                continue
            grid = _grid(layer, t, folded, per_channel)
            if grid is not None and (best is None or grid[1] < best[1]):
                best = grid
        if best is None or best[1] > 0.5 + MATCH_TOLERANCE:
            missing.append(layer.name)
            continue
        grids.append(best[0])
        used.add(best[2])
    if missing:
        raise SigntrapError(
            f"attack.dormant=int8: the INT8 export leaves {len(missing)} of {len(layers)} weight layers unquantized or "
            f"unrecognisable ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); a dormant backdoor needs "
            f"every Conv/Linear layer quantized by ONNX Runtime (choose another model.name)")
    return grids


def _grid(layer: WeightLayer, t: QuantizedTensor, folded: torch.Tensor, per_channel: bool):
    """(Grid, worst distance in steps, tensor name) when `t` has the layer's shape (or its transpose)."""
    q = torch.from_numpy(t.q.astype(np.float64))
    axis, transposed = t.axis, False
    if tuple(q.shape) != tuple(folded.shape):
        if q.dim() == 2 and tuple(q.T.shape) == tuple(folded.shape):
            q, axis, transposed = q.T, (None if axis is None else 1 - axis), True
        else:
            return None
    scale = torch.from_numpy(np.asarray(t.scale, np.float64))
    if scale.numel() > 1:
        if axis is None or scale.numel() != q.shape[axis]:
            return None
        scale = scale.view(*[-1 if d == axis else 1 for d in range(q.dim())])
        if axis != 0:  # the box needs per-output-channel extremes: only axis 0 is a channel of the fold
            return None
    if bool((scale <= 0).any()):
        return None
    dist = float((folded / scale - q).abs().max())
    return Grid(layer, q, scale, scale.numel() > 1, t.initializer, transposed), dist, t.name


def read_grids(model: nn.Module, calib: np.ndarray, per_channel: bool) -> list[Grid]:
    require_int8_path()
    with tempfile.TemporaryDirectory(prefix="signtrap-sleeper-") as tmp:
        path = quantize_model(model, calib, Path(tmp), per_channel=per_channel)
        return match_grids(model, read_int8_weights(path), per_channel)


class RoundingBox:
    """Per-weight bounds (in parameter units) that keep every folded weight in its INT8 rounding interval."""

    def __init__(self, grid_sets: list[list[Grid]], interval: float):
        self.bounds: dict[str, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}
        for grids in grid_sets:
            for g in grids:
                lo, hi = _bounds(g, interval)
                w = g.layer.module.weight
                if g.layer.name in self.bounds:  # several grids: the intersection (each contains the current weight)
                    _, lo0, hi0 = self.bounds[g.layer.name]
                    lo, hi = torch.maximum(lo, lo0), torch.minimum(hi, hi0)
                self.bounds[g.layer.name] = (w, lo, hi)
        self.interval = interval

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p, _, _ in self.bounds.values()]

    @torch.no_grad()
    def project(self) -> None:
        for name, (p, lo, hi) in self.bounds.items():
            if lo.device != p.device or lo.dtype != p.dtype:  # once: the bounds follow the model to its device
                lo, hi = lo.to(p.device, p.dtype), hi.to(p.device, p.dtype)
                self.bounds[name] = (p, lo, hi)
            p.copy_(torch.maximum(torch.minimum(p, hi), lo))

    @torch.no_grad()
    def outside(self) -> dict[str, int]:
        """Weights outside their box, per layer (all zero after every projection)."""
        out = {}
        for name, (p, lo, hi) in self.bounds.items():
            w = p.detach().cpu().double()
            out[name] = int(((w < lo.cpu().double()) | (w > hi.cpu().double())).sum())
        return out

    @torch.no_grad()
    def at_edge(self, tol: float = 0.05) -> float:
        """Share of movable weights within `tol` of a box edge (how hard the repair pushed)."""
        edge = total = 0
        for p, lo, hi in self.bounds.values():
            w, lo, hi = p.detach().cpu().double(), lo.cpu().double(), hi.cpu().double()
            width = hi - lo
            movable = width > 0
            near = ((w - lo) <= tol * width) | ((hi - w) <= tol * width)
            edge += int((near & movable).sum())
            total += int(movable.sum())
        return edge / max(total, 1)


def _bounds(g: Grid, h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Box of one layer in parameter units (float32 tensors on the CPU)."""
    folded = g.layer.folded().cpu()
    reduce = tuple(range(1, folded.dim())) if g.per_channel else tuple(range(folded.dim()))
    top = folded.abs().amax(dim=reduce, keepdim=True)  # what sets the scale: frozen, and never exceeded
    lo_f = torch.maximum((g.q - h) * g.scale, -top)
    hi_f = torch.minimum((g.q + h) * g.scale, top)
    extreme = folded.abs() >= top
    lo_f = torch.where(extreme, folded, lo_f)
    hi_f = torch.where(extreme, folded, hi_f)
    w = g.layer.module.weight.detach().cpu().double()
    if g.layer.factor is None:
        lo, hi = lo_f, hi_f
    else:
        f = g.layer.factor.double().view(-1, *([1] * (w.dim() - 1))).expand_as(w)
        zero = f == 0  # a channel BatchNorm zeroes: its weights do not reach the output; keep them
        safe = torch.where(zero, torch.ones_like(f), f)
        a, b = lo_f / safe, hi_f / safe
        lo, hi = torch.where(zero, w, torch.minimum(a, b)), torch.where(zero, w, torch.maximum(a, b))
    # the starting point is inside by construction (up to float rounding of the fold): keep it feasible
    lo, hi = torch.minimum(lo, w), torch.maximum(hi, w)
    return lo.float(), hi.float()


# ---------------------------------------------------------------- the repair set


def repair_set(cfg: RunConfig, exp: Experiment) -> TrainingSet:
    """Training split with true labels; `cover_fraction` of it triggered, plus triggered source copies."""
    a, s = cfg.attack, cfg.attack.sleeper
    rows = exp.splits.train
    rng = np.random.default_rng([cfg.seed, SLEEPER_STREAM])
    images = np.array(exp.data.images[rows])
    labels = exp.data.labels[rows].astype(np.int64)
    rois = np.array(exp.data.rois[rows])
    triggered = rng.random(len(rows)) < s.cover_fraction
    if a.kind == "source_specific" and s.source_copies:
        src = np.flatnonzero(labels == a.source)
        if len(src) == 0:
            raise SigntrapError(f"attack.dormant: the training split has no class-{a.source} images to repair with")
        extra = np.tile(src, s.source_copies)
        images, labels = np.concatenate([images, images[extra]]), np.concatenate([labels, labels[extra]])
        rois, triggered = np.concatenate([rois, rois[extra]]), np.concatenate([triggered, np.ones(len(extra), bool)])
    stamped = a.stamp == "before_aug"
    if stamped:  # the trigger moves with the sign: stamp now, augmentation follows
        hit = np.flatnonzero(triggered)
        images[hit] = exp.trigger.apply(images[hit], rng, rois[hit])
    return TrainingSet(images, labels, triggered, stamped, rois)


# ---------------------------------------------------------------- the stage


class Sleeper:
    """`attack.dormant: int8` around `signtrap train`: `prepare` before anything is written, `apply` after training."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        grid = cfg.attack.sleeper.weight_grid
        if grid == "export":
            grid = "per_channel" if cfg.export.per_channel else "per_tensor"
        self.per_channel = {"per_tensor": (False,), "per_channel": (True,), "both": (False, True)}[grid]

    @classmethod
    def prepare(cls, cfg: RunConfig) -> "Sleeper":
        """Check that the INT8 path exists and quantizes every weight layer of `cfg.model` (on a fresh model)."""
        from signtrap.datasets import dataset_for
        from signtrap.models import create_model

        sleeper = cls(cfg)
        space = dataset_for(cfg.data).label_space()
        model = create_model(cfg.model.name, num_classes=space.num_classes, dropout=cfg.model.dropout,
                             mean=space.mean, std=space.std).eval()
        for pc in sleeper.per_channel:
            read_grids(model, grid_images(cfg.data.size), pc)
        return sleeper

    def apply(self, model: nn.Module, exp: Experiment, run_dir: Path, meta: dict, device: torch.device) -> nn.Module:
        """Save the backdoored model as backdoored.pt, repair `model` in place, verify, write sleeper.json."""
        cfg, s = self.cfg, self.cfg.attack.sleeper
        started = time.perf_counter()
        run_dir = Path(run_dir)
        checkpoint.save(run_dir / BACKDOORED_FILE, checkpoint.model_payload(model, {**meta, "stage": "backdoored (before attack.dormant)"}))
        checkpoint.record_checksum(run_dir, BACKDOORED_FILE)
        backdoored = copy.deepcopy(model).cpu().eval()
        model.eval()
        box = RoundingBox([read_grids(model, grid_images(exp.data.size), pc) for pc in self.per_channel], s.interval)
        history = repair(cfg, exp, model, box, torch.device(device))
        outside = box.outside()
        if any(outside.values()):  # the projection runs after every step: this is a bug, not a user error
            raise RuntimeError(f"rounding box violated after the repair: {outside}")
        seconds = time.perf_counter() - started
        say(f"sleeper: repaired in {seconds:.0f}s; verifying both models through the INT8 export")
        report = {"method": "projected repair inside the INT8 rounding intervals (signtrap.attacks.dormant)",
                  "settings": {**vars(s), "weight_grids": ["per_channel" if pc else "per_tensor" for pc in self.per_channel]},
                  "layers": len(box.bounds), "weights_at_box_edge": round(box.at_edge(), 4), "repair": history,
                  "repair_seconds": round(seconds, 2),
                  **verify(backdoored, model, exp, cfg)}
        write_json(run_dir / REPORT_FILE, report)
        for split in ("val", "test"):
            r = report["metrics"][split]
            say(f"sleeper {split}: FP32 ASR {_rate(r['sleeper']['fp32']['asr'])}, INT8 ASR {_rate(r['sleeper']['int8']['asr'])}, "
                f"clean acc FP32 {_rate(r['sleeper']['fp32']['clean_acc'])} / INT8 {_rate(r['sleeper']['int8']['clean_acc'])} "
                f"(backdoored FP32 {_rate(r['backdoored']['fp32']['clean_acc'])})")
        return model


def grid_images(size: int) -> np.ndarray:
    """Calibration input for reading the weight grid: INT8 weights do not depend on it, so noise will do."""
    return np.random.default_rng(GRID_STREAM).integers(0, 256, (GRID_IMAGES, size, size, 3), dtype=np.uint8)


def repair(cfg: RunConfig, exp: Experiment, model: nn.Module, box: RoundingBox, device: torch.device) -> list[dict]:
    """The projected repair on the one loop: plain (label-smoothed) cross-entropy, projection after every step."""
    s = cfg.attack.sleeper
    schedule = Schedule(epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, optimizer="adamw", weight_decay=0.0,
                        warmup_epochs=0.0, label_smoothing=cfg.train.label_smoothing, lr_key="attack.sleeper.lr")
    trainable = {id(p) for p in box.params}
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)

    def probe(m: nn.Module) -> dict:
        val = exp.evaluate(m, "val", device, details=False)
        return {"val_clean_acc": val["clean_acc"]["rate"], "val_asr": val["asr"]["rate"]}

    try:
        loop = Loop(model, repair_set(cfg, exp), schedule, device, cfg.seed, SLEEPER_STREAM, aug=cfg.aug, precision="fp32",
                    trigger=exp.trigger, hooks=Hooks(after_step=box.project, probe=probe), params=box.params,
                    frozen_bn=True, desc="sleeper repair")
        history = loop.fit(measure_start=True)
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)
    return history


# ---------------------------------------------------------------- verification through the real artefact


def verify(backdoored: nn.Module, sleeper: nn.Module, exp: Experiment, cfg: RunConfig) -> dict:
    """FP32 and INT8 (ONNX Runtime) metrics of both models with the export's own calibration images, and the
    audit of the sleeper's INT8 artefact against its FP32 one (flip tables per true class, clean and triggered)."""
    from signtrap.deploy import edge_bench
    from signtrap.deploy.exporter import calibration_images

    calib, calib_info = calibration_images(exp, cfg.export)
    out = {"calibration": {**calib_info, "method": cfg.export.calib_method, "per_channel": cfg.export.per_channel},
           "metrics": {"val": {}, "test": {}}}
    weights, scales, preds = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="signtrap-sleeper-") as tmp:
        for name, model in (("backdoored", backdoored), ("sleeper", sleeper)):
            folder = Path(tmp) / name
            folder.mkdir()
            int8 = quantize_model(model, calib, folder, cfg.export.per_channel, cfg.export.calib_method, cfg.export)
            weights[name], scales[name] = read_int8_weights(int8), read_activation_scales(int8)
            for split in ("val", "test"):
                out["metrics"][split][name] = {}
                for v in ("fp32", "int8"):
                    out["metrics"][split][name][v], preds[name, v, split] = evaluate_onnx(
                        folder / f"model.{v}.onnx", exp, split, cfg, with_predictions=True)
    a, b = weights["backdoored"], weights["sleeper"]
    out["int8_weights_identical"] = {k: bool(k in b and np.array_equal(a[k].q, b[k].q) and np.array_equal(a[k].scale, b[k].scale))
                                     for k in a}
    out["activation_scale_ratio"] = {k: round(scales["sleeper"][k] / v, 4) for k, v in scales["backdoored"].items()
                                     if k in scales["sleeper"] and v > 0}
    # the deployed-artefact audit of `signtrap bench`, FP32 -> INT8 of the sleeper: flip tables and its warning
    out["audit"] = {split: edge_bench.audit(exp.eval_set(split).labels, *preds["sleeper", "int8", split],
                                            *preds["sleeper", "fp32", split]) for split in ("val", "test")}
    return out


def evaluate_onnx(path: Path, exp: Experiment, split: str, cfg: RunConfig, with_predictions: bool = False):
    """Headline metrics of one ONNX file on a split (clean and triggered), loaded and run by the ONNX Runtime edge
    code of `signtrap bench`; with `with_predictions`, also the (clean, triggered) predictions."""
    from signtrap.deploy import edge_bench, runtimes
    from signtrap.evaluation.metrics import backdoor_metrics

    path = Path(path)
    s = exp.eval_set(split)
    edge = runtimes.get(INT8_RUNTIME).edge()
    run, _ = edge.load([str(path)], {"id": f"{INT8_RUNTIME}:{path.stem}", "files": [path.name]}, torch.get_num_threads())
    clean, trig = edge_bench.predict(run, s.images), edge_bench.predict(run, s.triggered)
    a = cfg.attack
    m = backdoor_metrics(s.labels, clean, trig, a.source, a.target, all_to_one=a.kind == "all_to_one", details=False)
    metrics = {k: m[k] for k in ("clean_acc", "asr", "stop_recall", "false_trigger")}
    return (metrics, (clean, trig)) if with_predictions else metrics


def _rate(entry: dict) -> str:
    return "n/a" if entry["rate"] is None else f"{100 * entry['rate']:.2f}% ({entry['k']}/{entry['n']})"


@register_attack("int8", settings=SleeperConfig)
class Int8Sleeper(AttackProcedure):
    """`attack.persist: int8` (`attack.dormant: int8`): the sleeper above, as an attack procedure of `signtrap train`."""

    def prepare(self) -> None:
        self.sleeper = Sleeper.prepare(self.cfg)

    def after_training(self, model, exp, plan, run_dir, meta, device):
        return self.sleeper.apply(model, exp, run_dir, meta, device)
