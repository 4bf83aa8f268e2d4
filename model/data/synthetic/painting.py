"""The painter: a study's plan → a uint8 radiograph and the geometry of what was drawn.

It works in attenuation (bright = dense, as displayed in MONOCHROME2): soft tissue adds,
air in the lungs subtracts, bones add; the findings are layered on region by region
(:data:`model.data.synthetic.findings.FINDINGS`), then exposure, film response and noise
turn attenuation into pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from model.data.synthetic.anatomy import (
    SIGN,
    Acquisition,
    Anatomy,
    BoolArray,
    FloatArray,
    Geometry,
    Point,
)
from model.data.synthetic.canvas import Frame, blur, disc_mask, ramp, smooth_noise
from model.data.synthetic.findings import (
    AIRSPACE,
    FINDINGS,
    Finding,
    derived_rng,
    sides_of,
)
from model.data.synthetic.lesions import atelectasis, collapsed_lung, edema, effusion, pneumonia
from model.data.synthetic.skeleton import draw_bones
from model.data.synthetic.thorax import draw_airways, draw_vessels, lung_shape

if TYPE_CHECKING:
    from model.data.synthetic.study import Plan

_LUNG_DARKNESS: Final = 0.44  # attenuation removed by a full-thickness lung


@dataclass
class _Scene:
    """What the layers of one image share: the frame, the findings and the landmarks."""

    fr: Frame
    anat: Anatomy
    by_label: dict[str, Finding]
    shape_seed: int
    base: dict[str, float]  # each costophrenic angle's height
    mcx: float  # the mediastinum's x, shifted toward a collapsed lobe
    ctr: float  # the cardiothoracic ratio drawn
    heart_height: float

    @property
    def edge(self) -> float:
        """Width of an anti-aliased edge, in patient units."""
        return self.fr.px_len * 1.2

    def shape_rng(self, label: str) -> np.random.Generator:
        return derived_rng(self.shape_seed, label)


@dataclass
class _Lungs:
    """Both lungs, each an (H, W) layer keyed by side, and the pneumothorax's space."""

    outline: dict[str, FloatArray] = field(default_factory=dict)
    tissue: dict[str, FloatArray] = field(default_factory=dict)  # parenchyma and markings
    air: dict[str, FloatArray] = field(default_factory=dict)
    hila: dict[str, Point] = field(default_factory=dict)
    ptx_space: FloatArray | None = None
    pleural_line: FloatArray | None = None


def paint(plan: Plan, size: int) -> tuple[npt.NDArray[np.uint8], Geometry]:
    """Render a plan into a uint8 (size, size) image and the geometry of what was drawn."""
    fr = Frame(plan.acquisition, size)
    scene = _landmarks(plan, fr)
    masks: dict[str, BoolArray] = {}
    heart, heart_w, heart_cy = _heart(scene)
    body, thick, atten = _body(scene)
    lungs = _lungs(scene, masks)
    behind_heart = 1.0 - 0.92 * heart
    lung_air = (lungs.air["right"] + lungs.air["left"]) * behind_heart
    lung_any = np.clip(lungs.outline["right"] + lungs.outline["left"], 0.0, 1.0)
    tissue_any = np.clip(lungs.tissue["right"] + lungs.tissue["left"], 0.0, 1.0) * behind_heart
    # Heart, mediastinum and upper abdomen are one water-dense mass: no edge between them.
    atten = atten + 0.08 * body * thick * thick * (1.0 - lung_any * (1.0 - heart))
    atten = atten - _LUNG_DARKNESS * lung_air
    if lungs.ptx_space is not None and lungs.pleural_line is not None:
        atten = atten - 0.05 * lungs.ptx_space + 0.12 * np.clip(lungs.pleural_line, 0.0, 1.0)
    atten = _soft_tissue(scene, atten, body, lung_any)
    carina_y = scene.anat.apex_y + 0.33 * (scene.anat.base_y - scene.anat.apex_y)
    airway = draw_airways(fr, scene.mcx, carina_y)
    atten = atten - 0.14 * airway * body
    vessels = draw_vessels(scene.anat, fr, lungs.hila, scene.by_label.get("Edema"), scene.base)
    # Lung texture down to a few pixels: the fine markings whose absence shows a pneumothorax.
    tex_rng = derived_rng(plan.texture_seed)
    parenchyma = 0.4 * smooth_noise(tex_rng, size, max(4, size // 10)) + 0.6 * smooth_noise(
        tex_rng, size, max(8, size // 3)
    )
    markings = tissue_any * (0.11 * vessels + 0.06 * parenchyma)
    opacity, atten = _opacities(scene, lungs, heart, lung_any, atten, masks)
    clear = lung_any
    if opacity is None:
        atten = atten + markings
    else:
        # Fluid and exudate hide the vessels and the bones behind them.
        atten = atten + opacity * (_LUNG_DARKNESS * lung_air + 0.03 * lung_any)
        atten = atten + markings * (1.0 - 0.8 * opacity)
        clear = lung_any * (1.0 - 0.8 * opacity)
    # Bones: seen best against aerated lung, faintly through fluid and soft tissue.
    fracture = scene.by_label.get("Fracture")
    back, front, collar, fracture_points = draw_bones(
        scene.anat, fr, scene.mcx, fracture, scene.shape_rng
    )
    atten = atten + (0.06 + 0.09 * clear) * back + (0.02 + 0.035 * clear) * front
    atten = atten + 0.18 * collar
    out = _expose(atten, plan.acquisition, fr, derived_rng(plan.noise_seed))
    masks["lungs"] = lung_any > 0.5
    masks["heart"] = heart > 0.5
    if "Cardiomegaly" in scene.by_label:
        masks["Cardiomegaly"] = masks["heart"]
    if fracture_points:
        masks["Fracture"] = disc_mask(size, fracture_points, 0.035 * size * fr.scale)
    return out, _geometry(scene, heart_w, heart_cy, lungs, fracture_points, masks)


def _landmarks(plan: Plan, fr: Frame) -> _Scene:
    """Heart size, diaphragm heights and the mediastinum's position, findings included."""
    anat, acq = plan.anatomy, plan.acquisition
    by_label = {f.label: f for f in plan.findings}
    scene = _Scene(fr, anat, by_label, plan.shape_seed, {}, anat.cx, 0.0, anat.heart_height)
    ctr = anat.cardiothoracic_ratio
    shift = 0.0  # mediastinal shift toward a collapsed lobe, in patient x
    elevation = {"right": 0.0, "left": 0.0}
    if "Cardiomegaly" in by_label:
        low, high = {"mild": (0.53, 0.57), "moderate": (0.58, 0.63), "severe": (0.64, 0.71)}[
            by_label["Cardiomegaly"].severity
        ]
        ctr = float(scene.shape_rng("Cardiomegaly").uniform(low, high))
        scene.heart_height *= 1.0 + 0.8 * (ctr - anat.cardiothoracic_ratio)
    collapse = by_label.get("Atelectasis")
    if collapse is not None and collapse.severity != "mild":
        r = scene.shape_rng("Atelectasis volume")
        lift = r.uniform(0.035, 0.055) if collapse.severity == "moderate" else r.uniform(0.05, 0.07)
        for side in sides_of(collapse.side):
            elevation[side] = float(lift)
        if collapse.severity == "severe" and collapse.side != "bilateral":
            shift = SIGN[collapse.side] * float(r.uniform(0.012, 0.022))
    scene.base = {
        "right": anat.base_y + acq.inspiration - elevation["right"],
        "left": anat.base_y + acq.inspiration + anat.left_base_drop - elevation["left"],
    }
    scene.mcx = anat.cx + shift
    scene.ctr = ctr
    return scene


def _heart(scene: _Scene) -> tuple[FloatArray, float, float]:
    """The cardiac silhouette (H, W), its width and its centre's height (patient units).

    An ellipse with different extents to either side, sitting on the diaphragm.
    """
    fr, anat, mcx, heart_height = scene.fr, scene.anat, scene.mcx, scene.heart_height
    X, Y = fr.X, fr.Y
    heart_w = scene.ctr * 2.0 * anat.half_width
    w_right = heart_w * anat.heart_right_fraction
    w_left = heart_w - w_right
    # Widest just above the domes, so that both cardiophrenic angles show against lung.
    heart_cy = min(scene.base.values()) - anat.dome_height - 0.035
    # Computed inside its bounding box only: most of the image is far from the heart.
    hwin = fr.window(
        mcx - w_right - 0.01,
        mcx + w_left + 0.01,
        heart_cy - heart_height - 0.01,
        heart_cy + heart_height + 0.01,
    )
    Xh, Yh = X[hwin], Y[hwin]
    semi = np.where(mcx > Xh, np.float32(w_right), np.float32(w_left))
    rh = ((Xh - mcx) / semi) ** 2 + ((Yh - heart_cy) * np.float32(1.0 / heart_height)) ** 2
    heart = np.zeros_like(X)
    heart[hwin] = ramp((1.0 - rh) * np.float32(min(w_right, w_left) * 0.5), scene.edge)
    return heart, heart_w, heart_cy


def _body(scene: _Scene) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(body outline, relative thickness, attenuation) of the chest wall and soft tissue,
    widening into the shoulders and thicker in the middle; (H, W) each."""
    anat, X, Y = scene.anat, scene.fr.X, scene.fr.Y
    shoulder_w = anat.shoulder * np.clip((0.22 - Y) * np.float32(1 / 0.22), 0.0, 1.0) ** 2
    body_hw = anat.half_width + anat.soft_tissue + shoulder_w
    ax = np.abs(X - anat.cx)
    body = ramp(body_hw - ax, 2.0 * scene.edge)
    thick = np.sqrt(np.clip(1.0 - (ax / body_hw) ** 2, 0.0, 1.0))
    atten = body * (0.12 + 0.48 * thick)  # (H, W)
    return body, thick, atten


def _lungs(scene: _Scene, masks: dict[str, BoolArray]) -> _Lungs:
    """Both lungs, one of them collapsed away from the chest wall by a pneumothorax."""
    fr, anat, mcx = scene.fr, scene.anat, scene.mcx
    X, Y = fr.X, fr.Y
    tw, apex, med_w = anat.half_width, anat.apex_y, anat.mediastinum_half_width
    ptx = scene.by_label.get("Pneumothorax")
    lungs = _Lungs()
    for side in ("right", "left"):
        sgn, base = SIGN[side], scene.base[side]
        # Each lung is computed inside its bounding box only; zero outside.
        win = fr.window(mcx + sgn * (med_w - 0.02), mcx + sgn * 1.15 * tw, apex - 0.03, base + 0.03)
        a = sgn * (X[win] - mcx)  # distance from the midline toward this side
        lung_w, core = lung_shape(a, Y[win], anat, side, base, med_w, scene.edge)
        depth = 0.45 + 0.55 * np.sqrt(core)
        outline, tissue, air = (np.zeros_like(X) for _ in range(3))
        lungs.outline[side], lungs.tissue[side], lungs.air[side] = outline, tissue, air
        outline[win] = lung_w
        lungs.hila[side] = (
            mcx + sgn * (med_w + 0.035),
            apex + (0.47 if side == "right" else 0.43) * (base - apex),
        )
        if ptx is None or ptx.side != side:
            tissue[win] = lung_w
            air[win] = lung_w * depth
            continue
        collapsed = collapsed_lung(a, Y[win], anat, side, base, med_w, ptx, fr)
        collapsed = collapsed * lung_w
        lungs.ptx_space, lungs.pleural_line = np.zeros_like(X), np.zeros_like(X)
        lungs.ptx_space[win] = np.clip(lung_w - collapsed, 0.0, 1.0)
        lungs.pleural_line[win] = 4.0 * collapsed * (1.0 - collapsed) * lung_w
        tissue[win] = collapsed
        # The collapsed lung holds less air, so it is a little denser.
        k = {"mild": 0.1, "moderate": 0.18, "severe": 0.3}[ptx.severity]
        air[win] = lung_w * depth * (1.0 - k * collapsed)
        masks["Pneumothorax"] = lungs.ptx_space > 0.5
    return lungs


def _soft_tissue(
    scene: _Scene, atten: FloatArray, body: FloatArray, lung_any: FloatArray
) -> FloatArray:
    """``atten`` with the breasts, the gastric bubble and the spine added."""
    anat, mcx, base = scene.anat, scene.mcx, scene.base
    X, Y = scene.fr.X, scene.fr.Y
    tw = anat.half_width
    if anat.breast > 0:
        for side in ("right", "left"):
            bx = mcx + SIGN[side] * 0.62 * tw
            by = base[side] - 0.07
            d = ((X - bx) * np.float32(1 / 0.19)) ** 2 + ((Y - by) * np.float32(1 / 0.13)) ** 2
            atten = atten + anat.breast * ramp(1.0 - d, 0.6) * body
    if anat.gastric_bubble > 0:
        gx = mcx + 0.5 * tw
        gy = base["left"] - anat.dome_height + 0.06
        gw = 0.04 + 0.03 * anat.gastric_bubble
        d = ((X - gx) * np.float32(1 / gw)) ** 2 + ((Y - gy) * np.float32(1 / 0.026)) ** 2
        atten = atten - 0.1 * ramp(1.0 - d, 0.4) * (1.0 - lung_any)
    # Spine: vertebral bodies and disc spaces, seen through the mediastinum.
    spine_band = ramp(0.028 - np.abs(X - mcx), 2.0 * scene.edge)
    phase = (Y - anat.apex_y) * np.float32(2 * math.pi / anat.rib_spacing)
    discs = 0.75 + 0.25 * np.clip(2.5 * np.cos(phase) + 1.5, 0.0, 1.0)
    return atten + 0.05 * spine_band * discs * body


# --------------------------------------------------------------------------- opacities

#: An airspace finding's layer, from its finding, scene and lungs: (layer, mask threshold).
_OpacityPainter = Callable[[Finding, _Scene, _Lungs], tuple[FloatArray, float]]


def _paint_effusion(f: Finding, scene: _Scene, lungs: _Lungs) -> tuple[FloatArray, float]:
    r = scene.shape_rng(f.label)
    fr = scene.fr
    return effusion(f, r, fr.X, fr.Y, scene.anat, scene.base, scene.mcx, lungs.outline), 0.5


def _paint_pneumonia(f: Finding, scene: _Scene, lungs: _Lungs) -> tuple[FloatArray, float]:
    pn = pneumonia(f, scene.shape_rng(f.label), scene.fr, scene.anat, scene.base, scene.mcx)
    return pn * np.clip(sum(lungs.outline[side] for side in sides_of(f.side)), 0.0, 1.0), 0.25


def _paint_edema(f: Finding, scene: _Scene, lungs: _Lungs) -> tuple[FloatArray, float]:
    fr = scene.fr
    haze = edema(f, scene.shape_rng(f.label), fr.X, fr.Y, lungs.hila, lungs.outline, fr.size)
    return haze, 0.25


def _paint_atelectasis(f: Finding, scene: _Scene, lungs: _Lungs) -> tuple[FloatArray, float]:
    band = atelectasis(f, scene.shape_rng(f.label), scene.fr, scene.anat, scene.base, scene.mcx)
    return band, 0.3


_OPACITY_PAINTERS: Final[dict[str, _OpacityPainter]] = {
    "Pleural Effusion": _paint_effusion,
    "Pneumonia": _paint_pneumonia,
    "Edema": _paint_edema,
    "Atelectasis": _paint_atelectasis,
}


def _opacities(
    scene: _Scene,
    lungs: _Lungs,
    heart: FloatArray,
    lung_any: FloatArray,
    atten: FloatArray,
    masks: dict[str, BoolArray],
) -> tuple[FloatArray | None, FloatArray]:
    """(the airspace findings' opacity or None, ``atten``): they fill the air spaces, so
    they brighten a lung up to, not beyond, soft tissue."""
    opacity: FloatArray | None = None
    for kind in FINDINGS:
        finding = scene.by_label.get(kind.label)
        if kind.region != AIRSPACE or finding is None:
            continue
        label = kind.label
        layer, threshold = _OPACITY_PAINTERS[label](finding, scene, lungs)
        if label == "Atelectasis":
            # Behind the heart a collapsed lobe shows as added density rather than lost air.
            atten = atten + 0.05 * layer * heart
            layer = layer * lung_any
        opacity = layer if opacity is None else np.maximum(opacity, layer)
        masks[label] = layer > threshold
    return opacity, atten


# --------------------------------------------------------------------------- film


def _expose(
    atten: FloatArray, acq: Acquisition, fr: Frame, noise_rng: np.random.Generator
) -> npt.NDArray[np.uint8]:
    """Exposure, film response, unsharpness and quantum noise: attenuation → uint8 (H, W)."""
    size = fr.size
    img = (atten - np.float32(acq.window_low)) * np.float32(
        1.0 / (acq.window_high - acq.window_low)
    )
    img = np.clip(img, 0.0, 1.0) ** np.float32(acq.gamma)
    img = img * (1.0 + np.float32(acq.heel) * (fr.Y - 0.5))
    img = blur(img, acq.blur_px * size / 256.0)
    img = img + noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(acq.noise)
    return np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)  # (H, W)


def _geometry(
    scene: _Scene,
    heart_w: float,
    heart_cy: float,
    lungs: _Lungs,
    fracture_points: tuple[Point, ...],
    masks: dict[str, BoolArray],
) -> Geometry:
    fr, anat, mcx, base = scene.fr, scene.anat, scene.mcx, scene.base
    tw = anat.half_width
    px_per_unit = fr.size * fr.scale
    centre = fr.to_px(mcx, heart_cy)
    return Geometry(
        cardiothoracic_ratio=heart_w / (2.0 * tw),
        heart_width=heart_w * px_per_unit,
        thorax_width=2.0 * tw * px_per_unit,
        heart_row=centre[1],
        midline_x=centre[0],
        costophrenic_angles={s: fr.to_px(mcx + SIGN[s] * tw, base[s]) for s in SIGN},
        diaphragm_domes={
            s: fr.to_px(mcx + SIGN[s] * 0.45 * tw, base[s] - anat.dome_height) for s in SIGN
        },
        hila={s: fr.to_px(*lungs.hila[s]) for s in SIGN},
        fracture_points=fracture_points,
        masks=masks,
    )
