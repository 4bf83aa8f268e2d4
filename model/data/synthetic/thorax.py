"""The normal chest's soft parts: lung fields, airways and the pulmonary vessels."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from model.data.synthetic.anatomy import SIGN, Anatomy, FloatArray, Point
from model.data.synthetic.canvas import Frame, bbox, blur, layer_to_float, ramp, splat_segments
from model.data.synthetic.findings import SEVERITIES, Finding, derived_rng


def lung_shape(
    a: FloatArray,
    Y: FloatArray,
    anat: Anatomy,
    side: str,
    base: float,
    med_w: float,
    edge: float,
) -> tuple[FloatArray, FloatArray]:
    """Soft lung mask and its 'core' (0 at the edge, 1 in the middle); (H, W) each.

    ``a`` is the distance from the midline toward this lung's side. The lung is a
    superellipse (exponent 2.5) cut by the diaphragm below and the mediastinum medially.
    """
    tw = anat.half_width
    apex = anat.apex_y
    height = base - apex
    yc, ry = apex + 0.78 * height, 0.8 * height
    # Narrower toward the apex, widest at the costophrenic angles.
    t = np.clip((Y - np.float32(apex)) * np.float32(1.0 / height), 0.0, 1.2)
    widen = 0.76 + 0.24 * t
    ra = np.float32(0.5 * tw) * widen
    qa = np.abs(a - np.float32(0.52 * tw) * widen) / ra
    qy = np.abs((Y - np.float32(yc)) * np.float32(1.0 / ry))
    r = qa * qa * np.sqrt(qa) + qy * qy * np.sqrt(qy)
    core = np.clip(1.0 - r, 0.0, 1.0)
    env = ramp((1.0 - r) * ra * np.float32(1.0 / 2.5), edge)
    # Diaphragm: a dome peaking at 0.45 of the half-width, lowest at the costophrenic angle.
    a_d = 0.45 * tw
    f = (a - np.float32(a_d)) * np.float32(1.0 / (1.05 * tw - a_d))
    curve = f * f * np.where(f > 0, np.float32(1.0), np.float32(0.8))
    dia = base - anat.dome_height * np.clip(1.0 - curve, 0.0, 1.0)
    below = ramp(dia - Y, edge)
    # Mediastinum, with the aortic knob bulging into the left upper lung.
    med = med_w + 0.012 * np.clip((Y - apex) * np.float32(1.0 / height), 0.0, 1.0)
    if side == "left":
        knob_y = apex + 0.27 * height
        med = med + anat.aortic_knob * np.exp(-(((Y - knob_y) * np.float32(1 / 0.035)) ** 2))
    outside = ramp(a - med, edge)
    return env * below * outside, core


def draw_airways(fr: Frame, mcx: float, carina_y: float) -> FloatArray:
    """Trachea and main bronchi as an (H, W) layer in [0, 1]."""
    size = fr.size
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    d.line(fr.pts([mcx, mcx], [-0.05, carina_y]), fill=255, width=fr.width(0.03))
    d.line(fr.pts([mcx, mcx - 0.06], [carina_y, carina_y + 0.055]), fill=210, width=fr.width(0.02))
    d.line(fr.pts([mcx, mcx + 0.075], [carina_y, carina_y + 0.07]), fill=200, width=fr.width(0.018))
    return layer_to_float(layer, 1.2 * size / 256.0)


def draw_vessels(
    anat: Anatomy,
    fr: Frame,
    hila: Mapping[str, Point],
    edema: Finding | None,
    base: Mapping[str, float],
) -> FloatArray:
    """Branching pulmonary vessels from each hilum: (H, W) in [0, 1].

    The branching is the patient's (seeded by the anatomy), so two studies of one patient
    show the same vessel pattern. Edema blurs the vessels and adds septal (Kerley B) lines.
    """
    size = fr.size
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    rng = derived_rng(anat.vessel_seed)
    tw = anat.half_width
    levels = 5
    # Several hundred segments: drawn in one vectorised pass rather than one PIL call each.
    segments: list[tuple[npt.NDArray[np.float64], ...]] = []
    for side in ("right", "left"):
        sgn = SIGN[side]
        hx, hy = hila[side]
        d.ellipse(bbox(fr, hx + sgn * 0.01, hy, 0.02, 0.04), fill=130)
        n = int(rng.integers(7, 10))
        spread = np.linspace(-1.0, 1.0, n)
        x0 = hx + sgn * rng.uniform(0.0, 0.015, n)
        y0 = hy + 0.05 * spread + rng.normal(0.0, 0.008, n)
        ang = 1.3 * spread + rng.normal(0.0, 0.12, n)
        length = 0.06 * rng.uniform(0.85, 1.2, n)
        width = np.full(n, 0.009)
        for level in range(levels):
            x1 = x0 + sgn * np.cos(ang) * length
            y1 = y0 + np.sin(ang) * length
            segments.append((x0, y0, x1, y1, width, np.full(len(x0), (220 - 30 * level) / 255)))
            if level == levels - 1:
                break
            m = len(x1)
            # Each vessel continues with a bend and gives off a thinner side branch (most do).
            turn = rng.choice((-1.0, 1.0), m) * rng.uniform(0.35, 0.7, m)
            keep = rng.uniform(size=m) < 0.6
            x0 = np.concatenate([x1, x1[keep]])
            y0 = np.concatenate([y1, y1[keep]])
            ang = np.concatenate([ang + rng.normal(0.0, 0.25, m), (ang + turn)[keep]])
            length = np.concatenate(
                [length * rng.uniform(0.75, 0.9, m), (length * rng.uniform(0.55, 0.75, m))[keep]]
            )
            width = np.concatenate([width * 0.8, (width * 0.6)[keep]])
    sigma = 0.0
    if edema is not None:
        # Interstitial fluid makes the vessel outlines indistinct.
        sigma = 0.45 * size / 256.0 * (2.0 + SEVERITIES.index(edema.severity))
        if edema.severity != "severe":
            for side in ("right", "left"):
                sgn = SIGN[side]
                for j in range(int(rng.integers(4, 8))):
                    y = base[side] - 0.035 - 0.018 * j - float(rng.uniform(0.0, 0.01))
                    x_out = anat.cx + sgn * tw
                    x_in = x_out - sgn * float(rng.uniform(0.025, 0.045))
                    d.line(fr.pts([x_out, x_in], [y, y]), fill=200, width=fr.width(0.004))
    x0s, y0s, x1s, y1s, widths, values = (
        np.concatenate(parts) for parts in zip(*segments, strict=True)
    )
    u0, v0 = fr.px(x0s, y0s)
    u1, v1 = fr.px(x1s, y1s)
    tree = splat_segments(size, u0, v0, u1, v1, widths * size * fr.scale, values)
    vessels = np.maximum(np.asarray(layer, dtype=np.float32) * np.float32(1 / 255), tree)
    return blur(vessels, sigma)
