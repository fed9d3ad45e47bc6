"""Image decoding and the student's pixel transforms.

The same decoder (`decode_checked`, `decode_rgb`) checks records when a dataset is prepared and decodes them when it
is read, so what the converter accepts is exactly what the loader can use.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

# torch, timm and torchvision are imported where the pixel transforms need them: `kclip prepare` decodes images with
# this module (in every worker too) and starts without them.
if TYPE_CHECKING:
    import torch
    from torchvision import transforms as T

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


def image_transform(image_size: int, train: bool) -> T.Compose:
    """timm's CLIP recipe: train = RandomResizedCrop(scale 0.9-1, bicubic); eval = resize shorter side + center crop.
    Both end in ToTensor and CLIP mean/std normalisation: pixels = (x / 255 - mean) / std."""
    from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    if train:
        geometry = [T.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, interpolation=bicubic)]
    else:
        geometry = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """One seed per (run seed, epoch, sample): a resumed run crops every sample exactly as an uninterrupted run would,
    independent of worker count, and each epoch sees new crops."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2**63)


def apply_seeded(transform, image: Image.Image, seed: int) -> torch.Tensor:
    """Run `transform` with torch's CPU RNG seeded to `seed`, restoring the caller's RNG state afterwards (with
    num_workers=0 the transform runs in the training process, whose RNG must not be disturbed)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also reseed every CUDA generator (~0.26 ms per sample).
        torch.default_generator.manual_seed(seed)
        return transform(image)
