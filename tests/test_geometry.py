"""Property tests: the anyres geometry against transformers' own functions, over random image sizes (1 to 4000 px on
both sides) and random pinpoint lists. Token count (processor side), tile count and packed feature count (model
side) must all agree, since the classic bug of this model family is those disagreeing."""

from __future__ import annotations

import dataclasses
import functools

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import reference_processor
from llava_next.config import read_config
from llava_next.geometry import anyres_canvas, anyres_grid, num_image_tokens

TILE, PATCH = 336, 14
SIDE = TILE // PATCH

sizes = st.integers(min_value=1, max_value=4000)
pinpoint_lists = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=6, unique=True).map(
    lambda grid: [(rows * TILE, cols * TILE) for rows, cols in grid])
cached_processor = functools.cache(lambda directory: reference_processor(directory))
EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@EXAMPLES
@given(height=sizes, width=sizes, pinpoints=pinpoint_lists)
def test_token_tile_and_feature_counts_agree_with_transformers(height, width, pinpoints, tiny):
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches, unpad_image)

    directory = tiny("vicuna")
    processor = cached_processor(str(directory))
    cfg = dataclasses.replace(read_config(directory / "config.json"), image_grid_pinpoints=pinpoints)
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (TILE, PATCH)
    processor.image_processor.image_grid_pinpoints = [list(p) for p in pinpoints]

    # processor side: how many placeholder tokens the image costs (its count includes CLS, which the "default"
    # feature strategy drops, as its __call__ does)
    expected = processor._get_number_of_features(height, width, TILE, TILE)
    if processor.vision_feature_select_strategy == "default":
        expected -= 1
    assert num_image_tokens(cfg, (height, width)) == expected

    # tiles: the base tile and the grid
    canvas = anyres_canvas((height, width), pinpoints, TILE)
    assert 1 + canvas.rows * canvas.cols == image_size_to_num_patches((height, width), pinpoints, TILE)
    assert (canvas.rows, canvas.cols) == tuple(get_anyres_image_grid_shape((height, width), pinpoints, TILE))

    # model side: the unpadded feature grid that gets packed, a newline after every row
    grid = anyres_grid((height, width), pinpoints, TILE, PATCH)
    features = torch.empty(1, canvas.rows * SIDE, canvas.cols * SIDE)
    unpadded = unpad_image(features, (height, width))
    assert (grid.feature_height, grid.feature_width) == tuple(unpadded.shape[1:])
    assert grid.num_tokens == unpadded.shape[1] * (unpadded.shape[2] + 1)
    assert num_image_tokens(cfg, (height, width)) == SIDE * SIDE + grid.num_tokens
