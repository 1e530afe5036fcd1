"""Does `torch.compile` pay on this CPU? Issue 24 asks to measure it for the training recipe; signtrap does not use it.

    .venv/bin/python benchmarks/torch_compile.py [--model signnet] [--seconds 15] [--threads 2]

The default model's three inner loops, each in the run's precision (bf16 autocast where the CPU has native bf16,
else fp32) and channels-last, as signtrap runs them, timed eager and compiled (inductor, default mode) in one
process: a training step (batch 128, forward, backward, AdamW), Neural Cleanse's search step (batch 32, gradient to
the input only, weights frozen) and inference (batch 128, no grad). For each: images/s after warm-up, and the
compiled version's first call (the compilation itself, which a run pays once per shape and mode). Random weights and
images: timings only. Prints figures, asserts nothing; run it alone (two CPU jobs on two cores measure nothing).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from signtrap.machine.environment import autocast, autocast_dtype
from signtrap.models import create_model


def timed(fn, items: int, seconds: float) -> tuple[float, float]:
    """(seconds of the first call, images/s after three warm-up calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(3):
        fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        n += items
    return first, n / (time.perf_counter() - start)


def loops(model: torch.nn.Module, forward, amp, seconds: float) -> dict[str, tuple[float, float]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(128, 3, 32, 32, generator=gen).to(memory_format=torch.channels_last)
    y = torch.randint(0, 43, (128,), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step():
        model.train()
        with autocast("cpu", amp):
            loss = F.cross_entropy(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {"train step (batch 128)": timed(train_step, 128, seconds)}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    xb = x[:32]
    mask = torch.rand(1, 32, 32, generator=gen).requires_grad_(True)
    pattern = torch.rand(3, 32, 32, generator=gen).requires_grad_(True)

    def nc_step():
        with autocast("cpu", amp):
            logits = forward((1 - mask) * xb + mask * pattern).float()
        (F.cross_entropy(logits, torch.full((32,), 7)) + 1e-3 * mask.sum()).backward()

    out["Neural Cleanse step (batch 32)"] = timed(nc_step, 32, seconds)

    def infer():
        with torch.no_grad(), autocast("cpu", amp):
            forward(x)

    out["inference (batch 128)"] = timed(infer, 128, seconds)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="signnet")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    amp = autocast_dtype("auto", torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads, precision {amp or 'fp32'}, model {args.model}")
    results = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = create_model(args.model, 43).to(memory_format=torch.channels_last)
        forward = torch.compile(model) if mode == "compiled" else model
        results[mode] = loops(model, forward, amp, args.seconds)
    print("| loop | eager images/s | compiled images/s | compiled / eager | compilation (first call) |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, eager) in results["eager"].items():
        first, compiled = results["compiled"][name]
        print(f"| {name} | {eager:,.0f} | {compiled:,.0f} | {compiled / eager:.2f}x | {first:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
