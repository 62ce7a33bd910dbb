"""Image preparation shared by training and the runtime (numpy only, no torch, no PIL).

The same function resizes and normalises pixels at training time and at run time, so the
model sees identical inputs in both. Pixels are 2-D float32 arrays in [0, 1], MONOCHROME2
(air dark, bone bright; DICOM PS3.3 C.7.6.3.1.2); the caller inverts MONOCHROME1 and applies
the modality/VOI LUTs before.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased linear (triangle filter) resampling as (indices, weights), both of shape
    (n_out, taps): output i = sum_t weights[i, t] * input[indices[i, t]]."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    taps = int(np.ceil(2 * support)) + 1
    first = np.floor(centers - support).astype(np.int64) + 1
    idx = first[:, None] + np.arange(taps)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs(idx - centers[:, None]) / support)
    w[(idx < 0) | (idx >= n_in)] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, n_in - 1), w.astype(np.float32)


def _resample_rows(img: np.ndarray, n_out: int) -> np.ndarray:
    idx, w = _taps(img.shape[0], n_out)
    return np.einsum("otc,ot->oc", img[idx], w)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image to ``size`` x ``size`` (antialiased bilinear, aspect not kept:
    chest radiographs are close to square and the training data is square).

    Implemented with gathers and small element-wise products (no BLAS call), so it stays fast
    and single-threaded on a busy CPU."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    # cheap integer pre-reduction for very large images (box filter), then exact resampling
    while h >= 4 * size and w >= 4 * size and h % 2 == 0 and w % 2 == 0:
        img = 0.25 * (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2])
        h, w = img.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(img)
    rows = _resample_rows(img, size)  # (size, w)
    return np.ascontiguousarray(_resample_rows(rows.T, size).T)


def prepare(image: np.ndarray, size: int, mean: float, std: float) -> np.ndarray:
    """Resize, clip to [0, 1] and normalise one MONOCHROME2 image; returns float32 (size, size)."""
    out = np.clip(resize(image, size), 0.0, 1.0)
    return ((out - mean) / std).astype(np.float32)
