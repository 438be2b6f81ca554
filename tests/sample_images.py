"""Small generated photos with UTM names, for index and pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_images(
    folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (120, 160)
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"@{500000 + 100 * i}@{4000000 + 50 * i}@img{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
