"""Image decoding and the student's pixel transforms.

The same decoder (`decode_checked`, `decode_rgb`) checks records when a dataset is prepared and decodes them when it
is read, so what the converter accepts is exactly what the loader can use.
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

# torch, timm and torchvision are imported where the pixel transforms need them: `kclip prepare` decodes images with
# this module (in every worker too) and starts without them.
if TYPE_CHECKING:
    import torch

# Random crops keep at least 90% of the image: captions describe the whole picture, so a strong crop would cut away
# what the caption names. No horizontal flip: captions say "left"/"right" (emoji names include "left arrow",
# "right-facing fist"), and a mirrored image would contradict its caption.
TRAIN_CROP_SCALE = (0.9, 1.0)


# Grayscale modes with more than 8 bits per pixel: 16-bit PNG, TIFF and PGM files open as `I;16*` (or `I` in older
# Pillow). Pillow's convert() clips their 0-65535 values at 255, so all but the darkest pixels came out white.
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _high_byte(img: Image.Image) -> Image.Image:
    """A wide grayscale image as 8-bit `L` (its high byte); `LA` when a 16-bit transparency key marks pixels, since the
    key is a 16-bit value and means nothing once the pixels are 8-bit."""
    values = np.asarray(img)
    gray = Image.fromarray(np.clip(values >> 8, 0, 255).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if key is not None:
        gray.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L"))
    return gray


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels composited onto white. Converting RGBA straight to RGB would keep whatever colour hides
    under transparent pixels (often black). Training, export and embedding all prepare images through this."""
    if img.mode in WIDE_GRAY_MODES:
        img = _high_byte(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def decode_checked(data: bytes, max_pixels: int | None = None) -> tuple[Image.Image, bool]:
    """(the image as `to_rgb`, whether the file holds more than one frame). Only the first frame is decoded: it is what
    every reader of the stored bytes gets. `Image.open` only parses the header: `load()` decodes every pixel, so
    truncated files fail here rather than later.

    Images over `max_pixels` raise Image.DecompressionBombError, as Pillow itself does over 2 x
    Image.MAX_IMAGE_PIXELS, with the size read from the header: a small file can claim a huge image (a 420 KB PNG of
    144 Mpx takes 1.9 GB to decode), so the check must come before any pixel is decoded."""
    with Image.open(io.BytesIO(data)) as img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise Image.DecompressionBombError(
                f"{img.width}x{img.height} = {img.width * img.height:,} pixels, over max_pixels {max_pixels:,}")
        img.load()
        return to_rgb(img), getattr(img, "is_animated", False)


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode image bytes to RGB (`to_rgb`), first frame only (`decode_checked`)."""
    return decode_checked(data)[0]


def train_crop_box(width: int, height: int, draws) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop: torchvision's `RandomResizedCrop.get_params` (scale TRAIN_CROP_SCALE, aspect
    ratio 3/4-4/3 log-uniform, up to 10 tries, then a centre crop) with its random numbers taken from `draws`, 40
    uniforms in [0, 1) (4 per try: area, log aspect ratio, top, left). Same algorithm, so the same distribution of
    crops; only the generator differs."""
    area = width * height
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    lo, hi = TRAIN_CROP_SCALE
    for attempt in range(10):
        u_area, u_ratio, u_top, u_left = draws[4 * attempt: 4 * attempt + 4]
        target_area = area * (lo + (hi - lo) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    # torchvision's fallback: the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_draws(seed: int, epoch: int, index: int) -> np.ndarray:
    """The 40 uniforms of sample `index`'s crop in `epoch`: a counter-based generator (Philox) keyed by (seed, epoch)
    at counter `index`. Computed from the three numbers alone, so a resumed run and any worker count crop every sample
    exactly as an uninterrupted run would, without touching (or forking) any global RNG."""
    bits = np.random.Philox(key=[seed % 2**64, epoch], counter=[0, 0, 0, index]).random_raw(40)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def train_pixels(image: Image.Image, image_size: int, draws) -> np.ndarray:
    """The training crop resized to image_size x image_size (bicubic), as uint8 HWC; `normalize` finishes it."""
    top, left, h, w = train_crop_box(image.width, image.height, draws)
    crop = image.crop((left, top, left + w, top + h)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(crop)


def eval_pixels(image: Image.Image, image_size: int) -> np.ndarray:
    """Shorter side resized to image_size (bicubic), centre crop, as uint8 HWC: torchvision's Resize + CenterCrop."""
    from torchvision.transforms import functional as F

    image = F.center_crop(F.resize(image, image_size, interpolation=F.InterpolationMode.BICUBIC), image_size)
    return np.asarray(image)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> float [B, 3, H, W] = (x / 255 - mean) / std with CLIP's mean and std, in one pass
    over the batch. The same float32 operations in the same order as torchvision's ToTensor + Normalize per image, so
    the values are bitwise theirs."""
    import torch
    from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.permute(0, 3, 1, 2).contiguous().float().div_(255).sub_(mean).div_(std)
