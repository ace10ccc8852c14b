"""Image files -> uint8 tensors: decoding, a fast validity check, and the crop geometry.

Decoding uses torchvision.io (libjpeg-turbo, giflib, libwebp) for JPEG/GIF/WebP and Pillow for PNG
and the other formats. PNG goes through Pillow because torchvision's libpng decoder crashes the
process (SIGSEGV) on a damaged PNG (a fuzz of 150 damaged PNGs: 132 segfaults) where Pillow raises
OSError; its JPEG/GIF/WebP decoders raised cleanly on every damaged file of the same fuzz. Whatever
the file holds, the result is uint8 [C, H, W] with C = 1 or 3: 16-bit images are scaled
(v * 255 / 65535; 16-bit colour PNGs: Pillow's 8-bit reduction, within 1 of it), float images too
([0, 1] -> [0, 255]; other ranges min-max), never clipped. An image of more than MAX_PIXELS pixels
(any format, read from its header before decoding) is a bad image: one such file could take
gigabytes in every DataLoader worker.

Crops are computed in the coordinates of the decoded image and applied BEFORE resizing, so only
the pixels that are kept get resized. RandomResizedCrop's choices are a pure function of
(seed, epoch, sample key), the same counter-based hash as the in-memory path (augment.py): any
rank or worker makes the same crop of the same sample.
"""
from __future__ import annotations

import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from distcls.data.transforms.keys import Stream, keyed_uniform_scalar
from distcls.data.transforms.pixels import match_channels, resize_square
from distcls.errors import first_line

# torchvision 0.29 points to torchcodec on every decode; its decoders still work and are what we measured.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)
if True:  # noqa: E402  (imports after the filter)
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _tv_decode
    from torchvision.io import decode_jpeg as _tv_decode_jpeg  # noqa: F401  (GPU decoding, see gpu_decode.py)
import torchvision.transforms.v2.functional as TF  # noqa: E402



class BadImage(Exception):
    """A file that cannot be decoded as an image; the message names the file and what is wrong."""


# Magic numbers of the formats distcls reads. `tail`: the bytes a complete file ends with (a
# truncated JPEG or PNG is caught here without decoding it).
_FORMATS = (
    ("jpeg", b"\xff\xd8\xff", 0, None),
    ("png", b"\x89PNG\r\n\x1a\n", 0, b"IEND\xaeB`\x82"),
    ("gif", b"GIF8", 0, None),
    ("webp", b"WEBP", 8, None),
    ("bmp", b"BM", 0, None),
    ("tiff", b"II*\x00", 0, None),
    ("tiff", b"MM\x00*", 0, None),
    ("pnm", b"P", 0, None),
)
TORCHVISION_FORMATS = {"jpeg", "gif", "webp"}  # PNG: Pillow (see the module's docstring)

# Pillow's Image.MAX_IMAGE_PIXELS (the size above which it warns of a decompression bomb): about
# 9,460 x 9,460 pixels, 268 MB as uint8 RGB. Larger images are refused, in every format alike.
MAX_PIXELS = 89_478_485


def sniff(head: bytes) -> Optional[str]:
    for name, magic, offset, _ in _FORMATS:
        if head[offset:offset + len(magic)] == magic and (name != "pnm" or head[1:2] in b"123456"):
            return name
    return None


def check_image_file(path) -> Optional[str]:
    """Why `path` is not a usable image (None: it looks fine). Reads the first and last bytes only."""
    return inspect_image_file(path)[1]


def inspect_image_file(path) -> tuple:
    """(size in bytes, why `path` is not a usable image or None). Raw file calls, as an index of a
    million files makes them: one open, two 16-byte reads at the ends, no stat."""
    size = -1
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return size, f"unreadable ({exc.strerror or exc})"
    try:
        head = os.pread(fd, 16, 0)
        if not head:
            return 0, "empty file"
        size = os.lseek(fd, 0, os.SEEK_END)
        fmt = sniff(head)
        if fmt is None:
            return size, "not an image (unknown header)"
        tail = os.pread(fd, 16, max(0, size - 16))
    except OSError as exc:
        return size, f"unreadable ({exc.strerror or exc})"
    finally:
        os.close(fd)
    if fmt == "jpeg" and b"\xff\xd9" not in tail:
        return size, "truncated JPEG (no end-of-image marker)"
    if fmt == "png" and not tail.endswith(b"IEND\xaeB`\x82"):
        return size, "truncated PNG (no IEND chunk)"
    return size, None


def to_uint8(t: torch.Tensor) -> torch.Tensor:
    """Scale any integer/float image tensor to uint8 without clipping its range away."""
    if t.dtype == torch.uint8:
        return t
    if t.dtype == torch.uint16:
        t = t.to(torch.int32)
    if t.dtype.is_floating_point:
        t = t.double()
        lo, hi = float(t.min()), float(t.max())
        if lo >= 0 and hi <= 1:
            return (t * 255).round_().to(torch.uint8)
        if lo < 0 or hi > 255:
            t = (t - lo) / max(hi - lo, 1e-12) * 255
        return t.round_().clamp_(0, 255).to(torch.uint8)
    t = t.long()
    hi = int(t.max()) if t.numel() else 0
    if hi <= 255 and int(t.min()) >= 0:
        return t.to(torch.uint8)
    bits = 16 if hi < 65536 else 32
    return ((t.clamp(min=0) * 255 + (1 << (bits - 1))) // ((1 << bits) - 1)).to(torch.uint8)


def _open_pil(data: bytes, path):
    """Pillow's lazy open (the header only) with the pixel limit applied: a PIL image to `load()`."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in our words
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:  # beyond 2 x MAX_PIXELS Pillow refuses by itself
            found = re.search(r"\((\d+) pixels\)", str(exc))
            _refuse_pixels(path, int(found.group(1)) if found else None)
    if img.width * img.height > MAX_PIXELS:
        _refuse_pixels(path, img.width * img.height, img.size)
    return img


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame: C0-CF but DHT, JPG, DAC


def _jpeg_size(data: bytes):
    """(width, height) from a JPEG's start-of-frame segment, or None (Pillow's open then decides)."""
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def check_pixels(data: bytes, path) -> None:
    """Raise BadImage when the image's header declares more than MAX_PIXELS (reads the header only)."""
    size = _jpeg_size(data) if data[:3] == b"\xff\xd8\xff" else None  # the hot path: 2 us instead of Pillow's 40
    if size is not None:
        if size[0] * size[1] > MAX_PIXELS:
            _refuse_pixels(path, size[0] * size[1], size)
        return
    try:
        _open_pil(data, path).close()
    except BadImage:
        raise
    except Exception as exc:  # Pillow cannot parse the header: the file is damaged
        raise BadImage(f"image {path} cannot be decoded ({first_line(exc)[:200]})") from None


def _refuse_pixels(path, pixels, size=None):
    what = (
        f"{size[0]} x {size[1]} = {pixels:,} pixels" if size else f"{pixels:,} pixels" if pixels else "too many pixels"
    )
    raise BadImage(f"image {path} has {what}, more than distcls decodes ({MAX_PIXELS:,}, Pillow's decompression-bomb "
                   "limit); downscale it")


def _decode_pil(data: bytes, path, channels: int) -> torch.Tensor:
    import numpy as np

    with _open_pil(data, path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(img)
            t = torch.from_numpy(arr.astype(np.float64 if img.mode == "F" else np.int64))[None]
            if img.mode.startswith("I;16"):
                t = t.to(torch.int32).clamp(0, 65535).to(torch.uint16) if hasattr(torch, "uint16") else t
            return match_channels(to_uint8(t), channels)
        mode = "L" if channels == 1 else "RGB"
        if img.mode != mode:
            img = img.convert(mode)
        # [C, H, W] over the HWC pixels (channels-last strides): crop_resize works in that layout anyway
        return torch.from_numpy(np.array(img)).view(img.height, img.width, -1).permute(2, 0, 1)


def read_image(path, channels: int = 3) -> torch.Tensor:
    """Decode an image file to uint8 [channels, H, W]; raises BadImage naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"image {path} is unreadable ({exc.strerror or exc})") from None
    return decode_image(data, path, channels)


def decode_image(data: bytes, path, channels: int = 3) -> torch.Tensor:
    """Decode an image's bytes (a file's, or a shard member's) to uint8 [channels, H, W]; raises
    BadImage naming `path` (the file, or the shard and member)."""
    fmt = sniff(data[:16])
    if not data or fmt is None:
        raise BadImage(f"image {path} is {'an empty file' if not data else 'not an image (unknown header)'}")
    try:
        if fmt in TORCHVISION_FORMATS:
            check_pixels(data, path)
            mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY  # also CMYK, palette, alpha -> RGB/gray
            t = _tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
            if t.dim() == 4:  # animated GIF: first frame
                t = t[0]
            t = match_channels(to_uint8(t), channels)
        else:
            t = _decode_pil(data, path, channels)
    except BadImage:
        raise
    except Exception as exc:  # decoders raise RuntimeError, OSError, ValueError, ...
        first = re.sub(
            r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>",
            "its bytes",
            (str(exc).strip().splitlines() or [type(exc).__name__])[0],
        )
        raise BadImage(f"image {path} cannot be decoded ({first[:200]})") from None
    if t.shape[0] != channels or t.shape[1] < 1 or t.shape[2] < 1:
        raise BadImage(f"image {path} decodes to an unusable shape {tuple(t.shape)}")
    return t


# --------------------------------------------------------------------------- crop geometry

Box = tuple  # (top, left, height, width) in the decoded image's pixels

RRC_TRIES = 10  # as torchvision: 10 tries at a random (area, ratio), then a central fallback crop
def random_resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                            seed: int, epoch: int, key: int) -> Box:
    """torchvision's RandomResizedCrop.get_params, with every draw keyed by (seed, epoch, key)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(RRC_TRIES):
        u = [keyed_uniform_scalar(seed, epoch, key, Stream.RESIZED_CROP + 4 * i + j) for j in range(4)]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2] * (height - h + 1)), height - h)
            left = min(int(u[3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height  # fallback: whole image, cropped to the ratio range, centered
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, size: int, resize: int) -> Box:
    """The region that 'resize the shorter side to `resize`, center crop size x size' keeps."""
    side = min(height, width) * size / resize  # the crop's side in the original pixels
    h, w = min(height, max(1, round(side))), min(width, max(1, round(side)))
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(img: torch.Tensor, box: Box, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Crop `box` out of uint8 [C, H, W], then resize it (bilinear or bicubic, antialiased) to size x size."""
    top, left, h, w = box
    return resize_square(img[:, top:top + h, left:left + w], size, interpolation).contiguous()


def resize_center_crop(img: torch.Tensor, resize: int, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """torchvision's Resize(resize) (shorter side, antialiased) + CenterCrop(size) on uint8 [C, H, W]."""
    out = TF.resize(img, [resize], interpolation=TF.InterpolationMode(interpolation), antialias=True)
    return TF.center_crop(out, [size, size]).contiguous()

