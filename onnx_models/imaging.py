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
def _weights(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased linear (triangle filter) resampling matrix of shape (n_out, n_in)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.arange(n_in, dtype=np.float64)
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centers[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image to ``size`` x ``size`` (antialiased bilinear, aspect not kept:
    chest radiographs are close to square and the training data is square)."""
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
    return _weights(h, size) @ img @ _weights(w, size).T


def prepare(image: np.ndarray, size: int, mean: float, std: float) -> np.ndarray:
    """Resize, clip to [0, 1] and normalise one MONOCHROME2 image; returns float32 (size, size)."""
    out = np.clip(resize(image, size), 0.0, 1.0)
    return ((out - mean) / std).astype(np.float32)
