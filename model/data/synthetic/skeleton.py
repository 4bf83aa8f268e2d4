"""Ribs and clavicles, whole or broken: the bones the painter draws, and the fracture.

A fracture's location names a bone ("posterior rib 6", "lateral rib 7", "clavicle"); a
severe rib fracture breaks the named rib and the two below it, as the report says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
from PIL import Image, ImageDraw

from model.data.synthetic.anatomy import SIGN, Anatomy, FloatArray, Point
from model.data.synthetic.canvas import Frame, layer_to_float
from model.data.synthetic.findings import SEVERITIES, Finding


def _rib_params() -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Parameters along a rib's posterior (14,) and anterior (10,) course, and their curves."""
    tau = np.linspace(0.0, 1.0, 14)
    tau2 = np.linspace(0.0, 1.0, 10)
    return tau, tau**2.2, tau2, tau2**1.2


_N_RIBS: Final = 11


def _rib_paths(
    anat: Anatomy, mcx: float, side: str
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Posterior (11, 14) and anterior (11, 10) centre lines of one side's ribs, x and y in
    patient coordinates, one row per rib from the first down."""
    sgn = SIGN[side]
    tw = anat.half_width
    index = np.arange(_N_RIBS, dtype=np.float64)[:, None]  # (11, 1)
    y0 = anat.rib_y0 + index * anat.rib_spacing
    # The first rib is short and tightly curved.
    reach = np.where(index == 0, 0.62, 1.0)
    tau, tau_curve, tau2, tau2_curve = _rib_params()
    post_a = 0.025 + tau * reach * (1.06 * tw - 0.025)  # (11, 14)
    post_y = y0 - 0.04 * tau + (0.11 + 0.004 * index) * reach * tau_curve
    lat_a, lat_y = post_a[:, -1:], post_y[:, -1:]
    ant_a = lat_a - tau2 * (lat_a - 0.3 * tw)  # (11, 10)
    ant_y = lat_y + 0.012 + 0.11 * tau2_curve
    return mcx + sgn * post_a, post_y, mcx + sgn * ant_a, ant_y


def _clavicle_path(anat: Anatomy, mcx: float, side: str, ap: bool) -> tuple[FloatArray, FloatArray]:
    sgn = SIGN[side]
    y0 = anat.apex_y + (0.035 if ap else 0.07)
    tau = np.linspace(0.0, 1.0, 12, dtype=np.float32)
    xs = mcx + sgn * (0.03 + 0.3 * tau)
    ys = y0 - 0.05 * tau + 0.012 * np.sin(2 * math.pi * tau)
    return xs, ys


def _fracture_site(f: Finding, r: np.random.Generator) -> tuple[int, float]:
    """(rib index, or -1 for the clavicle; position along the bone in [0, 1])."""
    if f.location == "clavicle":
        return -1, float(r.uniform(0.35, 0.65))
    part, _, number = f.location.split()
    # Along the posterior course; a "lateral" break sits where the rib turns forward.
    pos = float(r.uniform(0.4, 0.7)) if part == "posterior" else float(r.uniform(0.8, 0.88))
    return int(number) - 1, pos


def _split_at(
    pts: Sequence[Point], pos: float, gap: float
) -> tuple[list[Point], list[Point], Point, Point]:
    """Cut a polyline at fraction ``pos`` of its length, ``gap`` pixels apart.

    Returns the two parts, the break point and the unit normal of the bone there.
    """
    arr = np.asarray(pts, dtype=np.float64)
    seg = np.hypot(*np.diff(arr, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    cut = pos * float(cum[-1])

    def at(s: float) -> Point:
        i = int(np.clip(np.searchsorted(cum, s) - 1, 0, len(seg) - 1))
        t = (s - cum[i]) / max(float(seg[i]), 1e-9)
        p = arr[i] + t * (arr[i + 1] - arr[i])
        return (float(p[0]), float(p[1]))

    first = [(float(x), float(y)) for (x, y), c in zip(arr, cum, strict=True) if c < cut - gap / 2]
    second = [(float(x), float(y)) for (x, y), c in zip(arr, cum, strict=True) if c > cut + gap / 2]
    i = int(np.clip(np.searchsorted(cum, cut) - 1, 0, len(seg) - 1))
    tangent = (arr[i + 1] - arr[i]) / max(float(seg[i]), 1e-9)
    normal = (float(-tangent[1]), float(tangent[0]))
    return [*first, at(cut - gap / 2)], [at(cut + gap / 2), *second], at(cut), normal


def _draw_bone(
    draw: ImageDraw.ImageDraw, pts: Sequence[Point], width: int, fill: int, core: int
) -> None:
    """A tubular bone: bright cortex on both edges, a less dense medulla between."""
    if len(pts) < 2:
        return
    draw.line(list(pts), fill=fill, width=width)
    if width >= 4:
        draw.line(list(pts), fill=core, width=width - 2)


def _break_bone(
    pts: Sequence[Point], pos: float, gap: float, step: float, angle: float
) -> tuple[list[Point], list[Point], Point]:
    """Split a bone at ``pos``; the far fragment is angulated by ``angle`` radians about the
    break and shifted ``step`` pixels across the bone. Returns both parts and the break."""
    first, second, point, normal = _split_at(pts, pos, gap)
    c, s = math.cos(angle), math.sin(angle)
    moved = []
    for x, y in second:
        dx, dy = x - point[0], y - point[1]
        moved.append(
            (
                point[0] + c * dx - s * dy + normal[0] * step,
                point[1] + s * dx + c * dy + normal[1] * step,
            )
        )
    return first, moved, point


def draw_bones(
    anat: Anatomy,
    fr: Frame,
    mcx: float,
    fracture: Finding | None,
    shape_rng: Callable[[str], np.random.Generator],
) -> tuple[FloatArray, FloatArray, FloatArray, tuple[Point, ...]]:
    """Posterior ribs, the fainter anterior ribs and the clavicles (each (H, W) in [0, 1]),
    and the fracture's break point in pixels (empty without a fracture)."""
    size = fr.size
    back = Image.new("L", (size, size), 0)
    front = Image.new("L", (size, size), 0)
    collar = Image.new("L", (size, size), 0)
    db, df, dc = ImageDraw.Draw(back), ImageDraw.Draw(front), ImageDraw.Draw(collar)
    w_post = fr.width(0.021)
    w_ant = fr.width(0.015)
    w_cl = fr.width(0.03)
    breaks: dict[tuple[str, int], float] = {}  # (side, rib index or -1) -> position along it
    step = angle = 0.0
    if fracture is not None:
        r = shape_rng("Fracture")
        index, pos = _fracture_site(fracture, r)
        breaks[(fracture.side, index)] = pos
        if index >= 0 and fracture.severity == "severe":
            for k in (1, 2):
                breaks[(fracture.side, index + k)] = pos + float(r.uniform(-0.04, 0.04))
        level = SEVERITIES.index(fracture.severity)
        step = (0.0, 1.3, 2.0)[level] * w_post * float(r.choice((-1.0, 1.0)))
        angle = math.radians((0.0, 8.0, 18.0)[level]) * float(r.choice((-1.0, 1.0)))
    gap = max(2.0, 0.018 * size * fr.scale)
    broken: list[Point] = []
    for side in ("right", "left"):
        pa, py, aa, ay = _rib_paths(anat, mcx, side)
        post_u, post_v = fr.px(pa, py)
        ant_u, ant_v = fr.px(aa, ay)
        for i in range(_N_RIBS):
            post = list(zip(post_u[i].tolist(), post_v[i].tolist(), strict=True))
            ant = list(zip(ant_u[i].tolist(), ant_v[i].tolist(), strict=True))
            w = w_post if i else max(1, w_post - 1)
            if (side, i) in breaks:
                first, second, point = _break_bone(post, breaks[(side, i)], gap, step, angle)
                _draw_bone(db, first, w, 255, 185)
                _draw_bone(db, second, w, 255, 185)
                broken.append(point)
            else:
                _draw_bone(db, post, w, 255, 185)
            _draw_bone(df, ant, w_ant, 220, 170)
        clavicle = fr.pts(*_clavicle_path(anat, mcx, side, fr.ap))
        if (side, -1) in breaks:
            first, second, point = _break_bone(clavicle, breaks[(side, -1)], gap, 1.5 * step, angle)
            _draw_bone(dc, first, w_cl, 255, 200)
            _draw_bone(dc, second, w_cl, 255, 200)
            broken.append(point)
        else:
            _draw_bone(dc, clavicle, w_cl, 255, 200)
    # No blur of their own: the film's unsharpness, applied to the whole image, is enough.
    return (
        layer_to_float(back, 0.0),
        layer_to_float(front, 0.0),
        layer_to_float(collar, 0.0),
        tuple(broken),
    )
