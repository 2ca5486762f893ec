"""Hostile image inputs, for any test that takes images from strangers (decoding, the processor, the CLI, the server).

    from hostile_images import hostile_images
    for case in hostile_images(tmp_path):
        case.name, case.source, case.error, case.size

`source` is a file path or encoded bytes, as `decode_image` and the processor take them. `error` is None when the
input is a real image that must decode (and then give what transformers' processor gives for the upright picture),
or a regular expression the `ImageError` message must match. `size` is the upright (width, height) of one that
decodes. Everything is generated here, small and fast: no file is over a few hundred kilobytes.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

TRUNCATED = "truncated or corrupt"
NOT_AN_IMAGE = "not an image format"
TOO_LARGE = "over the limit|decompression bomb"


class HostileImage(NamedTuple):
    name: str
    source: Path | bytes
    error: str | None  # None: must decode; else a regex the ImageError message matches
    size: tuple[int, int] | None = None  # (width, height) after decoding, EXIF orientation applied


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth RGB gradients: resampling or orientation differences show in every pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [127 + 120 * np.sin(x / max(width, 1) * rng.uniform(2, 9) + rng.uniform(0, 6)),
                127 + 120 * np.cos(y / max(height, 1) * rng.uniform(2, 9)),
                127 + 120 * np.sin((x + 2 * y) / max(width + height, 1) * rng.uniform(2, 9))]
    return Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, followed by a few bytes of pixel data: a decoder that
    trusted the header would allocate width * height * 3 bytes before noticing."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _jpeg_segment(data: bytes, marker: int) -> tuple[int, int]:
    """(start of the segment's payload, after its 2-byte length; its end) of the first segment with this marker."""
    at = 2  # after SOI
    while data[at] == 0xFF and data[at + 1] != 0xDA:  # up to the start of the scan
        length = struct.unpack(">H", data[at + 2 : at + 4])[0]
        if data[at + 1] == marker:
            return at + 4, at + 2 + length
        at += 2 + length
    raise ValueError(f"no JPEG segment 0xFF{marker:02X} before the scan")


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG with the size in its frame header (SOF0) replaced: the scan data no longer matches."""
    at = _jpeg_segment(data, 0xC0)[0] + 1  # after the sample precision byte: height, then width
    return data[:at] + struct.pack(">HH", height, width) + data[at + 4 :]


def jpeg_ycck(cmyk_jpeg: bytes) -> bytes:
    """A CMYK JPEG relabelled as YCCK: its Adobe (APP14) segment's colour transform byte, the last one, set to 2."""
    end = _jpeg_segment(cmyk_jpeg, 0xEE)[1]
    return cmyk_jpeg[: end - 1] + b"\x02" + cmyk_jpeg[end:]


def exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A raw big-endian EXIF block ("Exif\\0\\0" + TIFF header + one IFD) with the given (tag, type, count, value)
    entries written as they are, however wrong: the value is 4 bytes, padded."""
    ifd = struct.pack(">H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\0")[:4]
    return b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0)


ORIENTATION = 0x0112
SHORT, ASCII = 3, 2


def _orientation_entry(value: int) -> tuple[int, int, int, bytes]:
    return (ORIENTATION, SHORT, 1, struct.pack(">H", value))


def hostile_images(directory: Path) -> list[HostileImage]:
    """Write the hostile inputs under `directory` (created if missing) and describe them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cases: list[HostileImage] = []

    def file(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        return path

    def ok(name: str, data: bytes, size: tuple[int, int]) -> None:
        cases.append(HostileImage(name, file(name, data), None, size))

    def refused(name: str, source: Path | bytes, error: str) -> None:
        cases.append(HostileImage(name, file(name, source) if isinstance(source, bytes) else source, error))

    rgb = picture(64, 48, seed=1)

    # Nothing, or not an image at all.
    refused("empty.png", b"", r"empty \(0 bytes\)")
    cases.append(HostileImage("empty bytes", b"", r"empty \(0 bytes\)"))
    refused("text.png", b"this is a text file that someone named .png\n" * 3, NOT_AN_IMAGE)
    refused("drawing.png", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
            b'<rect width="64" height="48" fill="red"/></svg>\n', NOT_AN_IMAGE)
    # PostScript: Pillow would hand it to Ghostscript, a program with a long history of exploits.
    refused("postscript.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\nnewpath 0 0 moveto showpage\n",
            NOT_AN_IMAGE)
    (directory / "folder.jpg").mkdir(exist_ok=True)
    cases.append(HostileImage("folder.jpg", directory / "folder.jpg", "directory"))
    cases.append(HostileImage("missing.jpg", directory / "missing.jpg", "no such"))
    cases.append(HostileImage("long name", directory / ("x" * 5000 + ".png"), "cannot be read.*too long"))
    if hasattr(os, "mkfifo"):  # reading a pipe would wait for a writer forever
        fifo = directory / "pipe.jpg"
        if not fifo.exists():
            os.mkfifo(fifo)
        cases.append(HostileImage("pipe.jpg", fifo, "not a regular file"))

    # Truncated: half of each file.
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("WEBP", "webp")):
        data = encode(rgb, fmt)
        refused(f"truncated.{ext}", data[: len(data) // 2], TRUNCATED)
    cases.append(HostileImage("truncated jpeg bytes", encode(rgb, "JPEG")[:300], TRUNCATED))

    # Headers that claim far more pixels than any limit allows: refused before a pixel is decoded.
    refused("bomb-100000x100000.png", png_header_only(100_000, 100_000), TOO_LARGE)
    refused("bomb-65535x65535.jpg", jpeg_with_size(encode(rgb, "JPEG"), 65535, 65535), TOO_LARGE)
    # Under Pillow's own bomb threshold (2 x 89 M pixels) but over ours (50 M): only our check refuses it.
    refused("bomb-8000x8000.png", png_header_only(8000, 8000), TOO_LARGE)

    ok("plain.png", encode(rgb, "PNG"), (64, 48))

    # Extreme sizes.
    ok("1x1.png", encode(picture(1, 1), "PNG"), (1, 1))
    ok("1x20000.png", encode(picture(1, 20000, seed=2), "PNG"), (1, 20000))
    ok("20000x1.png", encode(picture(20000, 1, seed=3), "PNG"), (20000, 1))

    # Animations: the first frame is the image, as in transformers (Pillow opens frame 0).
    frames = [rgb, rgb.transpose(Image.Transpose.ROTATE_180), picture(64, 48, seed=9)]
    for fmt, ext in (("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")):
        ok(f"animated.{ext}", encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0),
           (64, 48))

    # Pixel formats beyond 8-bit RGB.
    sixteen = Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16))
    ok("16bit.tiff", encode(sixteen, "TIFF"), (64, 48))
    ok("16bit.png", encode(sixteen, "PNG"), (64, 48))
    ok("float.tiff", encode(Image.fromarray(np.linspace(-0.5, 300.5, 48 * 64, dtype=np.float32).reshape(48, 64)),
                            "TIFF"), (64, 48))
    cmyk = encode(rgb.convert("CMYK"), "JPEG")
    ok("cmyk.jpg", cmyk, (64, 48))
    ok("ycck.jpg", jpeg_ycck(cmyk), (64, 48))
    ok("palette.png", encode(rgb.convert("P"), "PNG"), (64, 48))
    ok("palette-transparent.png", encode(rgb.convert("P"), "PNG", transparency=7), (64, 48))
    ok("palette-transparent.gif", encode(rgb.convert("P"), "GIF", transparency=7), (64, 48))
    ok("grey-alpha.png", encode(rgb.convert("LA"), "PNG"), (64, 48))
    ok("rgba.webp", encode(rgb.convert("RGBA"), "WEBP", lossless=True), (64, 48))

    # EXIF orientations 1-8: 5-8 turn the picture on its side.
    for orientation in range(1, 9):
        size = (48, 64) if orientation >= 5 else (64, 48)
        ok(f"orientation-{orientation}.jpg", encode(rgb, "JPEG", exif=exif_block([_orientation_entry(orientation)])),
           size)
    ok("orientation-6.png", encode(rgb, "PNG", exif=exif_block([_orientation_entry(6)])), (48, 64))
    ok("orientation-6.webp", encode(rgb, "WEBP", exif=exif_block([_orientation_entry(6)])), (48, 64))
    # Broken EXIF: the pixels are fine. Where the orientation can still be read it is applied; where it cannot,
    # the picture is used as stored (what every viewer shows).
    ok("exif-garbage.jpg", encode(rgb, "JPEG", exif=b"Exif\0\0this is not a TIFF structure"), (64, 48))
    ok("exif-bad-header.png", encode(rgb, "PNG", exif=b"Exif\0\xd7MM\0*\0\0\0\x08\0\0"), (64, 48))
    ok("exif-ifd-out-of-range.jpg", encode(rgb, "JPEG", exif=b"Exif\0\0MM\0*\xff\xff\xff\xf0"), (64, 48))
    ok("exif-orientation-text.jpg", encode(rgb, "JPEG", exif=exif_block([(ORIENTATION, ASCII, 4, b"six\0")])),
       (64, 48))
    ok("exif-orientation-9.jpg", encode(rgb, "JPEG", exif=exif_block([_orientation_entry(9)])), (64, 48))
    # Orientation 6 next to tags of the wrong type: Pillow reads the orientation but fails to write the EXIF back.
    ok("exif-wrong-type-rational.jpg", encode(rgb, "JPEG", exif=exif_block(
        [_orientation_entry(6), (0x011F, ASCII, 4, b"abc\0")])), (48, 64))
    ok("exif-wrong-type-short.jpg", encode(rgb, "JPEG", exif=exif_block(
        [_orientation_entry(6), (0x0119, ASCII, 4, b"abc\0")])), (48, 64))

    # File names that are not UTF-8 (a Latin-1 name on a Linux disk).
    if os.name == "posix":
        latin1 = Path(os.fsdecode(bytes(directory) + b"/caf\xe9.png"))
        latin1.write_bytes(encode(rgb, "PNG"))
        cases.append(HostileImage("caf\\xe9.png", latin1, None, (64, 48)))
        broken = Path(os.fsdecode(bytes(directory) + b"/\xff\xfe-cut.png"))
        broken.write_bytes(encode(rgb, "PNG")[:100])
        cases.append(HostileImage("\\xff\\xfe-cut.png", broken, TRUNCATED))
    return cases
