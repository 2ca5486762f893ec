"""Every hostile image (tests/hostile_images.py) through decode_image and through the processor of a LLaVA-NeXT and a
LLaVA 1.5 checkpoint: the answer transformers gives for the upright picture, or one clear ImageError.

Each case runs under a generous hang guard (a pipe read, a decoder loop) and with Pillow forbidden from allocating
a huge image, so a regression fails here instead of stalling or swapping the machine."""

from __future__ import annotations

import re
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import reference_processor
from hostile_images import HostileImage, encode, hostile_images, picture
from llava_next.config import read_config
from llava_next.errors import LlavaError
from llava_next.image import ImageError, ImageProcessor, ImageProcessorConfig, decode_image
from llava_next.processor import Processor

HANG_GUARD_S = 60  # far above the milliseconds each case takes: this catches hangs, it does not time anything
HUGE_PIXELS = 100_000_000  # no image in this file needs a tenth of that

with tempfile.TemporaryDirectory() as _directory:
    NAMES = [case.name for case in hostile_images(Path(_directory))]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, HostileImage]:
    return {case.name: case for case in hostile_images(tmp_path_factory.mktemp("hostile"))}


@contextmanager
def hang_guard(seconds: int = HANG_GUARD_S):
    def hung(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def no_huge_images(monkeypatch):
    """Pillow may not create an image of more than HUGE_PIXELS: a bug that would allocate gigabytes fails at once."""
    original_new, original_resize = Image.new, Image.Image.resize

    def check(size):
        if size[0] * size[1] > HUGE_PIXELS:
            raise AssertionError(f"an intermediate image of {size[0]}x{size[1]} pixels")

    def new(mode, size, *args, **kwargs):
        check(size)
        return original_new(mode, size, *args, **kwargs)

    def resize(self, size, *args, **kwargs):
        check(size)
        return original_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image, "new", new)
    monkeypatch.setattr(Image.Image, "resize", resize)


def assert_clear(error: Exception, pattern: str) -> None:
    message = str(error)
    assert isinstance(error, LlavaError)
    assert "\n" not in message
    message.encode("utf-8")  # printable whatever the file name was
    assert re.search(pattern, message), message


def reference_upright(case: HostileImage, cases: dict[str, HostileImage]) -> np.ndarray:
    """transformers' load_image of the file (Pillow's first frame, exif_transpose, convert("RGB")). Where it raises
    on broken EXIF, the pixels are compared with the same picture saved with clean EXIF."""
    from transformers.image_utils import load_image

    try:
        return np.asarray(load_image(str(case.source)))
    except Exception:  # noqa: BLE001 - whatever Pillow raised
        clean = {"exif-wrong-type-rational.jpg": "orientation-6.jpg", "exif-wrong-type-short.jpg": "orientation-6.jpg",
                 "exif-bad-header.png": "plain.png"}[case.name]
        return np.asarray(load_image(str(cases[clean].source)))


@pytest.mark.parametrize("name", NAMES)
def test_decode_image(name, cases, no_huge_images):
    case = cases[name]
    with hang_guard():
        if case.error is not None:
            with pytest.raises(ImageError) as caught:
                decode_image(case.source)
            assert_clear(caught.value, case.error)
            return
        image = decode_image(case.source)
    assert image.size == case.size
    if isinstance(case.source, Path):
        assert np.array_equal(np.asarray(image.convert("RGB")), reference_upright(case, cases))


@pytest.fixture(scope="module")
def processors(tiny):
    """(ours, transformers') for a LLaVA-NeXT and a LLaVA 1.5 checkpoint."""
    out = {}
    for family in ("vicuna", "llava15"):
        directory = tiny(family)
        out[family] = (Processor.from_dir(directory, read_config(directory / "config.json")), reference_processor(directory))
    return out


# LLaVA 1.5 resizes the short side to 336 px before cropping: these would pass through a 336 x 6,720,000 image.
TOO_ELONGATED_FOR_LLAVA15 = {"1x20000.png", "20000x1.png"}


@pytest.mark.parametrize("family", ["vicuna", "llava15"])
@pytest.mark.parametrize("name", NAMES)
def test_processor(name, family, cases, processors, no_huge_images):
    case = cases[name]
    ours, theirs = processors[family]
    error = case.error or ("too elongated" if family == "llava15" and name in TOO_ELONGATED_FOR_LLAVA15 else None)
    with hang_guard():
        if error is not None:
            with pytest.raises(LlavaError) as caught:
                ours(text="<image> What is this?", images=[case.source])
            assert_clear(caught.value, error)
            return
        got = ours(text="<image> What is this?", images=[case.source])
    upright = decode_image(case.source)
    assert (upright.width, upright.height) == case.size
    # transformers' processor given the upright picture as a PIL image (its PIL path composites transparency on white)
    expected = theirs(text="<image> What is this?", images=[upright], return_tensors="pt")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    if "image_sizes" in expected:
        assert torch.equal(got["image_sizes"], expected["image_sizes"])


def test_llava15_pad_to_square_of_an_elongated_image_is_refused_before_the_canvas(no_huge_images):
    d = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "do_pad": True}
    processor = ImageProcessor(ImageProcessorConfig.from_hf(d, anyres=False, pinpoints=None))
    with pytest.raises(ImageError, match=r"padding it to a square makes a 20000x20000 image, over the limit"):
        processor([picture(20000, 2)])
    # under the limit it is the reference's answer (test_image.py compares pad-to-square with transformers)
    assert processor([picture(2000, 2)])["pixel_values"].shape == (1, 3, 336, 336)


def test_the_pixel_limit_of_the_processor_bounds_intermediates_too(tmp_path, tiny):
    from llava_next.image import ImageLimits

    directory = tiny("llava15")
    path = tmp_path / "wide.png"
    picture(600, 2).save(path)  # resized to 100800 x 336 = 33.9 M pixels on the way to its crop
    small = Processor.from_dir(directory, read_config(directory / "config.json"), image_limits=ImageLimits(max_pixels=10_000_000))
    with pytest.raises(ImageError, match="600x2 image is too elongated.*over the limit of 10000000 pixels"):
        small(text="<image>", images=[path])
    assert Processor.from_dir(directory, read_config(directory / "config.json"))(text="<image>", images=[path])["pixel_values"].shape \
        == (1, 3, 336, 336)


def test_eps_is_never_handed_to_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was run on a stranger's file")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    data = encode(picture(8, 8), "EPS")
    with pytest.raises(ImageError, match="not an image format"):
        decode_image(data)


@pytest.mark.parametrize("name,error", [("truncated.png", "truncated or corrupt"), ("truncated.gif", "truncated or corrupt"),
                                        ("bomb-8000x8000.png", "over the limit")])
def test_a_pil_image_opened_lazily_that_cannot_decode_is_a_clear_error(name, error, cases, processors):
    ours, _ = processors["vicuna"]
    lazy = Image.open(cases[name].source)  # Pillow reads the header only; the pixels decode in the processor
    with pytest.raises(ImageError) as caught:
        ours(text="<image>", images=[lazy])
    assert_clear(caught.value, error)
