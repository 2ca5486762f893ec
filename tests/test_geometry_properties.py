"""Property tests of the anyres geometry against transformers, over random image sizes and random pinpoint lists.

For every drawn (height, width) from 1 to 4000 px and grid pinpoints (multiples of the tile size, any number of
them, in any order), these must equal transformers' own values:
  - the image-token count: what transformers' LlavaNextProcessor writes into the prompt for the image;
  - the number of tiles: what transformers' model splits pixel_values by (image_size_to_num_patches);
  - the packed features: transformers' model-side pack_image_features (unpad, newline after every row) on dummy
    features that say where they came from, against our model's packing, value for value;
  - (small tiles, so that it stays fast) the pixel values transformers' image processor cuts.
Derandomized with a bounded number of examples and no deadline: reproducible in CI, and fine on a busy machine.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_next.config import LlavaConfig, VisionConfig
from llava_next.geometry import num_image_tokens
from llava_next.image import ImageProcessor, ImageProcessorConfig, to_rgb
from llava_next.model.llava import LlavaModel

PROPERTY_SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow])

sides = st.integers(min_value=1, max_value=4000)
tiles = st.sampled_from([(336, 14), (224, 14), (32, 8)])  # (tile size, patch size): the real one and others


def pinpoint_lists(tile: int, most_tiles: int = 6, longest: int = 9):
    """Random (height, width) canvases in whole tiles: any count, repeats and order allowed (ties go to the first)."""
    side = st.integers(min_value=1, max_value=most_tiles).map(lambda n: n * tile)
    return st.lists(st.tuples(side, side), min_size=1, max_size=longest)


def our_config(tile: int, patch: int, pinpoints) -> LlavaConfig:
    return LlavaConfig(model_type="llava_next", vision=VisionConfig(image_size=tile, patch_size=patch),
                       image_grid_pinpoints=[tuple(p) for p in pinpoints])


@pytest.fixture(scope="module")
def hf_processor():
    from tokenizers import Tokenizer, models
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    return LlavaNextProcessor(LlavaNextImageProcessorPil(), tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


@st.composite
def geometry_cases(draw):
    tile, patch = draw(tiles)
    return draw(sides), draw(sides), tile, patch, draw(pinpoint_lists(tile))


@PROPERTY_SETTINGS
@given(case=geometry_cases())
def test_token_count_tiles_and_packing_equal_transformers(hf_processor, case):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    height, width, tile, patch, pinpoints = case
    cfg = our_config(tile, patch, pinpoints)
    pinpoints = [list(p) for p in pinpoints]

    # the prompt: transformers' processor replaces <image> by this many placeholders
    hf_processor.image_processor.image_grid_pinpoints = pinpoints
    hf_processor.patch_size = patch
    processed = {"image_sizes": [[height, width]], "pixel_values": torch.empty((1, 1, 3, tile, tile), device="meta")}
    expected_tokens = hf_processor.replace_image_token(processed, 0).count("<image>")
    assert num_image_tokens(cfg, (height, width)) == expected_tokens

    # the tiles the model expects for the image
    tiles_count = image_size_to_num_patches((height, width), pinpoints, tile)
    assert LlavaModel.tile_counts(SimpleNamespace(cfg=cfg), torch.tensor([[height, width]]), 1) == [tiles_count]

    # packing: feature i of the dummy input is the number i, the newline is -1
    per_tile = (tile // patch) ** 2
    features = torch.arange(tiles_count * per_tile, dtype=torch.float32).view(tiles_count, per_tile, 1)
    newline = torch.tensor([-1.0])
    hf_config = SimpleNamespace(vision_config=SimpleNamespace(image_size=tile, patch_size=patch),
                                image_grid_pinpoints=pinpoints)
    (theirs,), _ = LlavaNextModel.pack_image_features(SimpleNamespace(config=hf_config), [features],
                                                      torch.tensor([[height, width]]), "default", newline)
    ours = LlavaModel.pack_image_features(SimpleNamespace(cfg=cfg, image_newline=newline), features, (height, width))
    assert ours.shape[0] == expected_tokens
    assert torch.equal(ours, theirs)


@st.composite
def small_tile_images(draw):
    tile = 28  # two patches of 14 a side: the reference's code paths at a fraction of the pixels
    width, height = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    return width, height, tile, draw(pinpoint_lists(tile, most_tiles=4, longest=5)), draw(st.integers(0, 2**31))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=small_tile_images())
def test_tiles_pixel_values_equal_transformers(case):
    from transformers import LlavaNextImageProcessorPil
    from PIL import Image

    width, height, tile, pinpoints, seed = case
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    pinpoints = [list(p) for p in pinpoints]
    sizes = {"size": {"shortest_edge": tile}, "crop_size": {"height": tile, "width": tile}}
    reference = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=pinpoints)
    ours = ImageProcessor(ImageProcessorConfig.from_hf(sizes, anyres=True, pinpoints=pinpoints))
    expected = reference(images=[image], return_tensors="pt")
    got = ours([to_rgb(image)])
    assert torch.equal(got["image_sizes"], expected["image_sizes"])
    assert got["pixel_values"].shape == expected["pixel_values"].shape
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
