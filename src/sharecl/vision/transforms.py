"""Image transforms on PIL, numpy and torch (torchvision does not import with this torch).

Every transform takes and returns a ``PIL.Image``; :func:`to_tensor` and :func:`normalize`
end the chain. Random transforms draw from a ``numpy.random.Generator`` passed in, so a
pipeline is deterministic under a seed. :class:`ImagePipeline` is the usual chain:
evaluation = resize the shorter side, centre crop, RGB, tensor, normalise; training adds a
random resized crop and a horizontal flip. :func:`pixel_batch` is the fast path for a batch
of same-sized uint8 images (the packaged datasets): one batched ``interpolate`` in torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

__all__ = ["IMAGENET_STATS", "IDENTITY_STATS", "to_pil", "resize", "center_crop", "random_resized_crop", "hflip",
           "to_rgb", "to_tensor", "normalize", "ImagePipeline", "pixel_batch", "augment_array", "TRAIN_CROP_SCALE"]

#: Area fraction of :func:`random_resized_crop` in training augmentation. ImageNet practice is
#: (0.08, 1); the small images of the packaged streams (28 px) keep too little at 8 %.
TRAIN_CROP_SCALE = (0.25, 1.0)

#: Mean and std per RGB channel for pixels in [0, 1].
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IDENTITY_STATS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def to_pil(x) -> Image.Image:
    """A ``PIL.Image`` from a PIL image, a uint8 array ``(H, W)`` / ``(H, W, 1|3|4)``, or a
    uint8 tensor ``(H, W)`` / ``(C, H, W)``.

    Raises:
        TypeError: for anything else (the message names the type, dtype and shape).
    """
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, torch.Tensor):
        x = x.numpy() if x.dim() == 2 else x.permute(1, 2, 0).numpy()
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (1, 3, 4))):
        return Image.fromarray(x[..., 0] if x.ndim == 3 and x.shape[2] == 1 else x)
    desc = f"{type(x).__name__}" + (f" {x.dtype} {tuple(x.shape)}" if hasattr(x, "shape") else "")
    raise TypeError(f"expected a PIL image or a uint8 array (H, W[, C]); got {desc}")


def resize(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` pixels (bilinear), keeping the aspect ratio."""
    w, h = img.size
    if min(w, h) == size:
        return img
    s = size / min(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central ``size × size`` square (padded with black when the image is smaller)."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """A random crop of area fraction in ``scale`` and aspect ratio in ``ratio`` (log-uniform),
    resized to ``size × size``; after 10 failed draws, the centre crop (Szegedy et al. 2015's rule)."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    return center_crop(resize(img, size), size)


def hflip(img: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    """Mirror left-right with probability ``p``."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Grey (``L``), palette or RGBA images as three-channel RGB."""
    return img if img.mode == "RGB" else img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` float32 in [0, 1] from an RGB image."""
    return torch.from_numpy(np.asarray(to_rgb(img), dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, stats=IMAGENET_STATS) -> torch.Tensor:
    """``(x − mean) / std`` per channel; ``x`` is ``(..., 3, H, W)``."""
    mean = torch.tensor(stats[0], dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(stats[1], dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class ImagePipeline:
    """Images of any size and mode → normalised ``(N, 3, size, size)`` float32 batches.

    Attributes:
        size: side of the square the model sees, in pixels (a multiple of the patch size for ViTs).
        stats: ``(mean, std)`` per channel (:data:`IMAGENET_STATS` or :data:`IDENTITY_STATS`).
        resize_ratio: evaluation resizes the shorter side to ``size × resize_ratio`` then centre-crops
            ``size`` (1.0: no crop margin; ImageNet practice is 256/224).
    """

    size: int = 56
    stats: tuple = IMAGENET_STATS
    resize_ratio: float = 1.0

    @property
    def decode_side(self) -> int:
        """Shorter side, in pixels, that evaluation first resizes an image to: decoding an input
        straight to this size (:func:`sharecl.vision.decode.decode_image`) loses nothing."""
        return round(self.size * self.resize_ratio)

    def eval_one(self, x) -> torch.Tensor:
        img = to_rgb(to_pil(x))
        return normalize(to_tensor(center_crop(resize(img, round(self.size * self.resize_ratio)), self.size)), self.stats)

    def train_one(self, x, rng: np.random.Generator) -> torch.Tensor:
        img = to_rgb(to_pil(x))
        return normalize(to_tensor(hflip(random_resized_crop(img, self.size, rng), rng)), self.stats)

    def __call__(self, images: list, rng: np.random.Generator | None = None) -> torch.Tensor:
        """A batch: the evaluation chain, or the training chain when ``rng`` is given.

        Same-sized uint8 arrays without ``rng`` take :func:`pixel_batch` (batched in torch).
        """
        if rng is None and images and all(isinstance(x, np.ndarray) and x.dtype == np.uint8 for x in images) \
                and len({x.shape for x in images}) == 1 and self.resize_ratio == 1.0 and images[0].shape[0] == images[0].shape[1]:
            return pixel_batch(np.stack(images), self.size, self.stats)
        return torch.stack([self.eval_one(x) if rng is None else self.train_one(x, rng) for x in images])


def augment_array(x, rng: np.random.Generator, scale=TRAIN_CROP_SCALE) -> np.ndarray:
    """Training augmentation on a raw image, before the model's resize: a random resized crop
    (area fraction in ``scale``, aspect 3/4–4/3) back to a square of the image's shorter side,
    then a horizontal flip with probability 0.5.

    Args:
        x: uint8 ``(H, W)`` or ``(H, W, C)`` array or a PIL image.
    Returns:
        uint8 ``(S, S)`` (grey) or ``(S, S, C)`` with ``S = min(H, W)``: a batch of same-sized
        images stays on :func:`pixel_batch`'s fast path.
    """
    img = to_pil(x)
    return np.asarray(hflip(random_resized_crop(img, min(img.size), rng, scale), rng), dtype=np.uint8)


def pixel_batch(images: np.ndarray | torch.Tensor, size: int, stats=IMAGENET_STATS) -> torch.Tensor:
    """Square uint8 images ``(N, H, H)`` (grey) or ``(N, H, H, 3)`` → ``(N, 3, size, size)`` float32,
    resized in one bilinear ``interpolate`` (antialiased when shrinking) and normalised."""
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    return normalize(x.contiguous(), stats)
