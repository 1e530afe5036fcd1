"""The inner loops of three defences, each timed both ways on this machine: what the speed-ups of issue 24 rest on.

    .venv/bin/python benchmarks/defence_kernels.py [--run RUN] [--seconds S]

- Neural Cleanse's search step (a mini-batch of 32 masked images, forward and backward to the mask): fp32 against
  the run's training precision (bf16 autocast where the CPU has native bf16), which the search uses, and that
  against a copy with each BatchNorm folded into its convolution (torch.fx's conv-bn fusion; tried and not used: it
  changed the default model's Neural Cleanse verdict, README), all channels-last.
- STRIP's entropy (64 blends per input): 512-blend batches converted per chunk (before) against
  `signtrap.defences.strip.strip_entropy` (CPU chunks of 128, overlays converted once), with the largest entropy
  difference between the two.
- I-BAU's hypergradient step (batch 100, K = 5): channels-last with the zero first product (before) against NCHW
  without it (now), with the largest difference of the implicit vector v.

RUN: a trained run directory (its model.pt); default: a freshly initialised signnet (timings only). Prints figures,
asserts nothing; run it alone (two CPU jobs on two cores measure nothing).
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse

from signtrap.defences.strip import strip_entropy
from signtrap.experiment import to_tensor
from signtrap.machine.environment import autocast, autocast_dtype
from signtrap.models import create_model
from signtrap.runs.checkpoint import verified_load


def rate(fn, items: int, seconds: float) -> float:
    fn()  # warm-up
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        n += items
    return n / (time.perf_counter() - start)


def nc_step(model, x, amp):
    mask = torch.rand(1, 32, 32, requires_grad=True)
    pattern = torch.rand(3, 32, 32, requires_grad=True)

    def step():
        with autocast("cpu", amp):
            logits = model((1 - mask) * x + mask * pattern).float()
        loss = F.cross_entropy(logits, torch.full((len(x),), 7)) + 1e-3 * mask.sum()
        loss.backward()
    return step


@torch.no_grad()
def strip_before(model, images, overlays, n, alpha, rng, batch_size=512):
    per_chunk, out = max(1, batch_size // n), np.zeros(len(images))
    for start in range(0, len(images), per_chunk):
        x = to_tensor(images[start:start + per_chunk], "cpu")
        picks = rng.integers(0, len(overlays), (len(x), n))
        blended = (1 - alpha) * x.repeat_interleave(n, dim=0) + alpha * to_tensor(overlays[picks.reshape(-1)], "cpu")
        p = torch.softmax(model(blended).float(), dim=1)
        out[start:start + len(x)] = (-(p * torch.log(p.clamp_min(1e-12))).sum(1).view(len(x), n).mean(1)).numpy()
    return out


def ibau_step(net, x, y, xf, yf, delta0, skip: bool, K: int = 5):
    delta = delta0.clone().requires_grad_(True)
    outer = F.cross_entropy(net(x.index_add(0, torch.tensor([0]), delta)).float(), y)
    (g_delta,) = torch.autograd.grad(outer, delta, retain_graph=True)
    inner = -F.cross_entropy(net(xf + delta).float(), yf) + 1e-3 * delta.pow(2).sum()
    (g_inner,) = torch.autograd.grad(inner, delta, create_graph=True)
    phi = delta - 0.1 * g_inner
    v = g_delta if skip else torch.zeros_like(delta)
    for _ in range(K - 1 if skip else K):
        (jv,) = torch.autograd.grad(phi, delta, grad_outputs=v, retain_graph=True)
        v = jv + g_delta
    implicit = (phi * v.detach()).sum()
    net.zero_grad(set_to_none=True)
    (outer + implicit - implicit.detach()).backward()
    return v.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a trained run directory (default: a fresh signnet)")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per timing")
    args = ap.parse_args()
    if args.run:
        model, _ = verified_load(args.run, "model.pt")
    else:
        torch.manual_seed(0)
        model = create_model("signnet", 43)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model: {args.run or 'fresh signnet'}")

    x = to_tensor(images[:32], "cpu")
    amp = autocast_dtype("auto", torch.device("cpu"))
    laid_out = copy.deepcopy(model).to(memory_format=torch.channels_last)
    folded = fuse(copy.deepcopy(model).eval()).to(memory_format=torch.channels_last)
    fp32, now = rate(nc_step(laid_out, x, None), 32, args.seconds), rate(nc_step(laid_out, x, amp), 32, args.seconds)
    fold = rate(nc_step(folded, x, amp), 32, args.seconds)
    with torch.no_grad(), autocast("cpu", amp):
        gap = float((laid_out(x).float() - folded(x).float()).abs().max())
    print(f"neural-cleanse search step: fp32 {fp32:.0f} images/s, {'bf16 autocast' if amp else 'fp32 (no native bf16)'} "
          f"{now:.0f} images/s: x{now / fp32:.2f}; BatchNorm folded into the convolutions (tried, not used) "
          f"{fold:.0f} images/s: x{fold / now:.2f} more (largest logit difference {gap:.1e})")

    inputs, overlays = images[:64], rng.integers(0, 256, (1761, 32, 32, 3), dtype=np.uint8)
    blends = len(inputs) * 64
    before = rate(lambda: strip_before(model, inputs, overlays, 64, 0.5, np.random.default_rng(5)), blends, args.seconds)
    after = rate(lambda: strip_entropy(model, inputs, overlays, 64, 0.5, np.random.default_rng(5), "cpu"), blends, args.seconds)
    diff = np.abs(strip_before(model, inputs, overlays, 64, 0.5, np.random.default_rng(5))
                  - strip_entropy(model, inputs, overlays, 64, 0.5, np.random.default_rng(5), "cpu")).max()
    print(f"strip entropy: before {before:.0f} blends/s, now {after:.0f} blends/s: x{after / before:.2f} "
          f"(largest entropy difference {diff:.1e})")

    net_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    net = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    for p in list(net.parameters()) + list(net_cl.parameters()):
        p.requires_grad_(True)
    xb, xf = (to_tensor(images[s:s + 100], "cpu") for s in (0, 100))
    y, yf = (torch.from_numpy(rng.integers(0, 43, 100)) for _ in range(2))
    delta0 = torch.from_numpy(rng.normal(0, 0.1, (1, 3, 32, 32)).astype(np.float32))
    cl = rate(lambda: ibau_step(net_cl, xb, y, xf, yf, delta0, skip=False), 1, args.seconds)
    nchw = rate(lambda: ibau_step(net, xb.contiguous(), y, xf.contiguous(), yf, delta0, skip=True), 1, args.seconds)
    v_before = ibau_step(net_cl, xb, y, xf, yf, delta0, skip=False)
    v_now = ibau_step(net, xb.contiguous(), y, xf.contiguous(), yf, delta0, skip=True)
    print(f"i-bau hypergradient step: before {1 / cl:.2f} s, now {1 / nchw:.2f} s: x{nchw / cl:.2f} "
          f"(largest difference of v {float((v_before - v_now).abs().max()):.1e}, |v| {float(v_now.abs().max()):.1e})")


if __name__ == "__main__":
    main()
