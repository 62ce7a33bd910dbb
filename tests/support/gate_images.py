"""Images the input gate must refuse: real films from ../shared/data, and built non-chest images.

The real films (nine chest radiographs: ``dicom_samples/`` and ``real_cxr/``) are read only by
tests; the product does not ship them. The built images stand for what a mis-routed study
brings: a CT and an MR slice (pydicom's test files), hand and knee radiographs (drawn: bones
bright on dark air, with film grain) and photographs (a 1/f-noise texture and a drawn outdoor
scene, converted to grey). All are 2-D float32 MONOCHROME2 arrays in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFilter
from pydicom.data import get_testdata_file

from plugin.drafting.pixels import prepare

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
REAL_DICOM = sorted((SHARED / "dicom_samples").glob("*.dcm")) + sorted((SHARED / "real_cxr").glob("*.dcm"))
REAL_PICTURES = sorted((SHARED / "real_cxr").glob("*.png")) + sorted((SHARED / "real_cxr").glob("*.jpg"))


def real_films() -> dict[str, np.ndarray]:
    """Every real chest film at hand (name -> pixels), decoded as the node decodes them."""
    out = {p.name: prepare(pydicom.dcmread(p)).array for p in REAL_DICOM}
    out.update({p.name: np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in REAL_PICTURES})
    return out


def _grain(img: np.ndarray, seed: int, amount: float = 0.03) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0.0, amount, img.shape), 0.0, 1.0).astype(np.float32)


def hand_radiograph(size: int = 512) -> np.ndarray:
    """A PA hand: soft-tissue silhouette, five rays of phalanges and metacarpals, carpals."""
    im = Image.new("L", (size, size), 13)
    d = ImageDraw.Draw(im)
    s = size / 512
    d.ellipse([140 * s, 250 * s, 380 * s, 470 * s], fill=89)  # palm soft tissue
    for i, (x, top) in enumerate([(110, 230), (170, 60), (240, 40), (305, 60), (365, 110)]):
        d.rounded_rectangle([(x - 22) * s, top * s, (x + 22) * s, 330 * s], radius=18 * s, fill=89)
        y = top + 10
        for seg in range(3 if i else 2):
            length = 55 - 8 * seg
            d.rounded_rectangle([(x - 11) * s, y * s, (x + 11) * s, (y + length) * s], radius=6 * s, fill=217)
            y += length + 8
        d.rounded_rectangle([(x - 12) * s, (y + 5) * s, (x + 12) * s, (y + 95) * s], radius=7 * s, fill=204)
    for cx in range(180, 340, 32):
        d.ellipse([(cx - 14) * s, 410 * s, (cx + 14) * s, 440 * s], fill=204)
    blurred = im.filter(ImageFilter.GaussianBlur(2 * s))
    return _grain(np.asarray(blurred, dtype=np.float32) / 255.0, 1)


def knee_radiograph(size: int = 512) -> np.ndarray:
    """An AP knee: femur above, tibia and fibula below, a joint space between."""
    im = Image.new("L", (size, size), 13)
    d = ImageDraw.Draw(im)
    s = size / 512
    d.rectangle([120 * s, 0, 392 * s, size], fill=76)  # soft tissue
    d.rectangle([200 * s, 0, 312 * s, 200 * s], fill=204)  # femoral shaft
    d.ellipse([160 * s, 150 * s, 352 * s, 245 * s], fill=217)  # condyles
    d.rectangle([170 * s, 262 * s, 342 * s, 300 * s], fill=217)  # tibial plateau
    d.rectangle([205 * s, 300 * s, 300 * s, size], fill=204)  # tibial shaft
    d.rectangle([320 * s, 300 * s, 345 * s, size], fill=178)  # fibula
    blurred = im.filter(ImageFilter.GaussianBlur(3 * s))
    return _grain(np.asarray(blurred, dtype=np.float32) / 255.0, 2)


def texture_photograph(size: int = 512) -> np.ndarray:
    """A 1/f ("natural image") noise texture, the spectrum of photographs."""
    rng = np.random.default_rng(3)
    f = np.fft.fftfreq(size)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / radius
    img = np.real(np.fft.ifft2(spectrum))
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def scene_photograph(size: int = 512) -> np.ndarray:
    """A drawn outdoor scene in grey: sky gradient, sun, hills, a house."""
    sky = np.tile(np.linspace(0.85, 0.55, size, dtype=np.float32)[:, None], (1, size))
    im = Image.fromarray(sky, mode="F")
    d = ImageDraw.Draw(im)
    s = size / 512
    d.ellipse([380 * s, 40 * s, 460 * s, 120 * s], fill=255)
    d.polygon([(0, 330 * s), (150 * s, 250 * s), (320 * s, 320 * s), (512 * s, 260 * s), (512 * s, 512 * s),
               (0, 512 * s)], fill=89)
    d.rectangle([90 * s, 330 * s, 210 * s, 430 * s], fill=153)
    d.polygon([(80 * s, 330 * s), (150 * s, 280 * s), (220 * s, 330 * s)], fill=51)
    d.rectangle([135 * s, 380 * s, 165 * s, 430 * s], fill=26)
    return _grain(np.asarray(im, dtype=np.float32), 4, 0.02)


def ct_slice() -> np.ndarray:
    return prepare(pydicom.dcmread(get_testdata_file("CT_small.dcm"))).array


def mr_slice() -> np.ndarray:
    return prepare(pydicom.dcmread(get_testdata_file("MR_small.dcm"))).array


def non_chest_images() -> dict[str, np.ndarray]:
    return {"CT slice": ct_slice(), "MR slice": mr_slice(), "hand radiograph": hand_radiograph(),
            "knee radiograph": knee_radiograph(), "1/f photograph": texture_photograph(),
            "scene photograph": scene_photograph()}
