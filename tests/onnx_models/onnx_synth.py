"""Synthetic data for the model tests: a tiny dataset in the cxrnode layout."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

REPORTS = [
    ("The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
     "No acute cardiopulmonary abnormality."),
    ("Cardiomegaly. Small right pleural effusion. No pneumothorax.", "Cardiomegaly with right effusion."),
    ("Right lower lobe opacity, which may represent pneumonia. Heart size normal.",
     "Right lower lobe pneumonia."),
    ("", "Normal chest."),
]


def synthetic_image(lateral: bool, seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.uniform(0.0, 0.2, (size, size))
    if lateral:
        img[:, size // 3 : size // 2] += 0.6  # a bright vertical band
    else:
        img[size // 3 : size // 2, :] += 0.6  # a bright horizontal band
    return np.clip(img, 0, 1).astype(np.float32)


def make_dataset(root: Path, n_train: int = 12, n_val: int = 6) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rnd = random.Random(0)
    with open(root / "studies.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n_train + n_val):
            findings, impression = REPORTS[i % len(REPORTS)]
            images = []
            for j, (proj, tag) in enumerate([("Frontal", "PA"), ("Lateral", rnd.choice(["", "PA", "LL"]))]):
                if i % 5 == 4 and j == 1:
                    continue  # some single-view studies
                image_id = f"S{i}_{j}"
                arr = synthetic_image(proj == "Lateral", seed=i * 10 + j)
                Image.fromarray((arr * 255).astype(np.uint8)).save(root / "images" / f"{image_id}.jpg")
                images.append({"image_id": image_id, "file": f"images/{image_id}.jpg",
                               "view_position": tag, "projection": proj})
            fh.write(json.dumps({
                "study_id": str(i), "split": "train" if i < n_train else "val",
                "indication": "" if i % 3 == 0 else "Cough and fever.", "comparison": "",
                "findings": findings, "impression": impression, "mesh_major": [], "images": images,
            }) + "\n")
    return root
