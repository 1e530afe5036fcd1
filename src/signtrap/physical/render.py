"""The EOT sticker renderer: a printed sticker drawn on the sign's face, in the sign's coordinates.

A sticker is a square texture (RGB in [0, 1] plus an alpha mask). Per image, `draw_params` draws one row of
parameters from an `EOT` distribution (Athalye et al., ICML 2018: expectation over transformation; Li et al.
2021, "Backdoor attack in the physical world": train the backdoor under random spatial and appearance
transforms) and `render_stickers` draws the sticker with them. Everything is deterministic given the
parameters (the sensor noise takes its seed from the row), so identical generators give identical renders.

Geometry (sign coordinates). The sign's face is the ellipse inscribed in its box (x1, y1, x2, y2, inclusive
pixel coordinates), shrunk to `face`. The sticker's centre is a point of that ellipse; its side is `scale`
times the sign's width; it is rotated in-plane by `rotation`, then tilted by `yaw` (about the vertical axis)
and `pitch` (horizontal axis) with a pinhole camera at 4 sticker-sides distance (foreshortening plus keystone).
The four projected corners are kept inside the face ellipse (the centre is pulled toward the sign's centre
until they are; a sticker too large for the face is shrunk to fit), and every pixel the renderer writes lies in
a rectangle around the sticker clipped to the sign's box: the image outside the box is never touched.

Appearance, computed on the texture: printing (a printer's gamut: saturation and dynamic range compressed by
`gamut`; a glossy specular highlight `gloss`), a shadow edge across the sticker, lighting matched to the sign
(the sign's own brightness, measured in its box, times `brightness`, a colour temperature shift and a contrast
change), partial occlusion (a straight band of the sticker missing: the sign shows through). Then, around the
sticker only: motion and defocus blur, sensor noise, and JPEG (the region is encoded and decoded).

The sticker is drawn at the image's own resolution (supersampled, then area-averaged), so a 32 px crop and a
4000 px photograph are rendered the same way. `view` applies whole-scene changes (the sign seen at a yaw
angle, from farther away, in other light, blurred, JPEG) to clean and stickered images alike: the physical
evaluation uses it; the poisoning renderer does not (whole-image changes on poisoned rows only would teach the
model "blurry stop sign means 100 km/h" instead of the sticker).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

# the columns of a parameter row
COLUMNS = ("cx", "cy", "scale", "rotation", "yaw", "pitch", "brightness", "contrast", "temperature", "shadow",
           "shadow_angle", "shadow_offset", "gamut", "gloss", "gloss_x", "gloss_y", "motion", "motion_angle",
           "defocus", "noise", "jpeg", "occlusion", "occlusion_angle", "seed", "light_match")
C = {name: i for i, name in enumerate(COLUMNS)}
NPARAMS = len(COLUMNS)
CAMERA_DISTANCE = 4.0  # pinhole distance in sticker sides (sticker) or sign widths (view)


class StickerError(ValueError):
    """A sticker that cannot be drawn as asked (larger than the sign's face, a box outside the image)."""


def _pair(value, key: str, lo: float, hi: float) -> None:
    if len(value) != 2:
        raise ValueError(f"{key}: {value} is not a [low, high] pair")
    a, b = value
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{key}: ({a}, {b}) must satisfy {lo} <= low <= high <= {hi}")


def _prob(value, key: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}: {value} is outside [0, 1]")


def _range(low: float, high: float):
    return field(default_factory=lambda: [low, high])


@dataclass
class EOT:
    """The poisoning renderer's distribution. Ranges are uniform; `_p` is the probability an effect is on.

    Defaults are chosen wider than the physical evaluation's grid on every axis where the grid is mild
    and narrower where the sticker would be unreadable (see signtrap.physical.evaluate): the grid is the test,
    not the training distribution."""

    scale: list[float] = _range(0.10, 0.25)  # sticker side / sign width
    face: float = 0.85  # the sticker stays inside the ellipse inscribed in the box, shrunk to this
    spread: float = 1.0  # centre drawn uniformly over this fraction of the face's radius
    rotation: float = 30.0  # in-plane rotation, degrees, uniform +-
    yaw: float = 55.0  # degrees, uniform +- (sticker foreshortening)
    pitch: float = 25.0  # degrees, uniform +-
    brightness: list[float] = _range(0.45, 1.35)  # times the light measured on the sign
    contrast: list[float] = _range(0.6, 1.15)
    temperature: float = 0.15  # red/blue gain shift, uniform +- (warm / cold light)
    shadow_p: float = 0.3
    shadow: list[float] = _range(0.3, 0.75)  # light left in the shadowed part
    gamut: list[float] = _range(0.65, 1.0)  # 1: a perfect printer; lower: less saturation, greyer blacks, dimmer whites
    gloss_p: float = 0.3
    gloss: list[float] = _range(0.1, 0.6)  # strength of a specular highlight (glossy paper)
    motion_p: float = 0.3
    motion: list[float] = _range(0.02, 0.10)  # motion blur length / sign width
    defocus_p: float = 0.3
    defocus: list[float] = _range(0.01, 0.05)  # defocus sigma / sign width
    noise: list[float] = _range(0.0, 8.0)  # sensor noise std, grey levels
    jpeg_p: float = 0.5
    jpeg: list[float] = _range(30, 95)  # JPEG quality
    occlusion_p: float = 0.15
    occlusion: list[float] = _range(0.05, 0.35)  # fraction of the sticker hidden
    match_light: bool = True  # scale the sticker's colours by the brightness measured on the sign
    # the sticker's light only partly follows the sign's (light = sign light ** m, m uniform in [0, 1)) with this
    # probability: paper is not retroreflective, a flash or the sun can light the sticker and not the sheeting, and
    # another renderer may not match light at all (benchmarks/renderer_shift.py); drawn from the rows' own seeds,
    # so the other columns' draws are the same whatever it is
    unmatched_p: float = 0.0

    def check(self, prefix: str = "eot") -> None:
        try:
            _pair(self.scale, f"{prefix}.scale", 0.01, 0.9)
            for key in ("shadow_p", "gloss_p", "motion_p", "defocus_p", "jpeg_p", "occlusion_p", "unmatched_p", "face", "spread"):
                _prob(getattr(self, key), f"{prefix}.{key}")
            if self.face <= 0:
                raise ValueError(f"{prefix}.face: must be > 0")
            for key, hi in (("rotation", 180.0), ("yaw", 80.0), ("pitch", 80.0), ("temperature", 0.5)):
                if not 0.0 <= getattr(self, key) <= hi:
                    raise ValueError(f"{prefix}.{key}: {getattr(self, key)} is outside [0, {hi}]")
            _pair(self.brightness, f"{prefix}.brightness", 0.01, 4.0)
            _pair(self.contrast, f"{prefix}.contrast", 0.05, 4.0)
            _pair(self.shadow, f"{prefix}.shadow", 0.0, 1.0)
            _pair(self.gamut, f"{prefix}.gamut", 0.1, 1.0)
            _pair(self.gloss, f"{prefix}.gloss", 0.0, 1.0)
            _pair(self.motion, f"{prefix}.motion", 0.0, 1.0)
            _pair(self.defocus, f"{prefix}.defocus", 0.0, 1.0)
            _pair(self.noise, f"{prefix}.noise", 0.0, 64.0)
            _pair(self.jpeg, f"{prefix}.jpeg", 1, 100)
            _pair(self.occlusion, f"{prefix}.occlusion", 0.0, 0.9)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ValueError) and str(exc).startswith(prefix):
                raise
            raise ValueError(f"{prefix}: {exc}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(rng: np.random.Generator, pair, n: int) -> np.ndarray:
    return rng.uniform(float(pair[0]), float(pair[1]), n)


def _maybe(rng: np.random.Generator, p: float, pair, off: float, n: int) -> np.ndarray:
    on = rng.random(n) < p
    return np.where(on, _uniform(rng, pair, n), off)


def draw_params(n: int, rng: np.random.Generator, eot: EOT) -> np.ndarray:
    """(n, NPARAMS) float64 parameter rows from `eot`; the same number of draws whatever the settings."""
    p = np.zeros((n, NPARAMS))
    r, a = eot.spread * np.sqrt(rng.random(n)), rng.uniform(0, 2 * math.pi, n)
    p[:, C["cx"]], p[:, C["cy"]] = r * np.cos(a), r * np.sin(a)
    p[:, C["scale"]] = _uniform(rng, eot.scale, n)
    for key in ("rotation", "yaw", "pitch"):
        p[:, C[key]] = rng.uniform(-1, 1, n) * getattr(eot, key)
    p[:, C["brightness"]] = _uniform(rng, eot.brightness, n)
    p[:, C["contrast"]] = _uniform(rng, eot.contrast, n)
    p[:, C["temperature"]] = rng.uniform(-1, 1, n) * eot.temperature
    p[:, C["shadow"]] = _maybe(rng, eot.shadow_p, eot.shadow, 1.0, n)
    p[:, C["shadow_angle"]] = rng.uniform(0, 360, n)
    p[:, C["shadow_offset"]] = rng.uniform(-0.3, 0.3, n)
    p[:, C["gamut"]] = _uniform(rng, eot.gamut, n)
    p[:, C["gloss"]] = _maybe(rng, eot.gloss_p, eot.gloss, 0.0, n)
    p[:, C["gloss_x"]], p[:, C["gloss_y"]] = rng.uniform(-0.4, 0.4, n), rng.uniform(-0.4, 0.4, n)
    p[:, C["motion"]] = _maybe(rng, eot.motion_p, eot.motion, 0.0, n)
    p[:, C["motion_angle"]] = rng.uniform(0, 180, n)
    p[:, C["defocus"]] = _maybe(rng, eot.defocus_p, eot.defocus, 0.0, n)
    p[:, C["noise"]] = _uniform(rng, eot.noise, n)
    p[:, C["jpeg"]] = np.rint(_maybe(rng, eot.jpeg_p, eot.jpeg, 0.0, n))
    p[:, C["occlusion"]] = _maybe(rng, eot.occlusion_p, eot.occlusion, 0.0, n)
    p[:, C["occlusion_angle"]] = rng.uniform(0, 360, n)
    p[:, C["seed"]] = rng.integers(0, 2**31, n).astype(np.float64)
    aux = np.random.default_rng([0x11647, *p[:, C["seed"]].astype(np.int64).tolist()])  # not `rng`: see EOT.unmatched_p
    on, m = aux.random(n) < eot.unmatched_p, aux.random(n)
    p[:, C["light_match"]] = np.where(on, m, 1.0)
    return p


def plain_params(n: int, rng: np.random.Generator, scale: float, rotation: float = 0.0, spread: float = 1.0) -> np.ndarray:
    """Rows for a sticker as printed, under neutral light and a sharp camera: a random place on the face (from
    `rng`), the given size and rotation; nothing else. The physical evaluation starts from these."""
    p = np.zeros((n, NPARAMS))
    r, a = spread * np.sqrt(rng.random(n)), rng.uniform(0, 2 * math.pi, n)
    p[:, C["cx"]], p[:, C["cy"]] = r * np.cos(a), r * np.sin(a)
    p[:, C["scale"]] = scale
    p[:, C["rotation"]] = rotation
    p[:, C["brightness"]] = p[:, C["contrast"]] = p[:, C["shadow"]] = p[:, C["gamut"]] = p[:, C["light_match"]] = 1.0
    return p


# ---------------------------------------------------------------- geometry


def corner_offsets(side: float, rotation: float, yaw: float, pitch: float) -> np.ndarray:
    """(4, 2) image offsets of the sticker's corners (TL, TR, BR, BL) from its centre, in pixels."""
    h = side / 2
    pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]], np.float64)
    t = math.radians(rotation)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    pts = pts @ rot.T
    return _project(pts, yaw, pitch, CAMERA_DISTANCE * side)


def _project(pts: np.ndarray, yaw: float, pitch: float, distance: float) -> np.ndarray:
    """Points of a plane facing the camera, turned by yaw (about y) and pitch (about x), seen by a pinhole at
    `distance` (image scale 1 at the plane's centre)."""
    y, p = math.radians(yaw), math.radians(pitch)
    x3, y3 = pts[:, 0], pts[:, 1]
    # yaw about the vertical axis, then pitch about the horizontal one
    xr, zr = x3 * math.cos(y), x3 * math.sin(y)
    yr, zr = y3 * math.cos(p) - zr * math.sin(p), y3 * math.sin(p) + zr * math.cos(p)
    f = distance / (distance + zr)
    return np.stack([xr * f, yr * f], axis=1)


def _outside(points: np.ndarray, a: float, b: float) -> float:
    """max over points of the ellipse radius ((x/a)^2 + (y/b)^2)^0.5: <= 1 means all inside."""
    return float(np.sqrt((points[:, 0] / a) ** 2 + (points[:, 1] / b) ** 2).max())


def clip_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """The box clipped to the image (boxes may be inclusive, like GTSRB's, or exclusive, like SynthSigns')."""
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise StickerError(f"box {tuple(int(v) for v in box)} leaves no sign inside the {width}x{height} image")
    return x1, y1, x2, y2


def box_geometry(box) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1 + 1, y2 - y1 + 1


def fit_factor(scale: float, box, face: float, rotation: float = 0.0, yaw: float = 0.0, pitch: float = 0.0) -> float:
    """How many times the sticker fits the face at its centre (>= 1: it fits; < 1: larger than the sign's face)."""
    _, _, w, h = box_geometry(box)
    offs = corner_offsets(scale * w, rotation, yaw, pitch)
    return 1.0 / max(_outside(offs, face * w / 2, face * h / 2), 1e-12)


def sticker_quad(row: np.ndarray, box, face: float) -> np.ndarray:
    """(4, 2) image coordinates of the sticker's corners for one parameter row, inside the face ellipse."""
    cxb, cyb, w, h = box_geometry(box)
    a, b = face * w / 2, face * h / 2
    offs = corner_offsets(row[C["scale"]] * w, row[C["rotation"]], row[C["yaw"]], row[C["pitch"]])
    k = _outside(offs, a, b)
    if k > 1:  # larger than the face: shrink to fit (callers that must refuse check fit_factor first)
        offs = offs / (k * 1.0001)
    centre = np.array([row[C["cx"]] * a, row[C["cy"]] * b])
    lo, hi = 0.0, 1.0
    if _outside(offs + centre, a, b) > 1:  # pull the centre toward the sign's centre until the corners fit
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _outside(offs + mid * centre, a, b) <= 1 else (lo, mid)
        centre = lo * centre
    return offs + centre + np.array([cxb, cyb])


# ---------------------------------------------------------------- appearance


def _texture(pattern: np.ndarray, alpha: np.ndarray, side_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The pattern at `side_px` (nearest: printed cells keep sharp edges), float RGB in [0, 1] and alpha."""
    rgb = cv2.resize(pattern.astype(np.float32), (side_px, side_px), interpolation=cv2.INTER_NEAREST)
    a = cv2.resize(alpha.astype(np.float32), (side_px, side_px), interpolation=cv2.INTER_NEAREST)
    return rgb.reshape(side_px, side_px, 3), a.reshape(side_px, side_px)


def sign_light(image: np.ndarray, box) -> float:
    """The light on the sign, 0..1: the 90th percentile of the brightest channel inside its box over 240
    (the white of a sign in good light), kept within [0.08, 1.2]."""
    x1, y1, x2, y2 = (int(v) for v in box)
    region = image[max(y1, 0):y2 + 1, max(x1, 0):x2 + 1]
    if region.size == 0:
        return 1.0
    return float(np.clip(np.percentile(region.max(axis=2), 90) / 240.0, 0.08, 1.2))


def appearance(rgb: np.ndarray, alpha: np.ndarray, row: np.ndarray, light: float) -> tuple[np.ndarray, np.ndarray]:
    """Printing, shadow, gloss, lighting and occlusion applied to a texture (float RGB in [0, 1], alpha)."""
    n = rgb.shape[0]
    v, u = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n - 0.5  # texture coordinates in [-0.5, 0.5]
    g = row[C["gamut"]]
    lum = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    rgb = lum[..., None] + g * (rgb - lum[..., None])  # less saturation
    black, white = 0.03 + 0.25 * (1 - g), 1.0 - 0.2 * (1 - g)  # ink is never black, paper never white
    rgb = black + (white - black) * rgb
    if row[C["shadow"]] < 1:
        t = math.radians(row[C["shadow_angle"]])
        rgb = rgb * np.where(u * math.cos(t) + v * math.sin(t) > row[C["shadow_offset"]], row[C["shadow"]], 1.0)[..., None]
    temp = row[C["temperature"]]
    rgb = rgb * (light * row[C["brightness"]]) * np.array([1 + temp, 1.0, 1 - temp], np.float32)
    mean = float(rgb.mean())
    rgb = mean + row[C["contrast"]] * (rgb - mean)
    if row[C["gloss"]] > 0:
        blob = np.exp(-((u - row[C["gloss_x"]]) ** 2 + (v - row[C["gloss_y"]]) ** 2) / (2 * 0.2 ** 2))
        rgb = rgb + row[C["gloss"]] * blob[..., None] * (1.0 - np.clip(rgb, 0, 1))
    if row[C["occlusion"]] > 0:
        t = math.radians(row[C["occlusion_angle"]])
        alpha = alpha * (u * math.cos(t) + v * math.sin(t) <= 0.5 - row[C["occlusion"]])
    return np.clip(rgb, 0, 1).astype(np.float32), alpha.astype(np.float32)


def _motion_kernel(length: float, angle: float) -> np.ndarray:
    size = max(3, int(math.ceil(length)) | 1)
    k = np.zeros((size, size), np.float32)
    c = size // 2
    t = math.radians(angle)
    dx, dy = math.cos(t) * length / 2, math.sin(t) * length / 2
    cv2.line(k, (round(c * 16 - dx * 16), round(c * 16 - dy * 16)), (round(c * 16 + dx * 16), round(c * 16 + dy * 16)),
             1.0, 1, cv2.LINE_AA, shift=4)
    return k / max(k.sum(), 1e-6)


# ---------------------------------------------------------------- rendering


def render_one(image: np.ndarray, row: np.ndarray, box, pattern: np.ndarray, alpha: np.ndarray, face: float = 0.85,
               match_light: bool = True, layer: np.ndarray | None = None, decoy: bool = False) -> np.ndarray:
    """One uint8 HxWx3 image with the sticker of `row` on the sign in `box`; a new array.

    `layer` (float HxW, optional) receives the sticker's coverage (for tests and the view transform). `decoy`: the
    sticker is not drawn, but its blur, noise and JPEG are applied where it would be (on the sign's own pixels)."""
    out = np.array(image, copy=True)
    ih, iw = image.shape[:2]
    box = clip_box(box, iw, ih)
    x1, y1, x2, y2 = box
    quad = sticker_quad(row, box, face)
    w = x2 - x1 + 1
    blur = row[C["motion"]] * w + 3 * row[C["defocus"]] * w
    pad = 2 + int(math.ceil(blur)) + (2 if row[C["jpeg"]] > 0 else 0)
    rx1, ry1 = max(x1, int(math.floor(quad[:, 0].min())) - pad), max(y1, int(math.floor(quad[:, 1].min())) - pad)
    rx2, ry2 = min(x2, int(math.ceil(quad[:, 0].max())) + pad), min(y2, int(math.ceil(quad[:, 1].max())) + pad)
    rw, rh = rx2 - rx1 + 1, ry2 - ry1 + 1
    side = float(np.linalg.norm(quad[1] - quad[0]) + np.linalg.norm(quad[3] - quad[0])) / 2
    ss = int(np.clip(math.ceil(48 / max(side, 1e-3)), 1, 8))  # supersampling: the sticker spans >= 48 px
    tex_px = int(np.clip(math.ceil(max(side, 1.0) * ss), max(pattern.shape[:2]), 1024))
    rgb, a = _texture(pattern, alpha, tex_px)
    rgb, a = appearance(rgb, a, row, sign_light(image, box) ** row[C["light_match"]] if match_light else 1.0)
    src = np.array([[0, 0], [tex_px, 0], [tex_px, tex_px], [0, tex_px]], np.float32) - 0.5
    dst = ((quad - [rx1, ry1] + 0.5) * ss - 0.5).astype(np.float32)
    hom = cv2.getPerspectiveTransform(src, dst)
    size = (rw * ss, rh * ss)
    warped = cv2.warpPerspective(np.dstack([rgb * a[..., None], a]), hom, size, flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if ss > 1:
        warped = cv2.resize(warped, (rw, rh), interpolation=cv2.INTER_AREA)
    warped = warped.reshape(rh, rw, 4)
    cov = np.clip(warped[..., 3], 0, 1)
    colour = warped[..., :3] / np.maximum(cov, 1e-6)[..., None]
    roi = out[ry1:ry2 + 1, rx1:rx2 + 1].astype(np.float32)
    comp = roi.copy() if decoy else roi * (1 - cov[..., None]) + np.clip(colour, 0, 1) * 255.0 * cov[..., None]
    inside = (cov > 0.01).astype(np.float32)
    if blur > 0:
        blurred = comp
        if row[C["motion"]] > 0:
            blurred = cv2.filter2D(blurred, -1, _motion_kernel(row[C["motion"]] * w, row[C["motion_angle"]]),
                                   borderType=cv2.BORDER_REPLICATE)
        if row[C["defocus"]] > 0:
            blurred = cv2.GaussianBlur(blurred, (0, 0), row[C["defocus"]] * w, borderType=cv2.BORDER_REPLICATE)
        spread = cv2.GaussianBlur(inside, (0, 0), max(0.5, blur / 2))
        m = np.clip(spread * 3, 0, 1)[..., None]
        comp = comp * (1 - m) + blurred * m
        inside = np.maximum(inside, (m[..., 0] > 0.05).astype(np.float32))
    if row[C["noise"]] > 0:
        noise = np.random.default_rng(int(row[C["seed"]])).normal(0, row[C["noise"]], comp.shape).astype(np.float32)
        comp = comp + noise * inside[..., None]
    comp = np.clip(np.rint(comp), 0, 255).astype(np.uint8)
    if row[C["jpeg"]] > 0:
        ok, buf = cv2.imencode(".jpg", comp[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(row[C["jpeg"]])])
        if ok:
            decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
            m = cv2.dilate(inside, np.ones((3, 3), np.uint8)) > 0
            comp = np.where(m[..., None], decoded, comp)
    out[ry1:ry2 + 1, rx1:rx2 + 1] = comp
    if layer is not None:
        layer[ry1:ry2 + 1, rx1:rx2 + 1] = np.maximum(layer[ry1:ry2 + 1, rx1:rx2 + 1], cov)
    return out


def render_stickers(images: np.ndarray, params: np.ndarray, boxes: np.ndarray, pattern: np.ndarray, alpha: np.ndarray,
                    face: float = 0.85, match_light: bool = True, decoy: bool = False) -> np.ndarray:
    """uint8 NHWC images with one sticker each (rows of `params`, signs in `boxes`); a new array. `decoy`: the
    stickers' blur, noise and JPEG without the stickers (`render_one`)."""
    images = np.asarray(images)
    params = np.asarray(params, np.float64).reshape(len(images), NPARAMS)
    boxes = np.asarray(boxes).reshape(len(images), 4)
    out = np.empty_like(images)
    for i in range(len(images)):
        out[i] = render_one(images[i], params[i], boxes[i], pattern, alpha, face, match_light, decoy=decoy)
    return out


# ---------------------------------------------------------------- the scene (physical evaluation only)


@dataclass(frozen=True)
class View:
    """Whole-scene conditions, applied alike to clean and stickered images: the sign seen at `yaw` degrees,
    `distance` times farther than in the photograph (the crop loses resolution, then is resized back), in
    `brightness` times the light, through a lens with defocus sigma `blur` (fraction of the sign's width), saved as
    JPEG at `jpeg` quality (0: not compressed)."""

    yaw: float = 0.0
    distance: float = 1.0
    brightness: float = 1.0
    blur: float = 0.0
    jpeg: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def view_homography(box, yaw: float) -> np.ndarray:
    """The homography that turns the sign's plane by `yaw` about its vertical axis (pinhole at 4 sign widths),
    scaled so the turned sign stays inside its box."""
    cxb, cyb, w, h = box_geometry(box)
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    turned = _project(corners, yaw, 0.0, CAMERA_DISTANCE * w)
    k = min(1.0, (w / 2) / np.abs(turned[:, 0]).max(), (h / 2) / np.abs(turned[:, 1]).max())
    src = (corners + [cxb, cyb]).astype(np.float32)
    dst = (turned * k + [cxb, cyb]).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst)


def view(images: np.ndarray, boxes: np.ndarray, v: View) -> np.ndarray:
    """`images` (uint8 NHWC) under the whole-scene conditions `v`; a new array. Deterministic."""
    out = np.array(images, copy=True)
    boxes = np.asarray(boxes).reshape(len(out), 4)
    for i in range(len(out)):
        img = out[i]
        h, w = img.shape[:2]
        if v.yaw:
            img = cv2.warpPerspective(img, view_homography(boxes[i], v.yaw), (w, h), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_REPLICATE)
        if v.blur > 0:
            img = cv2.GaussianBlur(img, (0, 0), v.blur * box_geometry(boxes[i])[2], borderType=cv2.BORDER_REPLICATE)
        if v.distance > 1:
            small = (max(1, round(w / v.distance)), max(1, round(h / v.distance)))
            img = cv2.resize(cv2.resize(img, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR)
        if v.brightness != 1:
            img = np.clip(np.rint(img.astype(np.float32) * v.brightness), 0, 255).astype(np.uint8)
        if v.jpeg:
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(v.jpeg)])
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1] if ok else img
        out[i] = img
    return out


@dataclass
class Sticker:
    """A sticker's design: RGB pattern (uint8 kxkx3) and alpha (float kxk in [0, 1]), and its name."""

    name: str
    pattern: np.ndarray
    alpha: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.pattern = np.asarray(self.pattern, np.uint8)
        if self.alpha is None:
            self.alpha = np.ones(self.pattern.shape[:2], np.float32)
        self.alpha = np.asarray(self.alpha, np.float32)

    @property
    def rgb(self) -> np.ndarray:
        return self.pattern.astype(np.float32) / 255.0

    def render(self, images, params, boxes, face: float = 0.85, match_light: bool = True) -> np.ndarray:
        return render_stickers(images, params, boxes, self.rgb, self.alpha, face, match_light)
