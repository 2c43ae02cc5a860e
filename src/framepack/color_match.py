"""Colour drift correction (``--color-match``): a section's frames get the start frame's colours.

Long videos drift: sections made far from the start frame slowly lose its saturation and shift its
hues (FramePack's paper measures this as drift, ``framepack eval``). These pure functions pull the
colour statistics of one section's decoded frames back to those of a reference frame (the start
image). They change only the written pixels: the latents the model conditions on stay as they are,
so a corrected video and an uncorrected one share every sampled section.

Methods (all deterministic: a killed-and-resumed job writes the same frames):

* ``lab``: Reinhard et al. (2001) colour transfer, per-channel mean and standard deviation moved
  to the reference's in CIELAB, where lightness and the two opponent colour axes are close to
  independent, so shifting one does not tint the others. Statistics are pooled over all the
  section's frames, so motion inside a section is kept.
* ``histogram``: per RGB channel, each value mapped to the reference's value at the same quantile
  (histogram matching). Stronger: it also fixes the shape of the distribution, and with it moves
  colours a section legitimately gained (an object entering the frame).

``lab`` is the default: on the demo model's 30 s videos (benchmarks/color_match.py, the table in
docs/generation.md "Colour drift correction") it cut the colourfulness drift from 11.7 to 1.3 on
average (``histogram``: 2.4), changed the pixels less (27.5 dB PSNR against the uncorrected video;
``histogram`` 22.7) and raised the sharpness drift less (0.17 -> 0.44; ``histogram`` 1.38).
"""

from __future__ import annotations

import numpy as np

METHODS = ("none", "lab", "histogram")  # "none": off, the default of GenerationSettings
DEFAULT_METHOD = "lab"  # what a bare --color-match means (the module docstring says why)
# A section whose colours spread far less than the reference's (a nearly flat frame) would have its
# noise amplified without bound; past this gain the spread is only partly restored.
MAX_GAIN = 3.0
_EPS = 1e-6

# sRGB (D65) <-> CIE XYZ, IEC 61966-2-1
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]], np.float32)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ).astype(np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)  # D65 reference white
_DELTA = 6 / 29  # CIELAB's linear-segment threshold


def method_problem(method: object) -> str | None:
    """One line naming a bad method, else None."""
    if method not in METHODS:
        return f"unknown colour match {method!r}; choose from {', '.join(METHODS)}"
    return None


def match_colors(frames: np.ndarray, reference: np.ndarray, method: str = DEFAULT_METHOD) -> np.ndarray:
    """``frames`` (T, H, W, 3) in [0, 255] (float or uint8) with the colours of ``reference``
    (H', W', 3) in [0, 255]: float32, same shape, in [0, 255]. ``none`` returns them unchanged."""
    problem = method_problem(method)
    if problem is not None:
        raise ValueError(problem)
    frames = np.asarray(frames)
    if method == "none":
        return frames.astype(np.float32)
    # float32: a section at 640 px is 13M pixels, float64 temporaries would take gigabytes
    source = frames.reshape(-1, 3).astype(np.float32)
    target = np.asarray(reference).reshape(-1, 3).astype(np.float32)
    if method == "lab":
        matched = lab_to_rgb(moments_transfer(rgb_to_lab(source), rgb_to_lab(target)))
    else:
        matched = np.stack([quantile_transfer(source[:, c], target[:, c]) for c in range(3)], axis=1)
    return np.clip(matched, 0, 255).reshape(frames.shape).astype(np.float32)


def moments_transfer(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, C) values whose per-channel mean and standard deviation are ``target``'s (M, C) (the
    gain capped at :data:`MAX_GAIN`)."""
    # statistics accumulated in float64: float32 sums over millions of pixels would move an
    # already matching section by a fraction of a level
    mean, std = source.mean(axis=0, dtype=np.float64), source.std(axis=0, dtype=np.float64)
    gain = np.minimum(target.std(axis=0, dtype=np.float64) / np.maximum(std, _EPS), MAX_GAIN)
    shift = target.mean(axis=0, dtype=np.float64) - mean * gain
    return source * gain.astype(source.dtype) + shift.astype(source.dtype)


def quantile_transfer(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) values mapped to ``target``'s (M,) value at the same quantile (equal values stay equal)."""
    values, counts = np.unique(source, return_counts=True)
    quantiles = (np.cumsum(counts) - counts / 2) / len(source)  # each distinct value at the middle of its run
    ordered = np.sort(target)
    mapped = np.interp(quantiles, (np.arange(len(ordered)) + 0.5) / len(ordered), ordered)
    return np.interp(source, values, mapped)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) sRGB in [0, 255] -> (N, 3) CIELAB (L in [0, 100]), D65."""
    c = rgb / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > _DELTA**3, np.cbrt(xyz), xyz / (3 * _DELTA**2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(N, 3) CIELAB -> (N, 3) sRGB in [0, 255] (not clipped: colours outside sRGB fall outside)."""
    fy = (lab[:, 0] + 16) / 116
    f = np.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], axis=1)
    xyz = np.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29)) * _WHITE
    linear = xyz @ _XYZ_TO_RGB.T
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.maximum(linear, 0) ** (1 / 2.4) - 0.055)
    return c * 255.0
