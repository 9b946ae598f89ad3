"""Clip-level augmentation: one crop and one flip for every frame of a clip, then normalisation.

Video models must see the same geometric transform on every frame, or the augmentation itself
creates motion. Training uses a random resized crop (scale and aspect ranges as VideoMAE/UMT) and
an optional horizontal flip; evaluation resizes the short side and takes the centre crop.

Horizontal flips are off by default: they swap "left" and "right", which breaks captions and
motion-direction labels (the synthetic data is built on exactly that).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VideoTransform:
    """uint8 (or float in [0, 1]) ``[3, T, H, W]`` → normalised float ``[3, T, size, size]``."""

    def __init__(
        self,
        size: int = 224,
        train: bool = False,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB); got mean={list(mean)}, std={list(std)}")
        self.size = size
        self.train = train
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
        # uint8 frames that need no resize: (x / 255 - mean) / std as one scale and one shift, in place
        self._u8_scale = 1.0 / (255.0 * self.std)
        self._u8_shift = -self.mean / self.std

    def crop_box(self, h: int, w: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop for a frame of ``h x w``."""
        if self.train:
            area = h * w
            for _ in range(10):
                target = area * rng.uniform(*self.scale)
                aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
                cw = round(math.sqrt(target * aspect))
                ch = round(math.sqrt(target / aspect))
                if 0 < cw <= w and 0 < ch <= h:
                    return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
        side = min(h, w)  # centre square (also the fallback of the random crop)
        return (h - side) // 2, (w - side) // 2, side, side

    def __call__(self, video: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        if video.dim() != 4 or video.shape[0] != 3:
            raise ValueError(f"video must be [3, T, H, W]; got shape {tuple(video.shape)}")
        if rng is None and self.train:
            rng = random.Random()  # seeded from the OS: costs more than normalising a small clip
        h, w = video.shape[-2:]
        top, left, ch, cw = self.crop_box(h, w, rng)
        if video.dtype == torch.uint8 and (ch, cw) == (self.size, self.size):
            # the common evaluation case (the synthetic clips): two in-place passes instead of five
            x = (
                video[:, :, top : top + ch, left : left + cw]
                .float()
                .mul_(self._u8_scale)
                .add_(self._u8_shift)
            )
            if self.train and self.flip and rng.random() < 0.5:
                x = x.flip(-1)
            return x.contiguous()
        x = video.float() / 255.0 if video.dtype == torch.uint8 else video.float()
        x = x[:, :, top : top + ch, left : left + cw]
        if (ch, cw) != (self.size, self.size):
            x = F.interpolate(
                x.transpose(0, 1),
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            ).transpose(0, 1)
        if self.train and self.flip and rng.random() < 0.5:
            x = x.flip(-1)
        return ((x - self.mean) / self.std).contiguous()

    def denormalize(self, video: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] for display (``[3, T, H, W]`` or ``[B, 3, T, H, W]``)."""
        mean, std = self.mean.to(video), self.std.to(video)
        if video.dim() == 5:
            mean, std = mean[None], std[None]
        return (video * std + mean).clamp(0, 1)
