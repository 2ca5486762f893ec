"""Deterministic synthetic RGB test images for the original-layout references (numpy + Pillow, no random numbers).

Each pixel is integer arithmetic on its coordinates, so every machine and numpy version draws the same picture;
the references record the sha256 of each image's RGB bytes so a test can check it drew the same input.
The pictures differ from region to region (gradients, stripes, a disc, a checker corner, fine texture) so that a
tile order, grid transpose or padding offset mistake changes the features and the logits.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

# (width, height), as PIL reports image.size; named "WxH" in the references
SIZES = [(500, 316), (316, 500), (336, 336), (300, 100), (1000, 200), (60, 800), (47, 1128)]


def make_image(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = (x * 255) // max(width - 1, 1)
    g = (y * 255) // max(height - 1, 1)
    b = ((x + 2 * y) // 9 % 2) * 90 + ((x * 7 + y * 3) % 64)
    # a bright disc centred in the left third, so left/right and top/bottom differ
    cx, cy, rad = width // 3, height // 2, max(min(width, height) // 4, 3)
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= rad * rad
    r = np.where(disc, 250 - r // 4, r)
    g = np.where(disc, 40 + g // 5, g)
    # a checker patch in the bottom-right corner
    corner = (x >= width - width // 5) & (y >= height - height // 5)
    b = np.where(corner, ((x // 4 + y // 4) % 2) * 200 + 30, b)
    # fine integer texture (a hash of the coordinates), small amplitude
    tex = ((x * 73856093) ^ (y * 19349663)) % 23
    rgb = np.stack([(r + tex) % 256, (g + 2 * tex) % 256, (b + 3 * tex) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)  # (H, W, 3) uint8 -> mode RGB


def image_sha256(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes()).hexdigest()


def name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
