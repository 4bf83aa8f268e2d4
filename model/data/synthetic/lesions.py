"""The findings' layers: what each abnormality adds to or takes from the chest.

Each function returns an (H, W) layer in [0, 1] drawn from the finding's own generator,
so that a finding's shape does not depend on which other findings are present.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw

from model.data.synthetic.anatomy import SIGN, Anatomy, FloatArray, Point
from model.data.synthetic.canvas import Frame, bbox, layer_to_float, smooth_noise, soften
from model.data.synthetic.findings import SEVERITIES, Finding, sides_of
from model.data.synthetic.thorax import lung_shape


def collapsed_lung(
    a: FloatArray,
    Y: FloatArray,
    anat: Anatomy,
    side: str,
    base: float,
    med_w: float,
    f: Finding,
    fr: Frame,
) -> FloatArray:
    """A lung pulled away from the chest wall: the same shape in stretched coordinates."""
    k = {"mild": 0.14, "moderate": 0.25, "severe": 0.42}[f.severity]
    height = base - anat.apex_y
    a_m = med_w + 0.03
    if f.location == "apical":
        y_anchor, ky, ka = base, 1.0 - k, 1.0 - 0.35 * k
    elif f.location == "lateral":
        y_anchor, ky, ka = anat.apex_y + 0.5 * height, 1.0 - 0.35 * k, 1.0 - k
    else:  # basilar: the lung rises off the diaphragm
        y_anchor, ky, ka = anat.apex_y, 1.0 - 0.8 * k, 1.0 - 0.4 * k
    a2 = a_m + (a - np.float32(a_m)) * np.float32(1.0 / ka)
    y2 = y_anchor + (Y - np.float32(y_anchor)) * np.float32(1.0 / ky)
    # A sharp edge: the visceral pleura is a thin line, not a gradient.
    lung, _ = lung_shape(a2, y2, anat, side, base, med_w, fr.px_len * 0.8)
    return lung


def effusion(
    f: Finding,
    r: np.random.Generator,
    X: FloatArray,
    Y: FloatArray,
    anat: Anatomy,
    base: Mapping[str, float],
    mcx: float,
    lungs: Mapping[str, FloatArray],
) -> FloatArray:
    """Dependent fluid with a meniscus climbing the lateral chest wall: (H, W) in [0, 1]."""
    tw = anat.half_width
    levels = {"mild": (0.1, 0.15), "moderate": (0.22, 0.3), "severe": (0.42, 0.55)}
    fluid = np.zeros_like(X)
    for side in sides_of(f.side):
        a = SIGN[side] * (X - mcx)
        frac = float(r.uniform(*levels[f.severity]))
        height = base[side] - anat.apex_y
        rise = float(r.uniform(0.07, 0.12)) * (0.5 + frac)
        lat = np.clip((a - 0.15 * tw) * np.float32(1.0 / (0.85 * tw)), 0.0, 1.0)
        top = base[side] - frac * height - rise * lat * lat * lat
        grad = 0.03 + 0.06 * frac
        fluid = fluid + np.clip((Y - top) * np.float32(1.0 / grad), 0.0, 1.0) * lungs[side]
    return np.clip(fluid, 0.0, 1.0) * np.float32(0.97)


def edema(
    f: Finding,
    r: np.random.Generator,
    X: FloatArray,
    Y: FloatArray,
    hila: Mapping[str, Point],
    lungs: Mapping[str, FloatArray],
    size: int,
) -> FloatArray:
    """Bilateral perihilar ("bat wing") haze fading toward the periphery: (H, W) in [0, 1]."""
    level = SEVERITIES.index(f.severity)
    amp = (0.4, 0.6, 0.8)[level]
    haze = np.zeros_like(X)
    for side in ("right", "left"):
        hx, hy = hila[side]
        sa = float(r.uniform(0.13, 0.17)) * (1.0 + 0.25 * level)
        sy = float(r.uniform(0.1, 0.13)) * (1.0 + 0.2 * level)
        g = np.exp(-(((X - hx) * np.float32(1 / sa)) ** 2) - ((Y - hy) * np.float32(1 / sy)) ** 2)
        haze = haze + g * lungs[side]
    if f.severity == "severe":
        # Alveolar edema is blotchy rather than a smooth veil.
        haze = haze * np.clip(0.75 + 0.5 * smooth_noise(r, size, max(6, size // 12)), 0.0, 1.0)
    return np.clip(haze * amp, 0.0, 1.0)


def pneumonia(
    f: Finding,
    r: np.random.Generator,
    fr: Frame,
    anat: Anatomy,
    base: Mapping[str, float],
    mcx: float,
) -> FloatArray:
    """Patchy, ill-defined airspace opacity in the finding's zone(s): (H, W) in [0, 1]."""
    size = fr.size
    # Drawn at a quarter resolution: the opacity has no sharp edges to lose.
    small = max(16, size // 4)
    k = small / size
    layer = Image.new("L", (small, small), 0)
    d = ImageDraw.Draw(layer)
    tw = anat.half_width
    level = SEVERITIES.index(f.severity)
    spread = (0.045, 0.065, 0.085)[level]
    density = (0.55, 0.72, 0.88)[level]
    t_zone = {"upper": 0.25, "middle": 0.52, "lower": 0.8}[f.location]
    centres: list[Point] = []
    for side in sides_of(f.side):
        sgn = SIGN[side]
        height = base[side] - anat.apex_y
        ca = float(r.uniform(0.45, 0.65)) * tw
        cy = anat.apex_y + (t_zone + float(r.uniform(-0.05, 0.05))) * height
        centres.append((mcx + sgn * ca, cy))
        for _ in range(int(r.integers(6, 11))):
            bx = mcx + sgn * ca + float(r.normal(0.0, spread))
            by = cy + float(r.normal(0.0, spread * 0.8))
            rad = float(r.uniform(0.025, 0.05)) * (0.8 + 0.3 * level)
            x0, y0, x1, y1 = bbox(fr, bx, by, rad, rad * float(r.uniform(0.7, 1.2)))
            d.ellipse((x0 * k, y0 * k, x1 * k, y1 * k), fill=255)
    coarse = soften(np.asarray(layer, dtype=np.float32) * np.float32(1 / 255), 4)
    op = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    patchy = np.clip(0.85 + 0.25 * smooth_noise(r, size, max(6, size // 12)), 0.55, 1.0)
    op = np.clip(op * 1.3, 0.0, 1.0) * patchy * np.float32(density)
    if f.severity == "severe":
        # Air bronchograms: dark branching tubes inside the consolidation.
        br = Image.new("L", (size, size), 0)
        db = ImageDraw.Draw(br)
        for x, y in centres:
            for _ in range(3):
                ang = float(r.uniform(0, 2 * math.pi))
                length = float(r.uniform(0.03, 0.06))
                db.line(
                    fr.pts([x, x + math.cos(ang) * length], [y, y + math.sin(ang) * length]),
                    fill=255,
                    width=fr.width(0.005),
                )
        op = op * (1.0 - 0.35 * layer_to_float(br, 0.5 * size / 256.0))
    return op


def atelectasis(
    f: Finding,
    r: np.random.Generator,
    fr: Frame,
    anat: Anatomy,
    base: Mapping[str, float],
    mcx: float,
) -> FloatArray:
    """Plate-like bands at the base and, when severe, a lower-lobe collapse wedge against
    the mediastinum: (H, W) in [0, 1]."""
    size = fr.size
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    tw = anat.half_width
    for side in sides_of(f.side):
        sgn = SIGN[side]
        height = base[side] - anat.apex_y
        n_bands = 1 if f.severity == "mild" and r.uniform() < 0.5 else 2
        for _ in range(n_bands):
            y = anat.apex_y + float(r.uniform(0.7, 0.86)) * height
            a0 = float(r.uniform(0.25, 0.4)) * tw
            a1 = a0 + float(r.uniform(0.3, 0.5)) * tw
            tilt = float(r.uniform(-0.02, 0.03))
            d.line(
                fr.pts([mcx + sgn * a0, mcx + sgn * a1], [y, y + tilt]),
                fill=255,
                width=fr.width(float(r.uniform(0.01, 0.016))),
            )
        if f.severity == "severe":
            top = anat.apex_y + 0.5 * height
            xs = [mcx + sgn * 0.05, mcx + sgn * 0.35 * tw, mcx + sgn * 0.05]
            ys = [top, base[side] - 0.02, base[side] + 0.02]
            d.polygon(fr.pts(xs, ys), fill=235)
    return np.clip(layer_to_float(layer, 1.2 * size / 256.0), 0.0, 1.0) * np.float32(0.85)
