"""Input images: safe loading, mode conversion, resolution buckets, resize and centre crop."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # refuse larger inputs: decoding them alone would take gigabytes
SPATIAL_MULTIPLE = 16  # 8x VAE times the 2x2 patch

# (height, width) buckets of the reference demos at resolution 640
BUCKETS_640: tuple[tuple[int, int], ...] = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)


def buckets(resolution: int = 640) -> list[tuple[int, int]]:
    """The 640 buckets, scaled to ``resolution`` and rounded to multiples of 16."""
    if resolution < SPATIAL_MULTIPLE:
        raise ValueError(f"resolution must be >= {SPATIAL_MULTIPLE}, got {resolution}")
    if resolution == 640:
        return list(BUCKETS_640)

    def scaled(v: int) -> int:
        return max(SPATIAL_MULTIPLE, round(v * resolution / 640 / SPATIAL_MULTIPLE) * SPATIAL_MULTIPLE)

    return sorted({(scaled(h), scaled(w)) for h, w in BUCKETS_640})


def nearest_bucket(height: int, width: int, resolution: int = 640) -> tuple[int, int]:
    """The bucket closest in aspect ratio: minimal |h * bw - w * bh| (first wins on ties)."""
    return min(buckets(resolution), key=lambda b: abs(height * b[1] - width * b[0]))


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, upright.

    The EXIF orientation (how a phone held the camera) is applied. CMYK, palette, greyscale and
    16-bit images are converted; transparency is composited on white. Raises ValueError with a
    one-line reason for missing, empty, corrupt or oversized files.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ValueError(f"image not found: {path}")
    if path.is_dir():
        raise ValueError(f"image path is a directory: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty: {path}")
    try:
        with Image.open(path) as img:
            _check_size(path, img.width, img.height, max_pixels)
            img.load()
            return to_rgb(_upright(img))
    except Image.DecompressionBombError:
        # Pillow refuses huge images before we see their size: read it from the header ourselves
        size = declared_size(path)
        if size is not None:
            _check_size(path, *size, max_pixels)
        raise ValueError(f"image {path.name} is larger than the limit of {max_pixels / 1e6:.0f} MP") from None
    except UnidentifiedImageError as exc:
        raise ValueError(f"not a readable image: {path} ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise ValueError(f"not a readable image: {path} ({exc})") from None


def _upright(img):
    """The image as it is meant to be seen: its EXIF orientation applied (phones store pixels sideways)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001  (malformed EXIF: Pillow raises many kinds; the pixels are fine)
        log.warning("ignoring the unreadable EXIF orientation of %s (%s)", img.filename or "the image", exc)
        return img


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ValueError(f"image {path.name} is {width}x{height} = {width * height / 1e6:.1f} MP; "
                         f"the limit is {max_pixels / 1e6:.0f} MP")


def declared_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header through Pillow's format plugins, without the
    decompression-bomb check that ``Image.open`` applies (it runs before we could name the size).
    Nothing is decoded; None if no plugin reads the header."""
    from PIL import Image

    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for name in Image.ID:
            factory, accept = Image.OPEN[name]
            if accept is not None and not accept(prefix):
                continue
            fp.seek(0)
            try:
                header = factory(fp, str(path))
            except Exception:  # noqa: BLE001  (a plugin that cannot read it: try the next one)
                continue
            return header.size
    return None


def to_rgb(img) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 RGB."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the actual range to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def resize_and_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to cover (height, width) with LANCZOS, then centre-crop. (H, W, 3) uint8."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.LANCZOS))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[top : top + height, left : left + width].copy()


def prepare_image(image: np.ndarray, resolution: int = 640) -> np.ndarray:
    """Bucket, resize and crop: the start (or end) frame of a video."""
    height, width = nearest_bucket(image.shape[0], image.shape[1], resolution)
    return resize_and_crop(image, height, width)
