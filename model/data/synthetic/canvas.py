"""Raster primitives of the painter: the patient-to-pixel frame, soft edges, blurs, noise.

All layers are float32 (H, W) arrays; drawing with PIL happens on 8-bit layers that
:func:`layer_to_float` turns into floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image

from model.data.synthetic.anatomy import Acquisition, BoolArray, FloatArray, Point


@lru_cache(maxsize=8)
def unit_grid(size: int) -> tuple[FloatArray, FloatArray]:
    """Pixel-centre coordinates of a (size, size) image in the unit square: (H, W) each."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(axis, axis)
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


def ramp(x: FloatArray, width: float) -> FloatArray:
    """Soft step 0→1 over ``width`` around x = 0, for anti-aliased edges; same shape as x."""
    return np.clip(x * np.float32(1.0 / width) + np.float32(0.5), 0.0, 1.0)


def soften(arr: FloatArray, passes: int) -> FloatArray:
    """``passes`` separable [1, 2, 1] / 4 smoothings (each adds 0.5 px² of variance)."""
    out = np.array(arr, dtype=np.float32)
    tmp = np.empty_like(out)
    for _ in range(passes):
        # In place, to spare allocations: tmp holds the neighbours' sum, out the result.
        np.add(out[:-2], out[2:], out=tmp[1:-1])
        tmp[1:-1] *= 0.5
        tmp[1:-1] += out[1:-1]
        out[1:-1] = tmp[1:-1]
        out[1:-1] *= 0.5
        np.add(out[:, :-2], out[:, 2:], out=tmp[:, 1:-1])
        tmp[:, 1:-1] *= 0.5
        tmp[:, 1:-1] += out[:, 1:-1]
        out[:, 1:-1] = tmp[:, 1:-1]
        out[:, 1:-1] *= 0.5
    return out


def blur(arr: FloatArray, sigma: float) -> FloatArray:
    """Approximate Gaussian blur of an (H, W) float array; sigma in pixels."""
    if sigma < 0.35:
        return arr
    passes = round(2.0 * sigma * sigma)
    if passes <= 6:
        return soften(arr, max(1, passes))
    # Wide blurs: average down, smooth, and come back up (cheap, and smooth enough).
    factor = max(2, int(sigma / 1.2))
    h, w = arr.shape
    small = Image.fromarray(arr).reduce(factor)
    small_arr = soften(np.asarray(small, dtype=np.float32), 2)
    back = Image.fromarray(small_arr).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(back, dtype=np.float32)


def layer_to_float(layer: Image.Image, sigma: float) -> FloatArray:
    """A drawn 8-bit layer as (H, W) floats in [0, 1], blurred by ``sigma`` pixels."""
    return blur(np.asarray(layer, dtype=np.float32) * np.float32(1.0 / 255.0), sigma)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> FloatArray:
    """Band-limited noise of roughly unit spread: (size, size)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


class Frame:
    """Maps the patient frame (unit square, anatomy coordinates) to pixels and back."""

    def __init__(self, acq: Acquisition, size: int) -> None:
        self.size = size
        self.c = math.cos(acq.rotation)
        self.s = math.sin(acq.rotation)
        self.scale = acq.scale
        self.sx = acq.shift_x
        self.sy = acq.shift_y
        self.ap = acq.view_position.upper() == "AP"
        u, v = unit_grid(size)
        du = u - np.float32(0.5 + self.sx)
        dv = v - np.float32(0.5 + self.sy)
        inv = np.float32(1.0 / self.scale)
        c, s = np.float32(self.c), np.float32(self.s)
        self.X: FloatArray = 0.5 + (c * du + s * dv) * inv  # (H, W) patient x
        self.Y: FloatArray = 0.5 + (c * dv - s * du) * inv  # (H, W) patient y
        self.px_len = 1.0 / (size * self.scale)  # one pixel in patient units

    def to_px(self, x: float, y: float) -> Point:
        dx, dy = x - 0.5, y - 0.5
        u = 0.5 + self.sx + self.scale * (self.c * dx - self.s * dy)
        v = 0.5 + self.sy + self.scale * (self.s * dx + self.c * dy)
        return (u * self.size - 0.5, v * self.size - 0.5)

    def px(
        self, xs: npt.ArrayLike, ys: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Patient coordinates to pixel coordinates, elementwise: any shape in, same out."""
        dx = np.asarray(xs, dtype=np.float64) - 0.5
        dy = np.asarray(ys, dtype=np.float64) - 0.5
        u = (0.5 + self.sx + self.scale * (self.c * dx - self.s * dy)) * self.size - 0.5
        v = (0.5 + self.sy + self.scale * (self.s * dx + self.c * dy)) * self.size - 0.5
        return u, v

    def pts(self, xs: npt.ArrayLike, ys: npt.ArrayLike) -> list[Point]:
        """Patient points (N,) + (N,) -> N pixel points, as PIL wants them."""
        u, v = self.px(xs, ys)
        return list(zip(u.tolist(), v.tolist(), strict=True))

    def width(self, w: float) -> int:
        return max(1, round(w * self.size * self.scale))

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """The pixel rectangle (rows, cols) that holds a patient-frame box."""
        corners = self.pts([x0, x1, x0, x1], [y0, y0, y1, y1])
        xs = [p[0] for p in corners]
        ys = [p[1] for p in corners]
        c0 = max(0, math.floor(min(xs)) - 2)
        c1 = min(self.size, math.ceil(max(xs)) + 3)
        r0 = max(0, math.floor(min(ys)) - 2)
        r1 = min(self.size, math.ceil(max(ys)) + 3)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def splat_segments(
    size: int,
    x0: npt.NDArray[np.float64],
    y0: npt.NDArray[np.float64],
    x1: npt.NDArray[np.float64],
    y1: npt.NDArray[np.float64],
    width: npt.NDArray[np.float64],
    value: npt.NDArray[np.float64],
) -> FloatArray:
    """Rasterise N line segments (pixel coordinates and widths, (N,) each) into a
    (size, size) layer, keeping the largest value where segments cross."""
    dx, dy = x1 - x0, y1 - y0
    length = np.maximum(np.hypot(dx, dy), 1e-6)
    steps = np.ceil(length / 0.5).astype(np.int64) + 1  # samples every half pixel
    seg = np.repeat(np.arange(len(x0)), steps)
    first = np.repeat(np.cumsum(steps) - steps, steps)
    t = (np.arange(seg.size) - first) / np.maximum(steps[seg] - 1, 1)
    px = x0[seg] + t * dx[seg]
    py = y0[seg] + t * dy[seg]
    nx, ny = (-dy / length)[seg], (dx / length)[seg]
    half = (width[seg] - 1.0) / 2.0
    out = np.zeros((size, size), dtype=np.float32)
    for offset in (0.0, -0.5, 0.5, -1.0, 1.0):
        keep = half >= abs(offset) - 1e-9
        ix = np.rint(px[keep] + offset * nx[keep]).astype(np.int64)
        iy = np.rint(py[keep] + offset * ny[keep]).astype(np.int64)
        inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
        np.maximum.at(out, (iy[inside], ix[inside]), value[seg][keep][inside].astype(np.float32))
    return out


def bbox(fr: Frame, x: float, y: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    px, py = fr.to_px(x, y)
    sx, sy = rx * fr.size * fr.scale, ry * fr.size * fr.scale
    return (px - sx, py - sy, px + sx, py + sy)


def disc_mask(size: int, points: Sequence[Point], radius: float) -> BoolArray:
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), dtype=bool)
    for x, y in points:
        mask |= (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
    return mask
