"""Image decoding, RGB conversion, anyres geometry, preprocessing and token counts against transformers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image, smooth_image
from llava_next.config import DEFAULT_PINPOINTS, llava_config_from_hf
from llava_next.geometry import anyres_grid, num_image_tokens, select_best_resolution
from llava_next.image import (ImageError, ImageLimits, ImageProcessor, ImageProcessorConfig, ImageTooLarge, decode_image,
                              to_rgb)

PINPOINTS = [list(p) for p in DEFAULT_PINPOINTS]
VICUNA_7B = llava_config_from_hf({"model_type": "llava_next", "text_config": {"model_type": "llama"},
                                  "vision_config": {"model_type": "clip_vision_model", "image_size": 336,
                                                    "patch_size": 14, "hidden_size": 1024, "num_hidden_layers": 24,
                                                    "num_attention_heads": 16, "intermediate_size": 4096}})

# (width, height): extreme aspect ratios, one pixel, odd sizes, larger than every pinpoint, exact pinpoints
SIZES = [(500, 316), (1, 1), (1, 2000), (2000, 1), (3, 5), (7, 3), (335, 337), (336, 336), (672, 336), (336, 1008),
         (1009, 673), (4000, 3000), (10, 1000), (1000, 10), (19, 76), (640, 480), (1344, 336), (123, 456)]


def test_ground_truth_token_count_of_a_500x316_image():
    # The published figure uses transformers' image_sizes convention, (height, width) = (500, 316): a 2x1 grid.
    assert num_image_tokens(VICUNA_7B, (500, 316)) == 1526
    # The same picture lying on its side is a 1x2 grid and costs 1512.
    assert num_image_tokens(VICUNA_7B, (316, 500)) == 1512


def test_square_image_best_resolution_is_336_by_672():
    # Up to 336 px every canvas keeps all pixels; (336, 672) and (672, 336) waste the same, and the tie goes first.
    for side in (1, 100, 336):
        assert select_best_resolution((side, side), DEFAULT_PINPOINTS) == (336, 672)
    assert select_best_resolution((500, 500), DEFAULT_PINPOINTS) == (672, 672)  # larger: the big square keeps most


def test_pinpoints_are_height_width():
    assert select_best_resolution((300, 900), DEFAULT_PINPOINTS) == (336, 1008)  # wide image, wide canvas
    assert select_best_resolution((900, 300), DEFAULT_PINPOINTS) == (1008, 336)


@pytest.mark.parametrize("width,height", SIZES)
def test_geometry_and_token_count_match_transformers(width, height):
    from transformers.image_processing_utils import select_best_resolution as reference_best
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    grid = anyres_grid((height, width), DEFAULT_PINPOINTS, 336, 14)
    assert grid.canvas == tuple(reference_best((height, width), PINPOINTS))
    assert (grid.rows, grid.cols) == tuple(get_anyres_image_grid_shape((height, width), PINPOINTS, 336))
    # unpad a feature grid whose entries say where they were, and compare the kept region
    features = torch.arange(grid.rows * 24 * grid.cols * 24).view(1, grid.rows * 24, grid.cols * 24)
    kept = unpad_image(features, (height, width))
    top, left = grid.feature_offset
    assert torch.equal(kept, features[:, top : top + grid.feature_height, left : left + grid.feature_width])


def test_token_count_matches_the_transformers_processor_for_many_sizes():
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    processor = LlavaNextProcessor(LlavaNextImageProcessorPil(), tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, size=(400, 2))] + [(w, h) for h, w in SIZES]
    for h, w in sizes:
        expected = processor._get_number_of_features(h, w, 336, 336) - 1
        assert num_image_tokens(VICUNA_7B, (h, w)) == expected, (h, w)


def _reference_processor(anyres: bool, **kwargs):
    from transformers import LlavaImageProcessorPil, LlavaNextImageProcessorPil

    cls = LlavaNextImageProcessorPil if anyres else LlavaImageProcessorPil
    return cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **kwargs)


def _ours(anyres: bool, **kwargs) -> ImageProcessor:
    d = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, **kwargs}
    return ImageProcessor(ImageProcessorConfig.from_hf(d, anyres=anyres, pinpoints=list(DEFAULT_PINPOINTS)))


@pytest.mark.parametrize("width,height", SIZES)
def test_anyres_pixel_values_equal_transformers(width, height):
    image = smooth_image(width, height, seed=width * 7 + height)
    ours = _ours(True)([to_rgb(image)])
    theirs = _reference_processor(True)(images=[image], return_tensors="pt")
    assert torch.equal(ours["image_sizes"], theirs["image_sizes"])
    assert ours["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


def test_a_batch_of_images_with_different_tile_counts_is_padded_like_transformers():
    images = [smooth_image(500, 316, 1), smooth_image(336, 336, 2), smooth_image(100, 1000, 3), random_image(5, 5)]
    ours = _ours(True)([to_rgb(im) for im in images])
    theirs = _reference_processor(True)(images=images, return_tensors="pt")
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert torch.equal(ours["image_sizes"], theirs["image_sizes"])


@pytest.mark.parametrize("width,height", [(500, 316), (316, 500), (1, 1), (335, 337), (2000, 30), (336, 336)])
@pytest.mark.parametrize("pad", [False, True])
def test_llava15_resize_and_centre_crop_equal_transformers(width, height, pad):
    image = smooth_image(width, height, seed=3)
    ours = _ours(False, do_pad=pad)([to_rgb(image)])
    theirs = _reference_processor(False, do_pad=pad)(images=[image], return_tensors="pt")
    assert ours["pixel_values"].shape == (1, 3, 336, 336)
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


def _mode_images() -> dict[str, Image.Image]:
    rgb = smooth_image(60, 40, seed=4)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.arange(60, dtype=np.uint8) * 4, (40, 1))))
    p_transparent = rgb.convert("P")
    p_transparent.info["transparency"] = 0
    rgb_transparent = rgb.copy()
    # a PNG tRNS colour: transformers 5 composites it on white like an alpha channel (4.x ignored it for RGB)
    rgb_transparent.info["transparency"] = rgb.getpixel((0, 0))
    i16 = Image.fromarray((np.arange(2400).reshape(40, 60) * 3).astype(np.uint16))
    assert i16.mode == "I;16"
    return {
        "RGB": rgb, "RGB+transparency": rgb_transparent, "RGBA": rgba, "LA": rgba.convert("LA"), "P": rgb.convert("P"), "P+transparency": p_transparent,
        "L": rgb.convert("L"), "1": rgb.convert("1"), "CMYK": rgb.convert("CMYK"), "I;16": i16,
        "I": i16.convert("I"), "F": rgb.convert("F"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_every_pil_mode_is_converted_like_transformers(mode):
    image = _mode_images()[mode]
    ours = _ours(True)([to_rgb(image)])
    theirs = _reference_processor(True)(images=[image], return_tensors="pt")
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def _jpeg_with_orientation(orientation: int) -> bytes:
    image = smooth_image(50, 30, seed=5)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_is_applied_to_files_as_transformers_load_image_does(tmp_path):
    from transformers.image_utils import load_image

    path = tmp_path / "rotated.jpg"
    path.write_bytes(_jpeg_with_orientation(6))
    ours = decode_image(path)
    reference = load_image(str(path))
    assert ours.size == reference.size == (30, 50)
    assert np.array_equal(np.asarray(to_rgb(ours)), np.asarray(reference))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (5000, 5000)).save(path)  # a small file: 25 million pixels of zeros
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageTooLarge, match=r"5000x5000 = 25000000 pixels is over the limit of 1000000 \(raise it "
                                            r"with --max-image-pixels, or load\(max_image_pixels=...\), if"):
        decode_image(path, ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageTooLarge, match=r"bytes is over the limit of 1000 bytes"):
        decode_image(path, ImageLimits(max_bytes=1000))


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(_jpeg_with_orientation(1)[:400])
    with pytest.raises(ImageError, match="truncated or corrupt") as caught:
        decode_image(path)
    assert not isinstance(caught.value, ImageTooLarge)  # malformed, not too large: a server answers 400, not 413


def test_not_an_image_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ImageError, match="not an image format"):
        decode_image(path)
    with pytest.raises(ImageError, match="no such image file"):
        decode_image(tmp_path / "missing.png")
    for empty in ("", " "):  # (Path("") is the current directory: not "is a directory")
        with pytest.raises(ImageError, match="an empty path: name an image file"):
            decode_image(empty)


def test_byte_limit(tmp_path):
    path = tmp_path / "big.png"
    smooth_image(200, 200).save(path)
    with pytest.raises(ImageError, match="bytes is over the limit"):
        decode_image(path, ImageLimits(max_bytes=100))


def test_image_processor_defaults_are_the_dataclass_defaults_everywhere():
    from dataclasses import replace

    from llava_next.config import LlavaConfig, VisionConfig

    defaults = ImageProcessorConfig(anyres=True, image_grid_pinpoints=list(DEFAULT_PINPOINTS))
    # a preprocessor config that leaves every key out
    assert ImageProcessorConfig.from_hf({}, anyres=True, pinpoints=list(DEFAULT_PINPOINTS)) == defaults
    # a model with no preprocessor config at all (trained from scratch, or a checkpoint that ships none)
    model = LlavaConfig(model_type="llava_next", image_grid_pinpoints=list(DEFAULT_PINPOINTS))
    assert ImageProcessorConfig.for_model(model) == defaults
    small = replace(model, vision=VisionConfig(image_size=32, patch_size=8), image_grid_pinpoints=[(32, 64)])
    assert ImageProcessorConfig.for_model(small) == replace(defaults, shortest_edge=32, crop_size=(32, 32),
                                                            image_grid_pinpoints=[(32, 64)])


def test_a_missing_crop_size_crops_to_the_resize_size():
    # {"height": 336, "width": 336} with no crop_size: the crop follows the resize, it is not a fixed 224 px
    cfg = ImageProcessorConfig.from_hf({"size": {"height": 336, "width": 336}}, anyres=True, pinpoints=None)
    assert cfg.crop_size == (336, 336) and cfg.tile_size == 336
    assert ImageProcessorConfig.from_hf({"size": {"shortest_edge": 224}}, anyres=False, pinpoints=None).crop_size == (224, 224)


def test_processor_without_a_preprocessor_config_uses_the_defaults_at_the_model_tile_size(tmp_path, tiny):
    import shutil

    from llava_next.config import read_config
    from llava_next.processor import read_image_processor_config

    directory = tmp_path / "ckpt"
    shutil.copytree(tiny("vicuna"), directory)
    cfg = read_config(directory / "config.json")
    saved = read_image_processor_config(directory, cfg)
    (directory / "preprocessor_config.json").unlink(missing_ok=True)
    (directory / "processor_config.json").unlink(missing_ok=True)
    assert read_image_processor_config(directory, cfg) == ImageProcessorConfig.for_model(cfg) == saved
