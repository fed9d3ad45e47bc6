"""Image decoding and the student's pixel transforms.

The same `decode_rgb` checks records when a dataset is prepared and decodes them when it is read, so what the
converter accepts is exactly what the loader can use.
"""
from __future__ import annotations

import io

import torch
from PIL import Image
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torchvision import transforms as T

# Random crops keep at least 90% of the image: captions describe the whole picture, so a strong crop would cut away
# what the caption names. No horizontal flip: captions say "left"/"right" (emoji names include "left arrow",
# "right-facing fist"), and a mirrored image would contradict its caption.
TRAIN_CROP_SCALE = (0.9, 1.0)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels composited onto white. Converting RGBA straight to RGB would keep whatever colour hides
    under transparent pixels (often black). Training, export and embedding all prepare images through this."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode image bytes to RGB (`to_rgb`). `Image.open` only parses the header: `load()` decodes every pixel,
    so truncated files fail here rather than later."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def image_transform(image_size: int, train: bool) -> T.Compose:
    """timm's CLIP recipe: train = RandomResizedCrop(scale 0.9-1, bicubic); eval = resize shorter side + center crop.
    Both end in ToTensor and CLIP mean/std normalisation: pixels = (x / 255 - mean) / std."""
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
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also reseed every CUDA generator (~0.26 ms per sample).
        torch.default_generator.manual_seed(seed)
        return transform(image)
