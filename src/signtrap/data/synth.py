"""SynthSigns: a procedural look-alike of GTSRB's 43 German traffic-sign classes.

Why it exists: experiments (and tests) need plenty of labelled traffic-sign images with known
sign boxes, without shipping the real dataset. A model trained only on these images should
still recognise real GTSRB crops, so the designs follow the real German signs and the
per-image randomisation imitates GTSRB's look (tight crops, dark/washed-out photos, blur,
low resolution, JPEG).

How it works, and why it is fast:
  1. Each sign design is drawn once per (class, variant) as a *label map* on a 512 px canvas
     (0 = transparent, other ids = paint colours), then turned into per-colour coverage masks
     by 4x area downsampling (this is the anti-aliasing) and cached at 128 and 64 px.
  2. Per image, a random palette turns the masks into a premultiplied RGBA template, which is
     warped (scale, rotation, perspective, jitter) straight into a 2x-oversampled scene,
     composited over a random background, lit, blurred, downscaled with INTER_AREA, degraded
     (resolution loss, sensor noise, JPEG).
All randomness comes from the `np.random.Generator` passed in; `generate` derives one generator
per image from (seed, class, index) so results do not depend on order, chunking or threads.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import cv2
import numpy as np


__all__ = ["SynthBatch", "render_sign", "generate"]

# --------------------------------------------------------------------------------------------
# Paint ids used on label maps. Colours are chosen per image (see _sample_palette).
# --------------------------------------------------------------------------------------------
RED, WHITE, BLACK, BLUE, YELLOW, GREY, AMBER, GREEN = 1, 2, 3, 4, 5, 6, 7, 8
_N_PAINTS = 9

_HI = 512  # label canvas side; 4x the largest template so area downsampling anti-aliases
_TEMPLATE_SIZES = (128, 64)
_N_VARIANTS = 5
_S = _HI / 2 * 0.985  # normalised unit -> px; sign spans [-1, 1] with a hair of margin
_C = _HI / 2


@dataclass(frozen=True)
class _Style:
    """Per-variant design knobs: real signs differ by manufacturer, age and font."""

    w: float  # stroke-weight multiplier for pictograms and text
    ring: float  # red/blue border-width multiplier
    font: int
    pict: float = 1.0  # pictogram scale: stops the model keying on one exact silhouette


_STYLES = (
    _Style(1.0, 1.0, cv2.FONT_HERSHEY_SIMPLEX),
    _Style(1.18, 1.12, cv2.FONT_HERSHEY_DUPLEX, 1.1),
    _Style(0.85, 0.88, cv2.FONT_HERSHEY_SIMPLEX, 0.9),
    _Style(1.08, 0.95, cv2.FONT_HERSHEY_DUPLEX, 1.05),
    _Style(0.92, 1.05, cv2.FONT_HERSHEY_SIMPLEX, 0.95),
)

# --------------------------------------------------------------------------------------------
# Drawing primitives on the label canvas, in normalised coordinates (x, y in [-1, 1], y down).
# --------------------------------------------------------------------------------------------


def _px(x: float, y: float) -> tuple[int, int]:
    return int(round(_C + x * _S)), int(round(_C + y * _S))


def _pts(points) -> np.ndarray:
    return np.array([_px(x, y) for x, y in points], np.int32)


def _len(v: float) -> int:
    return max(1, int(round(v * _S)))


def _poly(cv: np.ndarray, points, lab: int) -> None:
    cv2.fillPoly(cv, [_pts(points)], lab, cv2.LINE_8)


def _stroke(cv: np.ndarray, points, lab: int, w: float, closed: bool = False) -> None:
    cv2.polylines(cv, [_pts(points)], closed, lab, _len(w), cv2.LINE_8)


def _disc(cv: np.ndarray, x: float, y: float, r: float, lab: int, w: float = -1) -> None:
    cv2.circle(cv, _px(x, y), _len(r), lab, -1 if w < 0 else _len(w), cv2.LINE_8)


def _ellipse(cv, x, y, ax, ay, angle, lab, w: float = -1) -> None:
    cv2.ellipse(cv, _px(x, y), (_len(ax), _len(ay)), angle, 0, 360, lab,
                -1 if w < 0 else _len(w), cv2.LINE_8)


def _rect(cv, x1, y1, x2, y2, lab) -> None:
    cv2.rectangle(cv, _px(x1, y1), _px(x2, y2), lab, -1)


def _arc(cx, cy, r, a0, a1, n=24):
    a = np.radians(np.linspace(a0, a1, n))
    return list(zip(cx + r * np.cos(a), cy + r * np.sin(a)))


def _arrow(cv, points, lab, w, head_len=None, head_w=None) -> None:
    """Thick polyline whose last point is the tip of a triangular head."""
    head_len = head_len if head_len is not None else 1.45 * w
    head_w = head_w if head_w is not None else 1.3 * w
    pts = [np.asarray(p, float) for p in points]
    tip, prev = pts[-1], pts[-2]
    d = (tip - prev) / (np.linalg.norm(tip - prev) + 1e-9)
    base = tip - d * head_len
    n = np.array([-d[1], d[0]])
    _stroke(cv, [*map(tuple, pts[:-1]), tuple(base + d * 0.05)], lab, w)
    _poly(cv, [tuple(tip), tuple(base + n * head_w), tuple(base - n * head_w)], lab)


def _text(cv, text: str, box, lab: int, st: _Style, weight: float = 1.0) -> None:
    """Text stretched to fill `box` (x1, y1, x2, y2), like the condensed DIN lettering."""
    scale = 4.0
    thick = max(2, int(round(11 * st.w * weight)))
    (tw, th), base = cv2.getTextSize(text, st.font, scale, thick)
    m = np.zeros((th + base + 2 * thick, tw + 2 * thick), np.uint8)
    cv2.putText(m, text, (thick, th + thick), st.font, scale, 255, thick, cv2.LINE_AA)
    ys, xs = np.nonzero(m > 127)
    m = m[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    (x1, y1), (x2, y2) = _px(box[0], box[1]), _px(box[2], box[3])
    m = cv2.resize(m, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    region = cv[y1:y2, x1:x2]
    region[m > 127] = lab


def _digits(cv, digits: str, box, lab: int, st: _Style) -> None:
    """One equal cell per digit; '1' drawn as the DIN bar with a flag, since Hershey's bare
    stroke makes "100" look like a wide "00" (and so like "80")."""
    x1, y1, x2, y2 = box
    cw = (x2 - x1) / len(digits)
    for i, ch in enumerate(digits):
        cx1, cx2 = x1 + i * cw + 0.03, x1 + (i + 1) * cw - 0.03
        if ch == "1":
            bw = 0.07 * st.w
            bx = cx2 - (cx2 - cx1) * 0.3
            _rect(cv, bx - bw, y1, bx + bw, y2, lab)
            _poly(cv, [(bx - bw, y1), (bx + bw * 0.2, y1), (cx1 + 0.02, y1 + 0.28 * (y2 - y1)),
                       (cx1 + 0.02, y1 + 0.16 * (y2 - y1))], lab)
        else:
            _text(cv, ch, (cx1, y1, cx2, y2), lab, st)


# --------------------------------------------------------------------------------------------
# Sign bodies (outer shapes). Painter's order: later paint covers earlier paint.
# --------------------------------------------------------------------------------------------


def _body_prohibitory(cv, st, inner=WHITE) -> None:
    _disc(cv, 0, 0, 1.0, WHITE)  # thin reflective rim
    _disc(cv, 0, 0, 0.965, RED)
    _disc(cv, 0, 0, 0.965 - 0.19 * st.ring, inner)


def _body_end(cv, st) -> None:
    _disc(cv, 0, 0, 1.0, GREY)
    _disc(cv, 0, 0, 0.955, WHITE)


def _body_mandatory(cv, st) -> None:
    _disc(cv, 0, 0, 1.0, WHITE)
    _disc(cv, 0, 0, 0.95, BLUE)


_TRI = ((0.0, -0.866), (1.0, 0.866), (-1.0, 0.866))  # equilateral, centroid at y=0.289


def _tri_scaled(k: float, inverted: bool = False):
    cy = 0.289
    pts = [(x * k, cy + (y - cy) * k) for x, y in _TRI]
    return [(x, -y) for x, y in pts] if inverted else pts


def _body_triangle(cv, st, inverted: bool = False) -> None:
    # Rounded corners: fill a shrunk triangle then stroke its outline thickly (round joins).
    r = 0.06
    _poly(cv, _tri_scaled(0.93, inverted), WHITE)
    _stroke(cv, _tri_scaled(0.93, inverted), WHITE, 2 * r, closed=True)
    _poly(cv, _tri_scaled(0.88, inverted), RED)
    _stroke(cv, _tri_scaled(0.88, inverted), RED, 2 * r, closed=True)
    k_in = 0.88 - 0.25 * st.ring
    _poly(cv, _tri_scaled(k_in, inverted), WHITE)
    _stroke(cv, _tri_scaled(k_in, inverted), WHITE, 0.05, closed=True)


def _walker(cv, x, y0, h, lab, w, stride=1.0) -> None:
    """Walking stick figure of height h whose head top is at (x, y0), facing right."""
    k = h / 0.85
    _disc(cv, x + 0.03 * k, y0 + 0.08 * k, 0.08 * k, lab)
    sh, hip = (x + 0.02 * k, y0 + 0.2 * k), (x - 0.01 * k, y0 + 0.48 * k)
    _stroke(cv, [sh, hip], lab, 0.12 * k * w)
    _stroke(cv, [hip, (x - 0.16 * k * stride, y0 + 0.85 * k)], lab, 0.09 * k * w)
    _stroke(cv, [hip, (x + 0.15 * k * stride, y0 + 0.85 * k)], lab, 0.09 * k * w)
    _stroke(cv, [sh, (x - 0.15 * k, y0 + 0.42 * k)], lab, 0.07 * k * w)
    _stroke(cv, [sh, (x + 0.15 * k, y0 + 0.4 * k)], lab, 0.07 * k * w)


def _car_back(cv, cx, cy, w, lab) -> None:
    """Car seen from behind, as on the no-passing signs."""
    _poly(cv, [(cx - 0.32 * w, cy - 0.42 * w), (cx + 0.32 * w, cy - 0.42 * w),
               (cx + 0.45 * w, cy - 0.1 * w), (cx + 0.5 * w, cy - 0.1 * w),
               (cx + 0.5 * w, cy + 0.28 * w), (cx - 0.5 * w, cy + 0.28 * w),
               (cx - 0.5 * w, cy - 0.1 * w), (cx - 0.45 * w, cy - 0.1 * w)], lab)
    _rect(cv, cx - 0.48 * w, cy + 0.2 * w, cx - 0.28 * w, cy + 0.45 * w, lab)
    _rect(cv, cx + 0.28 * w, cy + 0.2 * w, cx + 0.48 * w, cy + 0.45 * w, lab)


def _truck_back(cv, cx, cy, w, lab) -> None:
    _rect(cv, cx - 0.5 * w, cy - 0.6 * w, cx + 0.5 * w, cy + 0.35 * w, lab)
    _rect(cv, cx - 0.45 * w, cy + 0.3 * w, cx - 0.2 * w, cy + 0.5 * w, lab)
    _rect(cv, cx + 0.2 * w, cy + 0.3 * w, cx + 0.45 * w, cy + 0.5 * w, lab)


def _truck_side(cv, cx, cy, w, lab) -> None:
    """Lorry in side view facing left, as on sign 16."""
    _poly(cv, [(cx - 0.5 * w, cy + 0.2 * w), (cx - 0.5 * w, cy - 0.02 * w),
               (cx - 0.4 * w, cy - 0.2 * w), (cx - 0.27 * w, cy - 0.2 * w),
               (cx - 0.27 * w, cy + 0.2 * w)], lab)
    _rect(cv, cx - 0.24 * w, cy - 0.36 * w, cx + 0.5 * w, cy + 0.2 * w, lab)
    for wx in (-0.36, 0.18, 0.36):
        _disc(cv, cx + wx * w, cy + 0.24 * w, 0.085 * w, lab)


def _diag_stripes(cv, n, gap, w, lab, span=0.93) -> None:
    """Parallel '/' stripes through the centre, clipped to a circle of radius `span`."""
    mask = np.zeros_like(cv)
    for i in range(n):
        o = (i - (n - 1) / 2) * gap
        # perpendicular offset along (1, 1)/sqrt2 of a line with direction (1, -1)/sqrt2
        ox, oy = o / math.sqrt(2), o / math.sqrt(2)
        _stroke(mask, [(ox - 1.5, oy + 1.5), (ox + 1.5, oy - 1.5)], 1, w)
    circle = np.zeros_like(cv)
    _disc(circle, 0, 0, span, 1)
    cv[(mask > 0) & (circle > 0)] = lab


# --------------------------------------------------------------------------------------------
# One drawing function per sign (family); each takes (label canvas, style).
# --------------------------------------------------------------------------------------------


def _speed(digits: str) -> Callable:
    def draw(cv, st):
        _body_prohibitory(cv, st)
        # DIN digits are big: ~45% of the sign's height, two digits ~55% of its width
        box = (-0.53, -0.42, 0.53, 0.42) if len(digits) == 2 else (-0.66, -0.38, 0.66, 0.38)
        _digits(cv, digits, box, BLACK, st)
    return draw


def _end_80(cv, st) -> None:
    _body_end(cv, st)
    _digits(cv, "80", (-0.53, -0.42, 0.53, 0.42), GREY, st)
    _diag_stripes(cv, 5, 0.075, 0.035, BLACK)


def _end_all(cv, st) -> None:
    _body_end(cv, st)
    _diag_stripes(cv, 5, 0.09, 0.04 * st.w, BLACK)


def _no_passing(cv, st, truck=False, end=False) -> None:
    if end:
        _body_end(cv, st)
    else:
        _body_prohibitory(cv, st)
    left = GREY if end else RED
    right = GREY if end else BLACK
    if truck:
        _truck_back(cv, -0.29, 0.06, 0.48, left)
    else:
        _car_back(cv, -0.3, 0.08, 0.5, left)
    _car_back(cv, 0.3, 0.08, 0.5, right)
    if end:
        _diag_stripes(cv, 5, 0.075, 0.03, BLACK)


def _no_vehicles(cv, st) -> None:
    _body_prohibitory(cv, st)


def _no_trucks(cv, st) -> None:
    _body_prohibitory(cv, st)
    _truck_side(cv, 0.0, 0.03, 1.15, BLACK)


def _no_entry(cv, st) -> None:
    _disc(cv, 0, 0, 1.0, WHITE)
    _disc(cv, 0, 0, 0.965, RED)
    _rect(cv, -0.7, -0.15 - 0.02 * st.w, 0.7, 0.15 + 0.02 * st.w, WHITE)


def _stop(cv, st) -> None:
    octagon = [(math.cos(math.radians(22.5 + 45 * i)), math.sin(math.radians(22.5 + 45 * i)))
               for i in range(8)]
    k = 1 / math.cos(math.radians(22.5))  # so the flat sides touch the unit box
    _poly(cv, [(x * k * 0.99, y * k * 0.99) for x, y in octagon], WHITE)
    _poly(cv, [(x * k * 0.93, y * k * 0.93) for x, y in octagon], RED)
    _text(cv, "STOP", (-0.7, -0.24, 0.7, 0.24), WHITE, st, weight=0.9)


def _yield(cv, st) -> None:
    _body_triangle(cv, st, inverted=True)


def _priority(cv, st) -> None:
    d = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    _poly(cv, d, GREY)
    _poly(cv, [(x * 0.96, y * 0.96) for x, y in d], WHITE)
    _poly(cv, [(x * (0.62 + 0.04 * st.ring), y * (0.62 + 0.04 * st.ring)) for x, y in d], YELLOW)


def _warning(pictogram: Callable) -> Callable:
    def draw(cv, st):
        _body_triangle(cv, st)
        # Real pictograms are heavy; thin strokes would vanish at 32 px.
        tmp = np.zeros_like(cv)
        pictogram(tmp, replace(st, w=st.w * 1.35))
        if st.pict != 1.0:  # rescale about the triangle's interior centre
            c = _px(0, 0.22)
            m = cv2.getRotationMatrix2D((float(c[0]), float(c[1])), 0.0, st.pict)
            tmp = cv2.warpAffine(tmp, m, tmp.shape[::-1], flags=cv2.INTER_NEAREST)
            inner = np.zeros_like(cv)
            _poly(inner, _tri_scaled(0.88 - 0.25 * st.ring), 1)
            tmp[inner == 0] = 0
        cv[tmp > 0] = tmp[tmp > 0]
    return draw


def _p_caution(cv, st):
    w = st.w
    _poly(cv, [(-0.095 * w, -0.3), (0.095 * w, -0.3), (0.05 * w, 0.3), (-0.05 * w, 0.3)], BLACK)
    _disc(cv, 0, 0.46, 0.08 * w, BLACK)


def _p_curve_left(cv, st):
    w = 0.1 * st.w
    _arrow(cv, [(0.17, 0.62), (0.17, 0.25), *_arc(-0.2, 0.25, 0.37, 0, -55, 12)[1:],
                (-0.2 - 0.13, -0.2)], BLACK, w, head_len=0.2, head_w=0.15)


def _p_double_curve(cv, st):
    # zig-zag: up, bend left, bend right, up to the head
    pts = [(0.12, 0.62), (0.12, 0.42), (-0.14, 0.22), (-0.14, 0.12), (0.12, -0.08),
           (0.12, -0.12), (0.02, -0.38)]
    _arrow(cv, pts, BLACK, 0.1 * st.w, head_len=0.18, head_w=0.15)


def _p_bumps(cv, st):
    _rect(cv, -0.56, 0.5, 0.56, 0.62, BLACK)
    for cx in (-0.27, 0.27):
        cv2.ellipse(cv, _px(cx, 0.52), (_len(0.27), _len(0.2 * st.w)), 0, 180, 360, BLACK, -1)


def _p_slippery(cv, st):
    # car tilted, with two wavy skid marks below it
    c, s = math.cos(math.radians(-12)), math.sin(math.radians(-12))
    body = [(-0.3, -0.02), (-0.2, -0.2), (0.18, -0.2), (0.3, -0.02), (0.32, 0.12), (-0.32, 0.12)]
    _poly(cv, [(x * c - y * s, x * s + y * c - 0.02) for x, y in body], BLACK)
    for x0 in (-0.2, 0.12):
        t = np.linspace(0, 1, 20)
        _stroke(cv, list(zip(x0 + 0.1 * np.sin(2 * np.pi * t), 0.2 + 0.42 * t)), BLACK,
                0.06 * st.w)


def _p_narrows_right(cv, st):
    w = 0.09 * st.w
    _stroke(cv, [(-0.2, -0.22), (-0.2, 0.62)], BLACK, w)
    _stroke(cv, [(0.3, 0.62), (0.3, 0.32), (0.07, 0.08), (0.07, -0.22)], BLACK, w)


def _p_road_work(cv, st):
    w = st.w
    _disc(cv, -0.12, -0.18, 0.085, BLACK)
    _stroke(cv, [(-0.15, -0.06), (-0.24, 0.26)], BLACK, 0.13 * w)
    _stroke(cv, [(-0.24, 0.26), (-0.38, 0.6)], BLACK, 0.08 * w)
    _stroke(cv, [(-0.24, 0.26), (-0.05, 0.42), (-0.05, 0.6)], BLACK, 0.08 * w)
    _stroke(cv, [(-0.15, -0.02), (0.06, 0.15)], BLACK, 0.06 * w)
    _stroke(cv, [(-0.05, -0.05), (0.2, 0.42)], BLACK, 0.045 * w)
    _poly(cv, [(0.13, 0.38), (0.28, 0.35), (0.25, 0.5)], BLACK)
    _poly(cv, [(0.14, 0.62), (0.55, 0.62), (0.34, 0.44)], BLACK)


def _p_signals(cv, st):
    if st.w > 1.5:  # some signs show the black lamp housing
        cv2.rectangle(cv, _px(-0.16, -0.34), _px(0.16, 0.6), BLACK, -1)
    for y, lab in ((-0.18, RED), (0.13, AMBER), (0.44, GREEN)):
        _disc(cv, 0, y, 0.125, lab)


def _p_pedestrian(cv, st):
    _walker(cv, 0.0, -0.3, 0.9, BLACK, st.w)


def _p_children(cv, st):
    _walker(cv, -0.2, -0.28, 0.88, BLACK, st.w * 0.95)
    _walker(cv, 0.2, -0.05, 0.64, BLACK, st.w * 0.95)
    _stroke(cv, [(-0.05, 0.16), (0.1, 0.2)], BLACK, 0.05 * st.w)


def _p_bicycle(cv, st):
    w = st.w
    for cx in (-0.3, 0.3):
        _disc(cv, cx, 0.42, 0.18, BLACK, w=0.05 * w)
    frame = [(-0.3, 0.42), (-0.05, 0.15), (0.0, 0.42), (-0.3, 0.42)]
    _stroke(cv, frame, BLACK, 0.045 * w, closed=True)
    _stroke(cv, [(0.0, 0.42), (0.2, 0.15), (0.3, 0.42)], BLACK, 0.045 * w)
    _stroke(cv, [(-0.05, 0.15), (0.2, 0.15)], BLACK, 0.045 * w)
    _stroke(cv, [(-0.12, 0.08), (0.02, 0.08)], BLACK, 0.05 * w)  # saddle
    _stroke(cv, [(0.2, 0.15), (0.16, 0.02), (0.26, 0.0)], BLACK, 0.045 * w)  # handlebar


def _p_snow(cv, st):
    cx, cy, r, w = 0.0, 0.2, 0.36, 0.055 * st.w
    for k in range(3):
        a = math.radians(90 + 60 * k)
        dx, dy = r * math.cos(a), r * math.sin(a)
        _stroke(cv, [(cx - dx, cy - dy), (cx + dx, cy + dy)], BLACK, w)
        for sgn in (-1, 1):  # small V branches near each arm tip
            bx, by = cx + sgn * dx * 0.6, cy + sgn * dy * 0.6
            for da in (-50, 50):
                b = a + math.radians(da) + (0 if sgn > 0 else math.pi)
                _stroke(cv, [(bx, by), (bx + 0.14 * math.cos(b), by + 0.14 * math.sin(b))],
                        BLACK, w * 0.8)


def _p_deer(cv, st):
    w = st.w
    _ellipse(cv, -0.02, 0.25, 0.27, 0.11, -28, BLACK)
    _poly(cv, [(0.12, 0.1), (0.28, -0.12), (0.34, -0.08), (0.22, 0.18)], BLACK)  # neck
    _ellipse(cv, 0.33, -0.12, 0.09, 0.05, -20, BLACK)  # head
    _stroke(cv, [(0.28, -0.14), (0.22, -0.3), (0.3, -0.36)], BLACK, 0.035 * w)  # antler
    _stroke(cv, [(0.22, -0.27), (0.14, -0.32)], BLACK, 0.03 * w)
    _stroke(cv, [(0.2, 0.15), (0.38, 0.2), (0.42, 0.1)], BLACK, 0.055 * w)  # fore legs
    _stroke(cv, [(0.16, 0.2), (0.3, 0.32)], BLACK, 0.05 * w)
    _stroke(cv, [(-0.22, 0.35), (-0.38, 0.52), (-0.5, 0.6)], BLACK, 0.06 * w)  # hind legs
    _stroke(cv, [(-0.18, 0.36), (-0.26, 0.6)], BLACK, 0.05 * w)


def _p_right_of_way(cv, st):
    w = st.w
    _poly(cv, [(0, -0.36), (0.08 * w, -0.16), (0.08 * w, 0.44), (0, 0.64), (-0.08 * w, 0.44),
               (-0.08 * w, -0.16)], BLACK)
    _poly(cv, [(-0.36, 0.13), (-0.26, 0.13 - 0.05 * w), (0.26, 0.13 - 0.05 * w), (0.36, 0.13),
               (0.26, 0.13 + 0.05 * w), (-0.26, 0.13 + 0.05 * w)], BLACK)


_AW = 0.2  # shaft width of white arrows on blue signs


def _blue(arrows: Callable) -> Callable:
    def draw(cv, st):
        _body_mandatory(cv, st)
        arrows(cv, st)
    return draw


def _a_turn_right(cv, st):
    w = _AW * st.w
    _arrow(cv, [(-0.18, 0.66), (-0.18, 0.08), *_arc(0.12, 0.08, 0.3, 180, 270, 12)[1:],
                (0.62, -0.22)], WHITE, w, head_len=0.3, head_w=0.27)


def _a_ahead(cv, st):
    _arrow(cv, [(0, 0.7), (0, -0.68)], WHITE, _AW * st.w, head_len=0.34, head_w=0.3)


def _a_straight_right(cv, st):
    w = 0.17 * st.w
    _arrow(cv, [(-0.15, 0.7), (-0.15, -0.68)], WHITE, w, head_len=0.3, head_w=0.26)
    _arrow(cv, [*_arc(0.15, 0.32, 0.3, 180, 270, 12), (0.66, 0.02)], WHITE, w,
           head_len=0.3, head_w=0.26)


def _a_keep_right(cv, st):
    _arrow(cv, [(-0.45, -0.45), (0.48, 0.48)], WHITE, _AW * st.w, head_len=0.36, head_w=0.3)


def _a_roundabout(cv, st):
    w = 0.15 * st.w
    for k in range(3):
        a0 = 90 + 120 * k
        pts = _arc(0, 0, 0.45, a0, a0 - 82, 16)  # decreasing angle = counter-clockwise on screen
        _arrow(cv, pts, WHITE, w, head_len=0.22, head_w=0.2)


def _mirrored(draw: Callable) -> Callable:
    """Left-hand version of a symmetric sign whose pictogram points right."""
    def mirror(cv, st):
        tmp = np.zeros_like(cv)
        draw(tmp, st)
        cv[...] = cv2.flip(tmp, 1)
    return mirror


_SIGNS: dict[int, Callable] = {
    0: _speed("20"), 1: _speed("30"), 2: _speed("50"), 3: _speed("60"), 4: _speed("70"),
    5: _speed("80"), 6: _end_80, 7: _speed("100"), 8: _speed("120"),
    9: _no_passing,
    10: lambda cv, st: _no_passing(cv, st, truck=True),
    11: _warning(_p_right_of_way),
    12: _priority,
    13: _yield,
    14: _stop,
    15: _no_vehicles,
    16: _no_trucks,
    17: _no_entry,
    18: _warning(_p_caution),
    19: _warning(_p_curve_left),
    20: _mirrored(_warning(_p_curve_left)),
    21: _warning(_p_double_curve),
    22: _warning(_p_bumps),
    23: _warning(_p_slippery),
    24: _warning(_p_narrows_right),
    25: _warning(_p_road_work),
    26: _warning(_p_signals),
    27: _warning(_p_pedestrian),
    28: _warning(_p_children),
    29: _warning(_p_bicycle),
    30: _warning(_p_snow),
    31: _warning(_p_deer),
    32: _end_all,
    33: _blue(_a_turn_right),
    34: _mirrored(_blue(_a_turn_right)),
    35: _blue(_a_ahead),
    36: _blue(_a_straight_right),
    37: _mirrored(_blue(_a_straight_right)),
    38: _blue(_a_keep_right),
    39: _mirrored(_blue(_a_keep_right)),
    40: _blue(_a_roundabout),
    41: lambda cv, st: _no_passing(cv, st, end=True),
    42: lambda cv, st: _no_passing(cv, st, truck=True, end=True),
}
NUM_CLASSES = len(_SIGNS)  # one renderer per class id 0..N-1 (GTSRB's classes: signtrap.datasets.gtsrb)
assert sorted(_SIGNS) == list(range(NUM_CLASSES))


# --------------------------------------------------------------------------------------------
# Template cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    paints: np.ndarray  # int (k,) paint ids present
    masks: np.ndarray  # float32 (T*T, k) coverage of each paint
    alpha: np.ndarray  # float32 (T, T)
    size: int


_cache: dict[tuple[int, int, int], _Template] = {}
_cache_lock = threading.Lock()


def _build_templates(class_id: int, variant: int) -> dict[int, _Template]:
    lab = np.zeros((_HI, _HI), np.uint8)
    _SIGNS[class_id](lab, _STYLES[variant])
    paints = [p for p in range(1, _N_PAINTS) if (lab == p).any()]
    out = {}
    for t in _TEMPLATE_SIZES:
        ms = [cv2.resize((lab == p).astype(np.float32), (t, t), interpolation=cv2.INTER_AREA)
              for p in paints]
        m = np.stack(ms, axis=-1)
        out[t] = _Template(np.array(paints), np.ascontiguousarray(m.reshape(t * t, -1)),
                           m.sum(-1), t)
    return out


def _template(class_id: int, variant: int, needed_px: float) -> _Template:
    # Smallest cached template at least as large as the on-screen sign: avoids aliasing from
    # heavy minification in the warp without paying for the large one.
    t = next((s for s in reversed(_TEMPLATE_SIZES) if s >= needed_px), _TEMPLATE_SIZES[0])
    key = (class_id, variant, t)
    tpl = _cache.get(key)
    if tpl is None:
        built = _build_templates(class_id, variant)
        with _cache_lock:
            for s, v in built.items():
                _cache.setdefault((class_id, variant, s), v)
            tpl = _cache[key]
    return tpl


# --------------------------------------------------------------------------------------------
# Per-image randomisation
# --------------------------------------------------------------------------------------------


def _sample_palette(rng: np.random.Generator) -> np.ndarray:
    """RGB in [0, 1] for every paint id; real sign paints vary with age, sheeting and camera."""
    u = rng.uniform
    pal = np.zeros((_N_PAINTS, 3), np.float32)
    pal[RED] = (u(0.62, 0.95), u(0.04, 0.2), u(0.06, 0.25))
    if u() < 0.2:  # faded, pinkish red
        pal[RED] = pal[RED] * 0.7 + 0.3 * np.array([0.95, 0.6, 0.6])
    wb = u(0.78, 1.0)
    pal[WHITE] = np.clip(wb + rng.normal(0, 0.03, 3), 0, 1)
    pal[BLACK] = u(0.02, 0.16) + rng.normal(0, 0.01, 3)
    pal[BLUE] = (u(0.0, 0.18), u(0.18, 0.45), u(0.55, 0.92))
    pal[YELLOW] = (u(0.85, 1.0), u(0.6, 0.85), u(0.0, 0.2))
    pal[GREY] = u(0.35, 0.65) + rng.normal(0, 0.02, 3)
    pal[AMBER] = (u(0.9, 1.0), u(0.55, 0.75), u(0.0, 0.15))
    pal[GREEN] = (u(0.0, 0.2), u(0.55, 0.8), u(0.3, 0.55))
    return np.clip(pal, 0, 1)


_THEMES = (  # (mean RGB, spread, texture) of typical GTSRB surroundings
    ((0.62, 0.7, 0.82), 0.15, 0.03),  # sky
    ((0.85, 0.87, 0.9), 0.08, 0.02),  # overcast / bright sky
    ((0.22, 0.3, 0.14), 0.12, 0.12),  # foliage
    ((0.35, 0.3, 0.22), 0.12, 0.1),  # trees, autumn
    ((0.45, 0.42, 0.4), 0.15, 0.06),  # buildings, concrete
    ((0.55, 0.3, 0.25), 0.12, 0.06),  # brick
    ((0.08, 0.08, 0.1), 0.05, 0.03),  # dark / night
    ((0.3, 0.3, 0.32), 0.1, 0.05),  # asphalt, dusk
)


def _background(rng: np.random.Generator, w: int) -> np.ndarray:
    # Variation is mostly in brightness with a little chroma: real street scenes are far less
    # colourful than independent per-channel noise.
    mean, spread, tex = _THEMES[rng.integers(len(_THEMES))]
    n = int(rng.integers(2, 6))

    def patch(m, sp, rows, cols):
        lum = rng.normal(0, sp, (rows, cols, 1))
        chroma = rng.normal(0, sp * 0.25, (rows, cols, 3))
        return np.clip(np.asarray(m) * (1 + lum * 1.5) + chroma, 0, 1).astype(np.float32)

    grid = patch(mean, spread, n, n)
    if rng.uniform() < 0.35:  # a second theme bleeding in (tree line against sky, etc.)
        m2, s2, _ = _THEMES[rng.integers(len(_THEMES))]
        rows = int(rng.integers(1, n + 1))
        grid[rows:] = patch(m2, s2, n - rows, n)
    bg = cv2.resize(grid, (w, w), interpolation=cv2.INTER_CUBIC)
    if tex > 0:
        c = int(rng.integers(6, 20))
        noise = rng.normal(0, tex * rng.uniform(0.5, 1.5), (c, c, 1)).astype(np.float32)
        bg += cv2.resize(np.repeat(noise, 3, axis=2), (w, w), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(1, 3)) if rng.uniform() < 0.35 else 0):
        x1, y1 = rng.integers(0, w, 2)
        x2, y2 = x1 + rng.integers(w // 8, w // 2), y1 + rng.integers(w // 8, w // 2)
        col = tuple(float(v) for v in rng.uniform(0.05, 0.8) + rng.normal(0, 0.05, 3))
        cv2.rectangle(bg, (int(x1), int(y1)), (int(x2), int(y2)), col, -1)
    return np.clip(bg, 0, 1)


def _sign_homography(rng: np.random.Generator, t: int, w: int, frac: float,
                     centre: tuple[float, float]) -> np.ndarray:
    """Maps template pixels to scene pixels: scale, yaw/pitch foreshortening, perspective
    (near edge larger than far edge), in-plane rotation, then translation."""
    half = frac * w / 2
    sq = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    dst = sq * half
    yaw = rng.uniform(0.84, 1.0) if rng.uniform() < 0.5 else 1.0
    pitch = rng.uniform(0.88, 1.0) if rng.uniform() < 0.3 else 1.0
    dst[:, 0] *= yaw
    dst[:, 1] *= pitch
    persp = rng.uniform(-0.12, 0.12)
    dst[:, 1] *= 1 + persp * sq[:, 0]  # one vertical edge taller than the other
    persp_v = rng.uniform(-0.06, 0.06)
    dst[:, 0] *= 1 + persp_v * sq[:, 1]
    a = math.radians(rng.normal(0, 4.0) if rng.uniform() < 0.9 else rng.uniform(-10, 10))
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    dst = dst @ rot.T + np.asarray(centre)
    src = np.array([[0, 0], [t, 0], [t, t], [0, t]], np.float64)
    return cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32))


def _paste(scene: np.ndarray, rgba: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Composites a premultiplied RGBA template into the scene; returns the warped alpha."""
    w = scene.shape[0]
    warped = cv2.warpPerspective(rgba, H, (w, w), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    a = warped[..., 3:4]
    scene *= 1 - a
    scene += warped[..., :3]
    return warped[..., 3]


def _rgba(tpl: _Template, pal: np.ndarray, sign_gain: float) -> np.ndarray:
    rgb = (tpl.masks @ (pal[tpl.paints] * sign_gain)).reshape(tpl.size, tpl.size, 3)
    return np.concatenate([rgb, tpl.alpha[..., None]], axis=-1)


def _occlude(rng, scene, box) -> None:
    """Branch, leaf blob or bar covering part of the sign."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    col = tuple(float(v) for v in rng.uniform(0.05, 0.45, 3) * (0.6, 0.8, 0.5))
    kind = rng.integers(3)
    if kind == 0:  # leafy blob from one side
        cx = x1 + bw * rng.choice([rng.uniform(-0.1, 0.15), rng.uniform(0.85, 1.1)])
        cy = y1 + bh * rng.uniform(0, 1)
        r = max(1, int(bw * rng.uniform(0.15, 0.3)))
        cv2.circle(scene, (int(cx), int(cy)), r, col, -1, cv2.LINE_AA)
    elif kind == 1:  # branch across a corner
        p0 = (int(x1 + bw * rng.uniform(-0.2, 0.4)), int(y1 - bh * 0.1))
        p1 = (int(x1 + bw * rng.uniform(-0.2, 1.2)), int(y1 + bh * rng.uniform(0.2, 0.5)))
        cv2.line(scene, p0, p1, col, max(1, int(bw * rng.uniform(0.04, 0.1))), cv2.LINE_AA)
    else:  # post or bar in front
        x = int(x1 + bw * rng.choice([rng.uniform(0, 0.2), rng.uniform(0.8, 1.0)]))
        half = max(1, int(bw * rng.uniform(0.04, 0.09)))
        cv2.rectangle(scene, (x - half, 0), (x + half, scene.shape[0]), col, -1)


def _light(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Exposure, contrast/haze, gamma, colour cast and soft shadow, as in GTSRB's photos
    which are very often dark and low-contrast, sometimes blown out."""
    r = rng.uniform()
    if r < 0.35:
        gain = rng.uniform(0.18, 0.5)  # dark
    elif r < 0.9:
        gain = rng.uniform(0.45, 1.1)
    else:
        gain = rng.uniform(1.1, 1.9)  # overexposed
    img *= np.asarray(rng.normal(1.0, 0.07, 3) * gain, np.float32)
    if rng.uniform() < 0.2:  # soft shadow over one half plane
        w = img.shape[0]
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:w, 0:w].astype(np.float32) - w / 2
        d = (xx * math.cos(ang) + yy * math.sin(ang)) / (w * rng.uniform(0.03, 0.15))
        s = 1 - rng.uniform(0.3, 0.65) / (1 + np.exp(-np.clip(d - rng.normal(0, 5), -30, 30)))
        img *= s[..., None].astype(np.float32)
    haze = rng.uniform(0, 0.3) if rng.uniform() < 0.3 else 0.0
    if haze:
        img *= 1 - haze
        img += haze * float(img.mean() + rng.uniform(0.0, 0.25))
    c = rng.uniform(0.75, 1.3)
    m = float(img.mean())
    img = (img - m) * c + m
    np.clip(img, 0, 1, out=img)
    g = math.exp(rng.normal(0, 0.2))
    return np.power(img, g, out=img)


def _blur(rng: np.random.Generator, img: np.ndarray, w: int) -> np.ndarray:
    k = w / 64
    r = rng.uniform()
    if r < 0.15:  # motion blur along a random direction
        n = int(rng.integers(3, 8))
        ker = np.zeros((n, n), np.float32)
        ker[n // 2] = 1 / n
        ker = cv2.warpAffine(ker, cv2.getRotationMatrix2D((n / 2 - 0.5, n / 2 - 0.5),
                                                          float(rng.uniform(0, 180)), 1.0),
                             (n, n))
        ker /= max(ker.sum(), 1e-6)
        return cv2.filter2D(img, -1, ker)
    if r < 0.75:
        return cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.3, 1.5) * k))
    return img


def render_sign(class_id: int, rng: np.random.Generator, size: int = 32
                ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One randomised scene: uint8 (size,size,3) RGB image, and the sign's ROI box
    (x1,y1,x2,y2) in pixel coords of the output image (x2, y2 exclusive, like slices)."""
    class_id = int(class_id)
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class_id must be in [0, {NUM_CLASSES}), got {class_id}")
    w = 2 * size  # oversampled scene: blur/warp at 2x, then area downscale
    scene = _background(rng, w)

    # GTSRB crops are the sign box plus ~10% margin: sign width is 0.59-0.84 of the frame
    # (median 0.76) and the sign is centred to within a fraction of a pixel.
    if rng.uniform() < 0.85:
        frac = float(np.clip(rng.normal(0.75, 0.06), 0.55, 0.92))
        centre = (w / 2 + rng.normal(0, 0.012 * w), w / 2 + rng.normal(0, 0.012 * w))
    else:
        frac = float(rng.uniform(0.55, 0.95))
        jitter = (1 - frac) * w / 2 * 0.8
        centre = (w / 2 + rng.uniform(-jitter, jitter), w / 2 + rng.uniform(-jitter, jitter))

    if rng.uniform() < 0.15:  # a neighbouring sign peeking in from an edge
        other = int(rng.integers(NUM_CLASSES))
        side = rng.integers(4)
        off = frac * w * rng.uniform(0.85, 1.1)
        dx, dy = [(off, 0), (-off, 0), (0, off), (0, -off)][side]
        f2 = frac * rng.uniform(0.8, 1.1)
        tpl2 = _template(other, int(rng.integers(_N_VARIANTS)), f2 * w)
        H2 = _sign_homography(rng, tpl2.size, w, f2, (centre[0] + dx, centre[1] + dy))
        _paste(scene, _rgba(tpl2, _sample_palette(rng), rng.uniform(0.6, 1.1)), H2)

    if rng.uniform() < 0.3:  # sign pole below the sign
        pw = max(1, int(frac * w * rng.uniform(0.05, 0.1)))
        col = tuple(float(v) for v in np.full(3, rng.uniform(0.25, 0.7)) + rng.normal(0, .03, 3))
        cv2.rectangle(scene, (int(centre[0]) - pw // 2, int(centre[1])),
                      (int(centre[0]) + pw // 2 + 1, w), col, -1)

    tpl = _template(class_id, int(rng.integers(_N_VARIANTS)), frac * w)
    H = _sign_homography(rng, tpl.size, w, frac, centre)
    # Retro-reflective sheeting: the sign is often brighter (or duller) than its surroundings.
    alpha = _paste(scene, _rgba(tpl, _sample_palette(rng), rng.uniform(0.7, 1.25)), H)

    cols = np.flatnonzero(alpha.max(axis=0) > 0.5)
    rows = np.flatnonzero(alpha.max(axis=1) > 0.5)
    if len(cols) == 0 or len(rows) == 0:  # cannot happen with the ranges above; be safe
        cols = rows = np.array([w // 4, 3 * w // 4])
    box_hi = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)

    if rng.uniform() < 0.1:
        _occlude(rng, scene, box_hi)

    scene = _light(rng, scene)
    scene = _blur(rng, scene, w)
    img = cv2.resize(scene, (size, size), interpolation=cv2.INTER_AREA)

    if rng.uniform() < 0.2:  # ~10% of GTSRB originals are smaller than 32 px, upscaled
        lo = int(rng.integers(max(8, size // 2), size))
        img = cv2.resize(img, (lo, lo), interpolation=cv2.INTER_AREA)
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    if rng.uniform() < 0.7:
        img += rng.normal(0, rng.uniform(0.003, 0.02), img.shape).astype(np.float32)
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    if rng.uniform() < 0.5:
        q = int(rng.integers(25, 96))
        ok, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    out = np.ascontiguousarray(out)

    s = size / w
    x1, y1, x2, y2 = box_hi
    roi = (max(0, int(math.floor(x1 * s))), max(0, int(math.floor(y1 * s))),
           min(size, int(math.ceil(x2 * s))), min(size, int(math.ceil(y2 * s))))
    return out, roi


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthBatch:
    images: np.ndarray  # uint8 (N,size,size,3) RGB
    labels: np.ndarray  # int64 (N,)
    rois: np.ndarray  # int32 (N,4) x1,y1,x2,y2 in output pixel coords

    def __len__(self) -> int:
        return len(self.labels)


def generate(per_class: int, seed: int, size: int = 32, classes: Sequence[int] | None = None,
             progress: bool = False) -> SynthBatch:
    """per_class images of each class (default all 43), ordered class by class.

    Deterministic for a seed: image i of class c always comes from
    np.random.default_rng([seed, c, i]), whatever `classes`, threading or chunking."""
    if per_class < 0:
        raise ValueError("per_class must be >= 0")
    classes = list(range(NUM_CLASSES)) if classes is None else [int(c) for c in classes]
    for c in classes:
        if not 0 <= c < NUM_CLASSES:
            raise ValueError(f"class id {c} outside [0, {NUM_CLASSES})")
    jobs = [(c, i) for c in classes for i in range(per_class)]
    n = len(jobs)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.array([c for c, _ in jobs], np.int64)
    rois = np.empty((n, 4), np.int32)

    def work(lo: int, hi: int) -> int:
        for k in range(lo, hi):
            c, i = jobs[k]
            images[k], rois[k] = render_sign(c, np.random.default_rng([seed, c, i]), size)
        return hi - lo

    chunk = 64
    spans = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="SynthSigns", unit="img")
    workers = min(4, os.cpu_count() or 1, max(1, len(spans)))
    try:
        if workers <= 1:
            for lo, hi in spans:
                done = work(lo, hi)
                if bar is not None:
                    bar.update(done)
        else:
            with ThreadPoolExecutor(workers) as ex:
                for done in ex.map(lambda s: work(*s), spans):
                    if bar is not None:
                        bar.update(done)
    finally:
        if bar is not None:
            bar.close()
    return SynthBatch(images=images, labels=labels, rois=rois)
