"""Images: decoding with limits, RGB conversion and preprocessing into tiles (the geometry is `geometry.py`).

Every rounding below is the reference's (transformers' PIL image processors), because a one-pixel difference in a
resize changes every feature of the image:
  - the image is resized into its anyres canvas with Pillow's bicubic on uint8 pixels;
  - it is padded with black, centred, the odd pixel on the bottom/right, and cut into tiles row by row;
  - the base tile is the whole original squashed to one tile and comes first.
"""

from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import LlavaError
from .geometry import anyres_canvas

if TYPE_CHECKING:
    import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_PIXELS = 50_000_000  # a 7000 x 7000 photo fits; a decompression bomb does not
DEFAULT_MAX_BYTES = 64 * 2**20


class ImageError(LlavaError, ValueError):
    """An image could not be used: unreadable, truncated, too large, or of an unsupported kind."""


class ImageTooLarge(ImageError):
    """An image over a limit (bytes or pixels): too large rather than malformed, so a server answers 413, not 400."""


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


# Formats Pillow can open that we refuse: Pillow hands PostScript to Ghostscript, an interpreter with a long history
# of exploits, and a file from a stranger must never reach it.
REFUSED_FORMATS = frozenset({"EPS"})


def printable(path: str | os.PathLike) -> str:
    """A file name for a message: bytes that are not UTF-8 (a Latin-1 name on a Linux disk) as \\xNN escapes, so
    that printing the message can never fail."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def decode_image(source: str | os.PathLike | bytes, limits: ImageLimits = ImageLimits(), name: str | None = None) -> Image.Image:
    """A file path or encoded bytes -> a fully decoded PIL image, EXIF orientation applied.

    The size is checked from the header before any pixel is decoded, so a small file that would expand into
    gigabytes is refused cheaply. Truncated and corrupt files are errors, never partially grey images. An animation
    gives its first frame, as transformers does.
    """
    label, data = _read(source, limits, name)
    return upright(_load_pixels(_open(data, limits, label), label))


def image_size(path: str | os.PathLike, limits: ImageLimits = ImageLimits()) -> tuple[int, int]:
    """(height, width) of the image `decode_image` would return (EXIF orientation applied), with the same errors
    for missing, oversized, unreadable, truncated and corrupt files, without decoding every pixel where the format
    allows: the size comes from the header; a PNG's data is checked by the checksums of all its chunks (a file cut
    short fails), a JPEG's by decoding it at 1/8 scale (which still reads all of its compressed data). Other formats,
    and PNGs that carry orientation metadata (rare; Pillow reads it only when decoding), are decoded in full.
    """
    label, data = _read(path, limits, None)
    image = _open(data, limits, label)
    png_metadata = image.format == "PNG" and (b"eXIf" in data or b"XML:com.adobe.xmp" in data)
    if image.format not in ("PNG", "JPEG") or png_metadata:
        decoded = upright(_load_pixels(image, label))
        return decoded.height, decoded.width
    width, height = image.size
    if image.format == "JPEG" and upright_turns_a_quarter(image):
        width, height = height, width
    _refuse_truncated_loading(label)
    try:
        if image.format == "PNG":
            image.verify()
        else:
            image.draft(None, (1, 1))  # the smallest scale the JPEG decoder offers
            image.load()
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many kinds of errors on corrupt data
        raise ImageError(f"{label}: the image data is truncated or corrupt ({_describe(e)})") from None
    return height, width


def _read(source: str | os.PathLike | bytes, limits: ImageLimits, name: str | None) -> tuple[str, bytes]:
    """(the label errors use, the encoded bytes), within the byte limit."""
    if isinstance(source, bytes):
        label, data = name or "image bytes", source
    else:
        if not str(source).strip():  # (Path("") is the current directory)
            raise ImageError(f"{name or 'image'}: an empty path: name an image file")
        label = name or printable(source)
        data = _read_file(Path(source), limits, label)
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{label}: {len(data)} bytes is over the limit of {limits.max_bytes} bytes")
    if not data:
        raise ImageError(f"{label}: the file is empty (0 bytes)")
    return label, data


def _open(data: bytes, limits: ImageLimits, label: str) -> Image.Image:
    """Pillow's lazy open (the header only) of the formats we read, checked against the pixel limit."""
    Image.init()
    try:
        image = Image.open(io.BytesIO(data), formats=[f for f in Image.OPEN if f not in REFUSED_FORMATS])
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{label}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image format Pillow can read (or the file is corrupt)") from None
    except Exception as e:  # noqa: BLE001 - Pillow's parsers raise many kinds of errors on malformed headers
        raise ImageError(f"{label}: the image data is truncated or corrupt ({_describe(e)})") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"{label}: {width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels} "
            "(raise it with --max-image-pixels, or load(max_image_pixels=...), if you trust this image)"
        )
    return image


def _read_file(path: Path, limits: ImageLimits, label: str) -> bytes:
    """The bytes of a regular file, at most the byte limit of them: a directory, a pipe or a device (which could
    block or never end) is an error, never read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{label}: no such image file") from None
    except (OSError, ValueError) as e:  # permissions, a name too long, a NUL byte in the name
        raise ImageError(f"{label}: the file cannot be read ({_describe(e)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{label}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{label}: not a regular file (a pipe, socket or device); give an image file")
    if info.st_size > limits.max_bytes:
        raise ImageTooLarge(f"{label}: {info.st_size} bytes is over the limit of {limits.max_bytes} bytes")
    try:
        with path.open("rb") as f:
            return f.read(limits.max_bytes + 1)  # a file that grew since stat() is still caught by the limit
    except OSError as e:
        raise ImageError(f"{label}: the file cannot be read ({_describe(e)})") from None


def _describe(e: Exception) -> str:
    message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return message or type(e).__name__


def _refuse_truncated_loading(label: str) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageError(f"{label}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on, so truncated files would decode "
                         "partly grey instead of failing; turn it off")


def _load_pixels(image: Image.Image, label: str) -> Image.Image:
    if getattr(image, "tile", None):  # still to be decoded from its file (decoded images have nothing left to cut short)
        _refuse_truncated_loading(label)
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{label}: refused as a decompression bomb ({e})") from None
    except MemoryError:
        raise ImageError(f"{label}: not enough memory to decode this image") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many kinds of errors on corrupt data
        raise ImageError(f"{label}: the image data is truncated or corrupt ({_describe(e)})") from None
    return image


# EXIF orientation -> the transpose that makes the picture upright (EXIF 2.3, tag 0x0112). 1 is already upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,  # mirrored
    3: Image.Transpose.ROTATE_180,  # upside down
    4: Image.Transpose.FLIP_TOP_BOTTOM,  # mirrored and upside down
    5: Image.Transpose.TRANSPOSE,  # mirrored along the main diagonal
    6: Image.Transpose.ROTATE_270,  # stored lying on its side: shown after a quarter turn clockwise
    7: Image.Transpose.TRANSVERSE,  # mirrored along the other diagonal
    8: Image.Transpose.ROTATE_90,  # shown after a quarter turn anticlockwise
}
EXIF_ORIENTATION = 0x0112


def _orientation(image: Image.Image) -> int:
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - metadata Pillow cannot parse: the orientation is unknown, the pixels are fine
        return 1
    return orientation if isinstance(orientation, int) else 1


def upright_turns_a_quarter(image: Image.Image) -> bool:
    """Whether `upright` swaps the image's height and width."""
    return _orientation(image) in (5, 6, 7, 8)


def upright(image: Image.Image) -> Image.Image:
    """The picture as a viewer shows it: turned by its EXIF orientation, as transformers' load_image does.

    Unlike Pillow's exif_transpose (which load_image uses), this never rewrites the metadata, so EXIF that Pillow
    cannot parse or write back (a tag of the wrong type, an offset past the end) never fails a picture whose pixels
    are fine: an orientation that cannot be read leaves the picture as stored, which is what viewers show too."""
    method = _UPRIGHT.get(_orientation(image))
    return image if method is None else image.transpose(method)


def check_image(image: Image.Image, limits: ImageLimits = ImageLimits(), label: str = "image") -> Image.Image:
    """A PIL image given directly: enforce the pixel limit and make sure its pixels decode."""
    if not isinstance(image, Image.Image):
        raise ImageError(f"{label}: expected a PIL image, a path or bytes, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{label}: an image of size {width}x{height} has no pixels")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"{label}: {width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}")
    return _load_pixels(image, label)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB as the reference does: transparency composited on white, high bit depths clipped.

    transformers 5 (the reference) treats an RGB image's `transparency` entry (a PNG tRNS colour) as transparency
    too; transformers 4.x returned RGB images untouched. The parity tests pin the 5.x behaviour."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"images of Pillow mode {image.mode!r} cannot be converted to RGB ({e})") from None


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing


@dataclass
class ImageProcessorConfig:
    """What preprocessor_config.json (transformers 4.x) or processor_config.json's image_processor (5.x) says.

    The defaults are the published LLaVA recipes' (CLIP ViT-L/14-336 preprocessing), here and nowhere else: a
    config file that leaves a key out gets the value below (from_hf), and a model without any preprocessor config
    (one trained from scratch, a checkpoint that ships none) gets them at its own tile size (for_model)."""

    anyres: bool = True
    shortest_edge: int | None = 336  # resize so the short side is this...
    size_hw: tuple[int, int] | None = None  # ...or to exactly this (height, width)
    do_resize: bool = True
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (336, 336)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC.value
    pad_to_square: bool = False  # LLaVA 1.5 "pad" aspect ratio: pad to a square of the mean colour first
    image_grid_pinpoints: list[tuple[int, int]] = field(default_factory=list)
    origin: str = field(default="", compare=False)  # the file these came from, or why none (`info`; never saved)

    @property
    def tile_size(self) -> int:
        if self.do_center_crop:
            return self.crop_size[0]
        if self.size_hw is not None:
            return self.size_hw[0]
        return self.shortest_edge

    @property
    def base_size(self) -> tuple[int, int]:
        """(height, width) the whole image is squashed to for the anyres base tile."""
        if self.size_hw is not None:
            return self.size_hw
        return (self.shortest_edge, self.shortest_edge)

    @classmethod
    def for_model(cls, cfg) -> "ImageProcessorConfig":
        """The defaults for a model config (a LlavaConfig): resize and crop to its vision tower's tile size."""
        side = cfg.vision.image_size
        return cls(anyres=cfg.is_anyres, shortest_edge=side, crop_size=(side, side),
                   image_grid_pinpoints=[(int(h), int(w)) for h, w in cfg.image_grid_pinpoints or []])

    @classmethod
    def from_hf(cls, d: dict[str, Any], anyres: bool, pinpoints: list[tuple[int, int]] | None) -> "ImageProcessorConfig":
        default = cls()

        def hw(value):
            if isinstance(value, int):
                return (value, value)
            if "height" in value:
                return (int(value["height"]), int(value["width"]))
            return (int(value["shortest_edge"]),) * 2

        size = d.get("size") or {"shortest_edge": default.shortest_edge}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        shortest = int(size["shortest_edge"]) if "shortest_edge" in size else None
        size_hw = (int(size["height"]), int(size["width"])) if "height" in size else None
        # No crop size: crop to the resize's short side, as every LLaVA recipe does (not transformers' class default
        # of 224 px, which would not fit a 336 px tower).
        crop = hw(d["crop_size"]) if d.get("crop_size") is not None else (shortest or min(size_hw),) * 2
        raw_pinpoints = d.get("image_grid_pinpoints") or pinpoints or []
        return cls(
            anyres=anyres,
            shortest_edge=shortest,
            size_hw=size_hw,
            do_resize=bool(d.get("do_resize", default.do_resize)),
            do_center_crop=bool(d.get("do_center_crop", default.do_center_crop)),
            crop_size=crop,
            do_rescale=bool(d.get("do_rescale", default.do_rescale)),
            rescale_factor=float(d.get("rescale_factor", default.rescale_factor)),
            do_normalize=bool(d.get("do_normalize", default.do_normalize)),
            image_mean=tuple(d.get("image_mean") or default.image_mean),
            image_std=tuple(d.get("image_std") or default.image_std),
            resample=int(d.get("resample", default.resample)),
            pad_to_square=bool(d.get("do_pad", default.pad_to_square)) and not anyres,
            image_grid_pinpoints=[(int(h), int(w)) for h, w in raw_pinpoints],
        )

    def checked(self) -> "ImageProcessorConfig":
        """Three finite means and positive standard deviations, positive whole sizes; else ValueError."""
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {list(self.image_mean)}, {list(self.image_std)}")
        if not all(math.isfinite(m) for m in self.image_mean) or not all(math.isfinite(s) and s > 0 for s in self.image_std):
            raise ValueError(f"image_mean must be finite and image_std positive, got {list(self.image_mean)}, "
                             f"{list(self.image_std)}")
        if self.shortest_edge is None and self.size_hw is None:
            raise ValueError("size must give shortest_edge, or height and width")
        sizes = [self.shortest_edge or 1, *(self.size_hw or (1, 1)), *self.crop_size]
        if not all(isinstance(x, int) and x > 0 for x in sizes):
            raise ValueError(f"image sizes must be positive integers, got {sizes}")
        return self

    def to_hf(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(
            image_processor_type="LlavaNextImageProcessor" if self.anyres else "LlavaImageProcessor",
            do_resize=self.do_resize,
            size={"height": self.size_hw[0], "width": self.size_hw[1]} if self.size_hw else {"shortest_edge": self.shortest_edge},
            do_center_crop=self.do_center_crop,
            crop_size={"height": self.crop_size[0], "width": self.crop_size[1]},
            do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor,
            do_normalize=self.do_normalize,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
            resample=self.resample,
            do_convert_rgb=True,
        )
        if self.anyres:
            d.update(do_pad=True, image_grid_pinpoints=[list(p) for p in self.image_grid_pinpoints])
        else:
            d["do_pad"] = self.pad_to_square
        return d


def _resize(image: Image.Image, size_hw: tuple[int, int], resample: int) -> Image.Image:
    height, width = size_hw
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=resample, reducing_gap=None)


def _shortest_edge_size(image_size: tuple[int, int], shortest: int) -> tuple[int, int]:
    height, width = image_size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def _center_crop(image: Image.Image, crop_hw: tuple[int, int]) -> Image.Image:
    crop_h, crop_w = crop_hw
    width, height = image.size
    if height < crop_h or width < crop_w:
        # Smaller than the crop: centre on black, the odd pixel of padding on the top/left (the reference's rule).
        canvas_h, canvas_w = max(crop_h, height), max(crop_w, width)
        canvas = Image.new("RGB", (canvas_w, canvas_h))
        canvas.paste(image, (math.ceil((canvas_w - width) / 2), math.ceil((canvas_h - height) / 2)))
        image, (width, height) = canvas, (canvas_w, canvas_h)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if (top, left, crop_w, crop_h) == (0, 0, width, height):
        return image
    return image.crop((left, top, left + crop_w, top + crop_h))


def _pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImageProcessor:
    """PIL images -> pixel_values and image_sizes with the same values and shapes as transformers' processors.

    max_pixels bounds the intermediate images too. LLaVA 1.5's preprocessing resizes the short side to the tile size
    before cropping (and may first pad to a square), so a 1 x 20000 image would become 336 x 6,720,000 pixels (6.8 GB)
    on the way to one 336 x 336 tile; transformers makes that image, we refuse it. Only the resize-then-crop gives the
    reference's pixels: resizing just the cropped region (Pillow's `box`) rounds differently."""

    def __init__(self, cfg: ImageProcessorConfig, max_pixels: int = DEFAULT_MAX_PIXELS):
        # (torch is imported here, where tensors are made: decoding and its limits, above, serve the command line,
        # the server's media checks and the evaluations' data without it, which takes ~2 s to import)
        import torch

        self.cfg = cfg
        self.max_pixels = max_pixels
        self._mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None, None]

    def _check_intermediate(self, image: Image.Image, size_hw: tuple[int, int], step: str) -> None:
        if size_hw[0] * size_hw[1] > self.max_pixels:
            raise ImageTooLarge(
                f"a {image.width}x{image.height} image is too elongated for this model's preprocessing: {step} makes "
                f"a {size_hw[1]}x{size_hw[0]} image, over the limit of {self.max_pixels} pixels; crop the image "
                "closer to a square (or raise max_image_pixels)"
            )

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        cfg = self.cfg
        if cfg.do_resize:
            height, width = image.height, image.width
            target = cfg.size_hw or _shortest_edge_size((height, width), cfg.shortest_edge)
            self._check_intermediate(image, target, f"resizing its short side to {cfg.shortest_edge} px")
            image = _resize(image, target, cfg.resample)
        if cfg.do_center_crop:
            image = _center_crop(image, cfg.crop_size)
        return image

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """One RGB image -> its tiles as images: the base tile first, then the grid row by row (anyres)."""
        cfg = self.cfg
        if not cfg.anyres:
            if cfg.pad_to_square:
                side = max(image.width, image.height)
                self._check_intermediate(image, (side, side), "padding it to a square")
                image = _pad_to_square(image, cfg.image_mean)
            return [self._resize_and_crop(image)]
        tile = cfg.tile_size
        grid = anyres_canvas((image.height, image.width), cfg.image_grid_pinpoints, tile)
        canvas_h, canvas_w = grid.canvas
        resized = _resize(image, grid.resized, cfg.resample)
        canvas = Image.new("RGB", (canvas_w, canvas_h))  # black
        canvas.paste(resized, ((canvas_w - resized.width) // 2, (canvas_h - resized.height) // 2))
        cells = [
            canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(grid.rows) for c in range(grid.cols)
        ]
        base = _resize(image, cfg.base_size, cfg.resample)
        return [self._resize_and_crop(t) for t in [base, *cells]]

    def to_tensor(self, tiles: list[Image.Image]) -> torch.Tensor:
        """uint8 tiles -> (n, 3, H, W) float32, rescaled and normalised exactly as the reference rounds."""
        import torch

        pixels = torch.from_numpy(np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])).permute(0, 3, 1, 2)
        if self.cfg.do_rescale:
            # float64 multiply then float32, as the reference: x * (1/255) in float32 differs in the last bit.
            x = (pixels.double() * self.cfg.rescale_factor).float()
        else:
            x = pixels.float()
        if self.cfg.do_normalize:
            x = (x - self._mean) / self._std
        return x

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """RGB-converted images -> pixel_values (N, max_tiles, 3, S, S) [anyres] or (N, 3, S, S), image_sizes (N, 2)."""
        import torch

        per_image = [self.to_tensor(self.tiles(im)) for im in images]
        sizes = torch.tensor([[im.height, im.width] for im in images], dtype=torch.long).reshape(-1, 2)
        if not self.cfg.anyres:
            return {"pixel_values": torch.cat(per_image), "image_sizes": sizes}
        most = max(t.shape[0] for t in per_image)
        padded = torch.zeros((len(per_image), most, *per_image[0].shape[1:]), dtype=torch.float32)
        for i, t in enumerate(per_image):
            padded[i, : t.shape[0]] = t
        return {"pixel_values": padded, "image_sizes": sizes}
