"""What a run was made with: package versions, machine, device."""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import sys
from typing import Iterator

import torch

from signtrap.errors import SigntrapError
from signtrap.machine import cores

PACKAGES = ("signtrap", "torch", "torchvision", "timm", "albumentations", "numpy", "opencv-python-headless",
            "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    held = cores.claimed()
    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": cores.allowance(),
            "torch_threads": torch.get_num_threads(), "cores_claimed": None if held is None else list(held.cores)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SigntrapError(f"device '{name}' requested but CUDA is not available here (use device=auto or cpu)")
    return torch.device(name)


@contextlib.contextmanager
def cpu_threads(threads: int, *, key: str = "train.threads", stored: bool = False, wait: bool = True) -> Iterator[int]:
    """Claim CPU cores from the machine's budget for the block and set torch's CPU threads to them; yields the
    thread count (restored afterwards). See signtrap.machine.cores for the policy.

    `threads`: 0 the cores this process may use (the free ones of them); N exactly N (waiting for N free cores).
    Above this process's allowance it is refused with one line, or capped with a warning when the value comes
    from an existing run's config (`stored`); negative values are refused. `wait=False`: never wait (light work).

    Every command that computes (train, defend, eval, export, run, report, sweep runs) wraps its work in
    this with the run's `train.threads`, so the same run gives the same numbers whichever command, or
    which resumed pipeline, computes them."""
    with cores.claim(threads, key=key, stored=stored, wait=wait) as held:
        before = torch.get_num_threads()
        if held.threads != before:
            torch.set_num_threads(held.threads)
        try:
            yield held.threads
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: there a signnet training step runs about 1.5x faster in bf16; emulated bf16 would be slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on `device`, or None for plain fp32. Evaluation (every metric) runs in fp32;
    a defence's own searches and predictions in this dtype."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def autocast(device_type: str, amp: torch.dtype | None):
    """Autocast to `amp` on `device_type` (an `autocast_dtype` answer); None: a no-op context, plain fp32."""
    return torch.autocast(device_type, dtype=amp or torch.bfloat16, enabled=amp is not None)


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """How a run's training precision is printed and recorded in provenance.json."""
    return "fp32" if amp_dtype is None else "bf16 autocast"
