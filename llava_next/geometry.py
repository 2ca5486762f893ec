"""LLaVA-NeXT's anyres geometry: integer arithmetic on an image's (height, width) and the grid pinpoints.

This is the one place that computes it. The image processor uses it to cut tiles and to count an image's tokens,
the model uses it to pack the tiles' features, the server to price an image: the two sides can never disagree.
It needs no pixels, so the model imports it without importing image decoding.

Every rounding is the reference's (transformers' LLaVA-NeXT processor and model):
  - pinpoints are (height, width); the best one maximises the effective area (int() of the scaled sides), then
    minimises the waste, and a full tie goes to the first in the list;
  - the image is scaled into the chosen canvas with ceil() on the scaled side;
  - unpadding the feature grid uses the original (H, W) and int(round(x, 7)) (int(x) for checkpoints of the
    original LLaVA repositories, whose code does that: `unpad_rounding`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence




def select_best_resolution(image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) canvas that keeps the most of the image's pixels, then wastes the least."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (canvas_h, canvas_w), effective, wasted
    return best


def fit_inside(image_size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled to touch the canvas on one side, keeping its aspect ratio."""
    height, width = image_size
    canvas_h, canvas_w = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


@dataclass(frozen=True)
class AnyresCanvas:
    """Where one image goes: the chosen pinpoint, the image scaled into it, and the tiles that cover it."""

    canvas: tuple[int, int]  # the chosen pinpoint, (height, width) in pixels
    resized: tuple[int, int]  # the image scaled into the canvas, (height, width)
    rows: int  # tiles down
    cols: int  # tiles across


@dataclass(frozen=True)
class AnyresGrid(AnyresCanvas):
    """...and how the tiles' features are packed: the part of the feature grid that saw the image."""

    feature_offset: tuple[int, int]  # (top, left) of the unpadded region in the (rows * side, cols * side) grid
    feature_height: int
    feature_width: int

    @property
    def num_tokens(self) -> int:
        """Tokens of the grid part: the unpadded features, and a newline after every row."""
        return self.feature_height * (self.feature_width + 1)


def anyres_canvas(image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile_size: int) -> AnyresCanvas:
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} has no pixels")
    canvas = select_best_resolution((height, width), pinpoints)
    return AnyresCanvas(canvas, fit_inside((height, width), canvas), canvas[0] // tile_size, canvas[1] // tile_size)


def scaled_side(x: float, rounding: str) -> int:
    """transformers rounds to 7 decimals before int(); the original LLaVA code takes int() of the float, so a
    product like 1127.9999999 loses a whole feature row there (a 47x1128 image keeps 2 columns, not 4)."""
    return int(round(x, 7)) if rounding == "round7" else int(x)


def anyres_grid(image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile_size: int, patch_size: int,
                unpad_rounding: str = "round7") -> AnyresGrid:
    c = anyres_canvas(image_size, pinpoints, tile_size)
    height, width = int(image_size[0]), int(image_size[1])
    side = tile_size // patch_size
    grid_h, grid_w = c.rows * side, c.cols * side
    # Remove the rows (or columns) of features that only saw padding. The reference slices `padding` off both
    # ends, so an odd leftover keeps one padded row: the count must be computed the same way.
    if width / height > grid_w / grid_h:
        new_h = scaled_side(height * (grid_w / width), unpad_rounding)
        pad = (grid_h - new_h) // 2
        offset, feature_h, feature_w = (pad, 0), grid_h - 2 * pad, grid_w
    else:
        new_w = scaled_side(width * (grid_h / height), unpad_rounding)
        pad = (grid_w - new_w) // 2
        offset, feature_h, feature_w = (0, pad), grid_h, grid_w - 2 * pad
    return AnyresGrid(c.canvas, c.resized, c.rows, c.cols, offset, feature_h, feature_w)




def num_image_tokens(cfg, image_size: tuple[int, int]) -> int:
    """How many placeholder tokens an image of (height, width) costs under a model config: the one count used by the
    processor, the model's check and the server."""
    if not cfg.is_anyres:
        return cfg.base_tokens_per_tile
    if cfg.patch_merge != "spatial_unpad":  # every tile whole: "spatial" lays them out as a grid, "flat" in a row
        c = anyres_canvas(image_size, cfg.image_grid_pinpoints, cfg.vision.image_size)
        return cfg.base_tokens_per_tile * (1 + c.rows * c.cols)
    grid = anyres_grid(image_size, cfg.image_grid_pinpoints, cfg.vision.image_size, cfg.vision.patch_size,
                       cfg.unpad_rounding)
    return cfg.base_tokens_per_tile + grid.num_tokens
