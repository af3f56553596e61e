"""Robust image loading for scraped corpora: a bad file is a counted skip, never a crashed epoch.

Real image-caption corpora always hold some zero-byte files, half-downloaded JPEGs, decompression bombs and
odd colour modes. `load_image` turns each into a named reason instead of an exception, `to_rgb` normalises
every mode to 8-bit RGB, and `SkipCounter` keeps the tally so a run can say what it threw away.
"""
from __future__ import annotations

import io
import logging
import math
import os
import threading
import warnings
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from mos_lightning.data.shapes import to_tensor  # noqa: F401  (re-exported: PIL RGB -> (3, H, W) in [-1, 1])
from mos_lightning.errors import ConfigError

log = logging.getLogger("mos_lightning.data")

REASONS = ("corrupt", "truncated", "empty", "too_large", "unreadable")
DEFAULT_MAX_PIXELS = 64_000_000
BACKGROUND = (255, 255, 255)  # transparent pixels become white: logos and clip-art are drawn for white pages
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _open(src: str | os.PathLike | bytes) -> tuple[Image.Image | None, str | None]:
    """Open lazily (header only); zero bytes and unreadable paths are told apart from bad content."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            return None, "empty"
        fp = io.BytesIO(src)
    else:
        try:
            if os.path.getsize(src) == 0:
                return None, "empty"
            with open(src, "rb") as f:  # read once so no file handle outlives the call
                fp = io.BytesIO(f.read())
        except OSError:
            return None, "unreadable"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
            return Image.open(fp), None
    except Image.DecompressionBombError:
        return None, "too_large"
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, "corrupt"


def _decode_failure(err: Exception) -> str:
    return "truncated" if "truncat" in str(err).lower() else "corrupt"


def _draft(im: Image.Image, cover: tuple[int, int]) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) while it still covers `cover`
    (H, W, after EXIF rotation): a 512 px photo bound for a 32 px bucket then decodes ~8x smaller."""
    if im.format != "JPEG":
        return
    h, w = cover
    try:
        if im.getexif().get(0x0112) in _ROTATED:
            h, w = w, h  # the stored image is the rotated one
    except Exception:  # noqa: BLE001  a broken EXIF block: decode at full size
        return
    scale = max(h / im.height, w / im.width)
    im.draft(None, (math.ceil(im.width * scale), math.ceil(im.height * scale)))


def load_image(src: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               cover: tuple[int, int] | None = None) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, reason), reason one of REASONS.

    The pixel count is read from the header before anything is decoded, so an oversized image costs a header
    parse, not gigabytes. Truncated files are rejected (LOAD_TRUNCATED_IMAGES is left alone): a half-grey
    training image is worse than a skipped one. Pillow's own bomb guard (2 x Image.MAX_IMAGE_PIXELS, ~179M)
    still applies at open, so a max_pixels above it changes nothing; we do not raise that global.
    With `cover` (H, W), a JPEG may come out smaller than stored but never smaller than needed to cover it.
    """
    im, reason = _open(src)
    if im is None:
        return None, reason
    w, h = im.size
    if w * h > max_pixels or w <= 0 or h <= 0:
        return None, "too_large" if w * h > max_pixels else "corrupt"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if cover is not None:
                _draft(im, cover)
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im), None
    except Image.DecompressionBombError:
        return None, "too_large"
    except Exception as err:  # noqa: BLE001  OSError, SyntaxError, zlib.error, ...: still one bad file
        return None, _decode_failure(err)


def header_size(src: str | os.PathLike | bytes) -> tuple[int, int] | None:
    """(H, W) as the image will come out of load_image (EXIF rotation applied), from the header alone;
    None if the file cannot even be opened (empty, unreadable, not an image, beyond Pillow's bomb guard)."""
    im, _ = _open(src)
    if im is None:
        return None
    w, h = im.size
    try:
        rotated = im.getexif().get(0x0112) in _ROTATED
    except Exception:  # noqa: BLE001  a broken EXIF block does not make the size unknown
        rotated = False
    return (w, h) if rotated else (h, w)


def _wide_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / int32 / float greyscale -> L. Pillow's own convert clips at 255 instead of rescaling."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
    else:
        top = 65535.0 if arr.size and arr.max() > 255 else 255.0
    arr = np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255)
    return Image.fromarray(arr.round().astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited over BACKGROUND (white)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = _wide_to_8bit(im)
    if im.mode == "P" and "transparency" in im.info or im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
        base = Image.new("RGBA", im.size, BACKGROUND + (255,))
        im = Image.alpha_composite(base, im)
    return im if im.mode == "RGB" else im.convert("RGB")


def check_size(image_size: int | Sequence[int], name: str = "image_size") -> tuple[int, int]:
    """Normalise an int or (H, W) of positive ints to (H, W)."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    ok = len(hw) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw)
    if not ok:
        raise ConfigError(f"{name}: expected a positive int or (H, W) positive ints, got {image_size!r}")
    return hw


def cover_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers (H, W), then centre-crop: no padding, no aspect distortion."""
    (h, w), (ih, iw) = size, (im.height, im.width)
    scale = max(h / ih, w / iw)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    if (nw, nh) != (iw, ih):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))


class SkipCounter:
    """Skipped samples by reason, with rate-limited warnings on logger "mos_lightning.data".

    A lock makes it safe across threads. DataLoader workers are processes: each worker counts into its own
    copy, so the main process's counter sees only main-process skips; `merge` adds up counters returned from
    workers. `key` de-duplicates, so a map-style sample that is revisited every epoch is counted once.
    """

    def __init__(self, first: int = 5, every: int = 1000):
        self.first, self.every = first, every
        self.counts: Counter[str] = Counter()
        self._seen: set = set()
        self._lock = threading.Lock()

    def add(self, reason: str, key=None, detail: str = "") -> bool:
        """Count one skip; False if `key` was counted before."""
        with self._lock:
            if key is not None:
                if (reason, key) in self._seen:
                    return False
                self._seen.add((reason, key))
            self.counts[reason] += 1
            n = self.counts[reason]
        if n <= self.first or n % self.every == 0:
            log.warning("skipped sample (%s, #%d for this reason)%s", reason, n, f": {detail}" if detail else "")
        return True

    def merge(self, other: "SkipCounter") -> "SkipCounter":
        with self._lock:
            self.counts.update(other.counts)
            self._seen |= other._seen
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def summary(self) -> str:
        if not self.counts:
            return "skipped 0 samples"
        parts = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        return f"skipped {self.total} samples: {parts}"

    def __getstate__(self):  # locks do not pickle; workers get a fresh one
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def image_tensor(src, image_size: tuple[int, int], skipped: SkipCounter, key=None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor | None:
    """Load, cover-crop and convert one image; None (and a counted skip) when it is bad."""
    im, reason = load_image(src, max_pixels, cover=image_size)
    if im is None:
        skipped.add(reason, key, detail=str(key) if key is not None else "")
        return None
    return to_tensor(cover_crop(im, image_size))
