"""The loader's pixel pipeline against torchvision's: the same crop distribution, the same pixels for the same crop."""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms as T
from torchvision.transforms import functional as F

from kclip.data.transforms import (
    TRAIN_CROP_SCALE,
    crop_draws,
    eval_pixels,
    normalize,
    train_crop_box,
    train_pixels,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def crop_features(boxes, width: int, height: int) -> dict[str, np.ndarray]:
    """What defines a crop, scale-free: area fraction, log aspect ratio, and where it sits in its free range."""
    top, left, h, w = (np.array(x, dtype=np.float64) for x in zip(*boxes))
    return {"area": h * w / (width * height), "log_ratio": np.log(w / h),
            "top": top / np.maximum(height - h, 1), "left": left / np.maximum(width - w, 1)}


@pytest.mark.parametrize("size", [(72, 72), (160, 90), (40, 120)])
def test_crop_boxes_follow_torchvisions_random_resized_crop_distribution(size):
    """Counter-based draws replace torch's RNG: the crops must still be RandomResizedCrop's (same scale and ratio
    ranges, same retries and centre-crop fallback, which the wide and tall sizes exercise)."""
    width, height = size
    n = 3000
    ours = [train_crop_box(width, height, crop_draws(7, 0, i)) for i in range(n)]
    torch.manual_seed(0)
    img = Image.new("RGB", size)
    theirs = [T.RandomResizedCrop.get_params(img, TRAIN_CROP_SCALE, (3 / 4, 4 / 3)) for _ in range(n)]
    a, b = crop_features(ours, width, height), crop_features(theirs, width, height)
    for name in a:
        assert ks_2samp(a[name], b[name]).pvalue > 1e-3, name
    for top, left, h, w in ours:
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0


def test_crop_draws_depend_on_seed_epoch_and_index_only():
    draws = crop_draws(3, 1, 42)
    assert draws.shape == (40,) and ((0 <= draws) & (draws < 1)).all()
    assert np.array_equal(draws, crop_draws(3, 1, 42))
    others = [crop_draws(4, 1, 42), crop_draws(3, 2, 42), crop_draws(3, 1, 43)]
    assert all(not np.array_equal(draws, o) for o in others)
    assert abs(float(np.mean([crop_draws(0, 0, i) for i in range(200)])) - 0.5) < 0.01


def test_train_pixels_are_torchvisions_resized_crop_to_tensor_normalize_bitwise():
    image = photo(90, 70)
    draws = crop_draws(1, 0, 5)
    top, left, h, w = train_crop_box(image.width, image.height, draws)
    reference = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])(
        F.resized_crop(image, top, left, h, w, [32, 32], interpolation=T.InterpolationMode.BICUBIC))
    ours = normalize(torch.from_numpy(np.stack([train_pixels(image, 32, draws)])))[0]
    assert ours.is_contiguous() and torch.equal(ours, reference)


def test_eval_pixels_are_torchvisions_resize_center_crop_bitwise():
    images = [photo(90, 70, 1), photo(50, 80, 2)]
    reference = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(CLIP_MEAN, CLIP_STD)])
    batch = normalize(torch.from_numpy(np.stack([eval_pixels(im, 32) for im in images])))
    assert batch.shape == (2, 3, 32, 32)
    for ours, image in zip(batch, images):
        assert torch.equal(ours, reference(image))


def test_fallback_is_the_largest_centred_crop_within_the_ratio_range():
    never = np.full(40, 0.999)  # every try asks for the widest, largest crop: too wide for a tall image
    assert train_crop_box(40, 120, never) == ((120 - round(40 / 0.75)) // 2, 0, round(40 / 0.75), 40)
