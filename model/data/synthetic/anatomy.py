"""A patient's body and a study's acquisition, drawn at random, and where they land.

Lengths are in the patient frame, where the image is the unit square; ``side`` is always
the patient's side (on a frontal film the patient's right is on the viewer's left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

# float32 at run time; typed loosely because numpy widens scalar arithmetic in its stubs.
FloatArray = npt.NDArray[np.floating[Any]]
BoolArray = npt.NDArray[np.bool_]
Point = tuple[float, float]

#: The x direction of each side of the patient, seen on a frontal film.
SIGN: Final[dict[str, float]] = {"right": -1.0, "left": 1.0}


@dataclass(frozen=True)
class Anatomy:
    """One patient's body, in a patient frame where the image is the unit square.

    Lengths are fractions of the image side; ``cx`` is the midline, ``half_width`` the inner
    thoracic half-width at the costophrenic angles, ``apex_y``/``base_y`` the heights of the
    lung apices and of the right costophrenic angle. Studies of one patient share it.
    """

    cx: float
    half_width: float
    apex_y: float
    base_y: float
    left_base_drop: float
    dome_height: float
    cardiothoracic_ratio: float
    heart_right_fraction: float
    heart_height: float
    mediastinum_half_width: float
    aortic_knob: float
    rib_y0: float
    rib_spacing: float
    soft_tissue: float
    shoulder: float
    gastric_bubble: float
    breast: float
    vessel_seed: int


@dataclass(frozen=True)
class Acquisition:
    """How one study was taken: view, patient position, exposure and film response."""

    view_position: str
    shift_x: float
    shift_y: float
    rotation: float  # radians
    scale: float
    inspiration: float  # added to the diaphragm height; positive = deeper breath
    gamma: float
    window_low: float
    window_high: float
    noise: float
    blur_px: float
    heel: float


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where the anatomy and the findings landed, in pixels (x to the right, y down).

    ``thorax_width`` is the inner thoracic diameter at the costophrenic angles and
    ``heart_width`` the widest transverse diameter of the cardiac silhouette (at
    ``heart_row``), so ``cardiothoracic_ratio`` is the rendered CTR. Points are keyed by the
    patient's side. ``masks`` holds boolean (H, W) arrays: "lungs", "heart", and one per
    rendered finding label marking where it changed the image.
    """

    cardiothoracic_ratio: float
    heart_width: float
    thorax_width: float
    heart_row: float
    midline_x: float
    costophrenic_angles: dict[str, Point]
    diaphragm_domes: dict[str, Point]
    hila: dict[str, Point]
    fracture_points: tuple[Point, ...]
    masks: dict[str, BoolArray]


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy."""
    u = rng.uniform
    apex = u(0.10, 0.15)
    base = u(0.76, 0.82)
    return Anatomy(
        cx=float(0.5 + np.clip(rng.normal(0.0, 0.008), -0.02, 0.02)),
        half_width=u(0.33, 0.385),
        apex_y=apex,
        base_y=base,
        left_base_drop=u(0.0, 0.025),
        dome_height=u(0.05, 0.085),
        cardiothoracic_ratio=u(0.38, 0.47),
        heart_right_fraction=u(0.28, 0.37),
        heart_height=u(0.13, 0.17),
        mediastinum_half_width=u(0.042, 0.06),
        aortic_knob=u(0.012, 0.03),
        rib_y0=apex - u(0.0, 0.025),
        rib_spacing=(base - apex) / 10.0 * u(0.93, 1.05),
        soft_tissue=u(0.06, 0.11),
        shoulder=u(0.04, 0.12),
        gastric_bubble=u(0.0, 1.0) if u() < 0.6 else 0.0,
        breast=u(0.03, 0.08) if u() < 0.4 else 0.0,
        vessel_seed=int(rng.integers(0, 2**62)),
    )


def sample_acquisition(rng: np.random.Generator, view_position: str | None) -> Acquisition:
    u = rng.uniform
    view = view_position if view_position is not None else ("PA" if u() < 0.5 else "AP")
    ap = view.upper() == "AP"
    return Acquisition(
        view_position=view,
        shift_x=u(-0.025, 0.025),
        shift_y=u(-0.02, 0.03),
        rotation=math.radians(float(np.clip(rng.normal(0.0, 2.0), -5.0, 5.0))),
        scale=u(0.93, 1.03) * (1.03 if ap else 1.0),
        inspiration=u(-0.06, -0.015) if ap else u(-0.015, 0.02),
        gamma=u(0.8, 1.25),
        window_low=u(-0.03, 0.03),
        window_high=u(0.8, 0.9),
        noise=u(0.01, 0.022) if ap else u(0.006, 0.016),
        blur_px=u(0.4, 0.9),
        heel=u(-0.06, 0.06),
    )
