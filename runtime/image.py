"""Image loading and MiniCPM-V 4.5 slicing, faithful to the reference image processor.

The reference (hub `image_processing_minicpmv.py`, docs/reference-model.md §4) turns one image into an
overview plus an optional grid of slices, every side a multiple of the 14-pixel patch:

- `get_sliced_grid` picks (cols, rows) from the area ratio to 448^2 and the aspect ratio;
  no grid when the area is <= 448^2 (or `never_split`, or `max_slice_nums` == 1).
- no grid: the overview is the image resized (up or down) to about 448^2 pixels, aspect kept.
- grid: the overview is the image downscaled to about 448^2; the "refined" image is resized so
  that every cell is about 448^2, then cut into rows x cols equal slices, row-major.
- every resize is PIL BICUBIC of the RGB image; pixels are normalized to (x/255 - 0.5)/0.5.

Rounding is Python's `round` (half to even) and the grid choice keeps the first candidate on
ties, exactly as the reference.

llama.cpp's mtmd (llava_uhd preprocessor, used for MiniCPM-V 4.5) differs, and we follow the
reference, not mtmd (each point is pinned by tests/test_image_slicing.py, which re-implements
mtmd's plan and also runs llama.cpp's compiled code):
- it slices whenever a side exceeds 448 (so 500x400 or 600x300 get a 2x1 grid; the reference
  gives one overview for any area <= 448^2);
- it stretches every unsliced image to exactly 448x448 (the reference keeps the aspect ratio:
  300x200 -> 546x364);
- it letter-boxes the refined image (aspect-preserving resize onto a black canvas) where the
  reference stretches it, so slice pixels differ unless the refined size keeps the aspect
  (1000x700 and 1920x1080 differ; 640x480, 896x448, 1344x1344 are bit-identical);
- it rounds half away from zero (`std::round`) in float32 where the reference rounds half to
  even in float64: for random sizes sliced by both, ~7% get a different overview size and
  ~11% a different overview or slice size (101x2003: overview 98x2002 vs 98x1988), and float32
  errors make the (2,3)/(3,2) tie a real tie (1002x1002: mtmd 2 cols x 3 rows, reference 3 x 2).
Where the sizes agree, the overview pixels are bit-identical (mtmd's resampler is a Pillow port).
For 640x480, 800x600, 1344x1344 and 1920x1080 both give the same grid, overview and slice sizes.

EXIF orientation is not applied (neither the reference nor mtmd does).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from minicpmv.schema import IMAGE_MEAN, IMAGE_STD, MAX_SLICE_NUMS, PATCH_SIZE, SCALE_RESOLUTION

# The image formats decoded (Pillow format ids; "JPEG" also opens the multi-picture MPO files of cameras).
# Anything else is refused before any decoder runs: Pillow identifies a file by its content, and
# some of its plugins hand the data to external programs (EPS to Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = ("JPEG", "PNG", "WebP", "GIF", "BMP", "TIFF")
# Refuse images above this many pixels before decoding them (a 100 MP RGB image is 300 MB).
MAX_PIXELS = 100_000_000
# Refuse aspect ratios beyond 1:MAX_ASPECT: the unsliced overview of a 1xN image is a single
# 14-pixel-wide strip of ~32*sqrt(N) patches for the vision tower (one attention sequence):
# 1x4000 -> 14x28336, 2024 patches; 1:10000 -> 3200 patches.
MAX_ASPECT = 10_000


class ImageError(ValueError):
    """Bad image input; the message is one line naming the file (or "<PIL image>"). `limit` names
    the bound exceeded ("max_image_pixels"), if that is the fault."""

    def __init__(self, message: str, limit: str | None = None):
        super().__init__(message)
        self.limit = limit


# --------------------------------------------------------------------------- reference rules


def ensure_divide(length: float, patch_size: int) -> int:
    """Nearest multiple of `patch_size` (Python round: half to even), at least one patch."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    size: tuple[float, float],
    scale_resolution: int = SCALE_RESOLUTION,
    patch_size: int = PATCH_SIZE,
    allow_upscale: bool = False,
) -> tuple[int, int]:
    """(width, height) of about scale_resolution^2 pixels with the aspect of `size`.

    Images not larger than scale_resolution^2 keep their size unless `allow_upscale`.
    Height is truncated first, width derived from it (as the reference), both then snapped.
    """
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(
    size: tuple[int, int],
    grid: tuple[int, int],
    scale_resolution: int = SCALE_RESOLUTION,
    patch_size: int = PATCH_SIZE,
    allow_upscale: bool = True,
) -> tuple[int, int]:
    """(width, height) of the refined image: grid cells of about scale_resolution^2 each."""
    width, height = size
    gx, gy = grid
    cell = (ensure_divide(width, gx) / gx, ensure_divide(height, gy) / gy)
    bw, bh = find_best_resize(cell, scale_resolution, patch_size, allow_upscale=allow_upscale)
    return bw * gx, bh * gy


def get_sliced_grid(
    size: tuple[int, int],
    max_slice_nums: int = MAX_SLICE_NUMS,
    never_split: bool = False,
    scale_resolution: int = SCALE_RESOLUTION,
) -> tuple[int, int] | None:
    """(cols, rows) of the slice grid, or None when the image is not sliced."""
    width, height = size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1 or never_split:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    best, best_err = (1, 1), float("inf")
    for n in counts:
        for m in range(1, n + 1):
            if n % m == 0:
                err = abs(log_ratio - math.log(m / (n // m)))
                if err < best_err:  # strict: the first candidate wins ties
                    best, best_err = (m, n // m), err
    return best


# --------------------------------------------------------------------------- slicing


def normalize(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 [3, H, W], (x/255 - mean)/std computed in float32 like the reference."""
    a = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.float32)
    a = (a / np.float32(255.0) - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


@dataclass
class SlicedImage:
    """One image as the reference feeds it to the vision tower: overview first, then slices."""

    grid: tuple[int, int] | None  # (cols, rows), None when not sliced
    overview: Image.Image
    slices: list[Image.Image] = field(default_factory=list)  # row-major
    patch_size: int = PATCH_SIZE

    @property
    def images(self) -> list[Image.Image]:
        return [self.overview, *self.slices]

    @property
    def tgt_sizes(self) -> list[tuple[int, int]]:
        """(patch rows, patch cols) = (H/14, W/14) per output image, overview first."""
        return [(im.height // self.patch_size, im.width // self.patch_size) for im in self.images]

    def pixel_values(self) -> list[np.ndarray]:
        """Normalized float32 [3, H, W] per output image, overview first."""
        return [normalize(im) for im in self.images]


def slice_image(
    img: Image.Image,
    max_slice_nums: int = MAX_SLICE_NUMS,
    scale_resolution: int = SCALE_RESOLUTION,
    patch_size: int = PATCH_SIZE,
    never_split: bool = False,
) -> SlicedImage:
    """Reference slicing of a PIL image (converted to RGB with PIL first, as the reference does).

    Only the two resizes the reference makes are done (overview, refined image); slices are crops.
    """
    if max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
    check_size(img.size, "<PIL image>")
    if img.mode != "RGB":
        img = img.convert("RGB")
    size = img.size
    grid = get_sliced_grid(size, max_slice_nums, never_split, scale_resolution)
    if grid is None:
        best = find_best_resize(size, scale_resolution, patch_size, allow_upscale=True)
        return SlicedImage(None, img.resize(best, Image.Resampling.BICUBIC), [], patch_size)

    best = find_best_resize(size, scale_resolution, patch_size, allow_upscale=False)
    overview = img.resize(best, Image.Resampling.BICUBIC)
    refine_w, refine_h = get_refine_size(size, grid, scale_resolution, patch_size, allow_upscale=True)
    refined = img.resize((refine_w, refine_h), Image.Resampling.BICUBIC)
    gx, gy = grid
    sw, sh = refine_w // gx, refine_h // gy
    slices = [refined.crop((c * sw, r * sh, (c + 1) * sw, (r + 1) * sh)) for r in range(gy) for c in range(gx)]
    return SlicedImage(grid, overview, slices, patch_size)


# --------------------------------------------------------------------------- loading


def check_size(size: tuple[int, int], name: str, max_pixels: int = MAX_PIXELS) -> None:
    """Raise ImageError for empty, oversized or absurdly elongated images."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: empty image ({w}x{h} pixels)")
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: image of {w}x{h} = {w * h / 1e6:.0f} MP exceeds the limit of {max_pixels / 1e6:.0f} MP",
            limit="max_image_pixels",
        )
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"{name}: aspect ratio of {w}x{h} exceeds the limit of 1:{MAX_ASPECT}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB as the reference's plain `.convert("RGB")`: alpha is dropped, not
    composited over a background (docs/architecture.md §4). 16/32-bit gray is scaled, not clipped."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img)
        if mode == "F":  # float images: [0, 1] if they fit, else [0, 255]
            a = np.nan_to_num(a.astype(np.float64))
            scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
            g = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        else:  # I;16* and I (16-bit PNG/TIFF data): 0..65535 -> 0..255, rounded
            a = np.clip(a.astype(np.int64), 0, 65535)
            g = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(g, "L").convert("RGB")
    if mode == "La":  # premultiplied; PIL converts it only to LA (the reference's convert fails)
        img, mode = img.convert("LA"), "LA"
    if mode == "P" and "transparency" in img.info:  # convert("RGB")'s pixels, without PIL's warning
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB") if mode != "RGB" else img


def load_image(
    source: str | os.PathLike | bytes | Image.Image, *, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Open a file or bytes in memory (an upload), or take a PIL image, and return a decoded 8-bit
    RGB PIL image.

    Only IMAGE_FORMATS are decoded (Pillow is told so with `formats=`, so a file named .png that is
    really PostScript never reaches Ghostscript). Raises ImageError with one line naming the file
    (`name`, or the path; "<image bytes>" for bytes) for: a missing/unreadable file, a file that
    is not an image of those formats, a truncated image, an empty (0-pixel) image, more than
    `max_pixels` pixels (checked from the header before decoding; PIL's own bomb guard is turned
    into the same error) or an aspect ratio beyond 1:MAX_ASPECT. A 1x1 image is valid: slicing
    upscales it to 448x448 like the reference. CMYK, palette (with transparency), L/LA/RGBA and
    16-bit gray are converted to RGB, alpha dropped as the reference does. An animated GIF or a
    multi-page TIFF gives its first frame.
    """
    if isinstance(source, Image.Image):
        name = name or "<PIL image>"
        check_size(source.size, name, max_pixels)
        try:
            return _to_rgb(source)
        except (OSError, ValueError) as e:
            raise ImageError(f"{name}: cannot convert mode {source.mode} to RGB ({e})") from None

    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<image bytes>"
        if not len(source):
            raise ImageError(f"{name}: empty, not an image")
        fp = io.BytesIO(source)
    else:
        name = name or str(source)
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        fp = path
    try:
        with warnings.catch_warnings():
            # Pillow's notes (a big image, damaged EXIF...) would be extra lines on stderr; what
            # matters comes out as the image or one ImageError
            warnings.simplefilter("ignore")
            with Image.open(fp, formats=IMAGE_FORMATS) as img:
                check_size(img.size, name, max_pixels)  # header only, nothing decoded yet
                img.load()
                return _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name}: image exceeds the limit of {max_pixels / 1e6:.0f} MP (and PIL's decompression-bomb limit)",
            limit="max_image_pixels",
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a supported format ({', '.join(FORMAT_NAMES)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ImageError(f"{name}: cannot decode image ({msg})") from None
