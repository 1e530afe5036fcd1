"""An optimised sticker pattern: RP2-style masked optimisation under EOT against a clean surrogate.

Method (Eykholt et al., "Robust Physical-World Attacks on Deep Learning Visual Classification", CVPR 2018, RP2;
with Athalye et al.'s expectation over transformation): the attacker trains a clean surrogate classifier on
their own data, then optimises the colours of a k x k printed-cell sticker so that source-class signs carrying
it, rendered on the sign's face under the EOT distribution's geometry and light (position, size, rotation,
yaw/pitch, brightness, colour temperature, printer gamut), are pushed toward the target class:

    min_p  E_{t ~ EOT} [ CE(f(render(x, p, t)), target) ]  +  lambda * TV(p),    p = sigmoid(theta)

(TV: total variation between neighbouring cells, RP2's smoothness term for printability). The mask is the
sticker's square on the face (RP2 uses hand-drawn masks; here the EOT position is random, which makes the pattern
universal over places on the sign). The pattern is then the backdoor's trigger (`trigger.kind: physical,
design: png`): a trigger that already points the network toward the target needs fewer poisoned images to be
learnt robustly and generalises across views (the "optimised trigger" idea of Liu et al., Trojaning Attack,
NDSS 2018). Blur, noise and JPEG are left to the backdoor's training renderer (they are not differentiable here).

The differentiable renderer samples the pattern through each image's inverse homography with torch's
grid_sample (4x supersampled, then averaged), the same quad as signtrap.physical.render.sticker_quad.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from signtrap.physical.render import C, EOT, draw_params, sign_light, sticker_quad

SUPERSAMPLE = 4


def _grids(params: np.ndarray, boxes: np.ndarray, size: int, face: float) -> torch.Tensor:
    """(B, size*ss, size*ss, 2) grid_sample coordinates of the sticker's texture for every output sub-pixel."""
    ss = SUPERSAMPLE
    coords = (np.arange(size * ss) + 0.5) / ss - 0.5
    xx, yy = np.meshgrid(coords, coords)
    pts = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)], axis=0)
    uv_corners = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32)
    grids = []
    for row, box in zip(params, boxes):
        quad = sticker_quad(row, box, face).astype(np.float32)
        hom = cv2.getPerspectiveTransform(quad, uv_corners)
        uvw = hom @ pts
        uv = (uvw[:2] / uvw[2:]).T.reshape(size * ss, size * ss, 2)
        grids.append(uv * 2 - 1)
    return torch.from_numpy(np.stack(grids)).float()


def render_torch(images: torch.Tensor, pattern: torch.Tensor, params: np.ndarray, boxes: np.ndarray, lights: np.ndarray,
                 face: float) -> torch.Tensor:
    """images float (B, 3, S, S) in [0, 1]; pattern (3, k, k) in [0, 1]: the stickered images, differentiable in pattern."""
    b, _, s, _ = images.shape
    grid = _grids(params, boxes, s, face)
    tex = pattern[None].expand(b, -1, -1, -1)
    colour = F.grid_sample(tex, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    cover = F.grid_sample(torch.ones_like(tex[:, :1]), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    colour, cover = F.avg_pool2d(colour, SUPERSAMPLE), F.avg_pool2d(cover, SUPERSAMPLE)
    colour = colour / cover.clamp_min(1e-6)
    g = torch.from_numpy(params[:, C["gamut"]]).float().view(b, 1, 1, 1)
    lum = (colour * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    colour = lum + g * (colour - lum)
    black, white = 0.03 + 0.25 * (1 - g), 1.0 - 0.2 * (1 - g)
    colour = black + (white - black) * colour
    t = torch.from_numpy(params[:, C["temperature"]]).float().view(b, 1, 1, 1)
    gains = torch.cat([1 + t, torch.ones_like(t), 1 - t], dim=1)
    light = torch.from_numpy(lights * params[:, C["brightness"]]).float().view(b, 1, 1, 1)
    colour = (colour * light * gains).clamp(0, 1)
    return images * (1 - cover) + colour * cover


def optimise_pattern(model: torch.nn.Module, images: np.ndarray, boxes: np.ndarray, target: int, cells: int = 4,
                     steps: int = 300, batch: int = 32, lr: float = 0.1, tv: float = 0.05, eot: EOT | None = None,
                     seed: int = 0, losses: list | None = None) -> np.ndarray:
    """A (cells, cells, 3) uint8 pattern pushing `model` toward `target` on `images` (uint8 NHWC source signs);
    `losses` (optional) receives the loss of every step."""
    eot = eot or EOT()
    rng = np.random.default_rng([seed, 0x0971])
    torch.manual_seed(seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    theta = (torch.randn(3, cells, cells) * 0.5).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    lights = np.array([sign_light(im, bx) for im, bx in zip(images, boxes)])
    x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    y = torch.full((batch,), int(target), dtype=torch.long)
    for _ in range(steps):
        idx = rng.integers(0, len(images), batch)
        params = draw_params(batch, rng, eot)
        pattern = torch.sigmoid(theta)
        x = render_torch(x_all[idx], pattern, params, boxes[idx], lights[idx], eot.face)
        smooth = (pattern[:, 1:] - pattern[:, :-1]).abs().mean() + (pattern[:, :, 1:] - pattern[:, :, :-1]).abs().mean()
        loss = F.cross_entropy(model(x), y) + tv * smooth
        opt.zero_grad()
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(loss.item())
    return np.clip(np.rint(torch.sigmoid(theta).detach().permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)
