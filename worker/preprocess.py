"""Image → normalized pixel array, driven by the checkpoint's own processor config.

Two transforms share one interface:

* :class:`ExactTransform` calls ``CLIPImageProcessorPil`` itself: the reference, bit for bit.
* :class:`FastTransform` does the same resize → center-crop → rescale → normalize with
  Pillow and numpy (resizing only the columns the crop keeps), and lets the decoder use
  JPEG draft mode (DCT-domain downscaling) when the photo is much larger than the model
  input. ``docs/benchmarks.md`` records how far it strays from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessorPil

DRAFT_MARGIN = 2
"""JPEG drafts are decoded at no less than this multiple of the resize target, so the
bicubic resize that follows still has real pixels to filter (closer to the reference)."""


Box = tuple[float, float, float, float]
"""A source region for Pillow's ``resize``: left, top, right, bottom."""


class ImageTransform(Protocol):
    """Turns a decoded RGB image into a ``(3, H, W)`` float32 array the model takes."""

    def __call__(self, image: Image.Image) -> np.ndarray: ...

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest size a JPEG may be draft-decoded to, or ``None`` for full decode."""
        ...


@dataclass(frozen=True)
class ResizeSpec:
    """The parts of a processor config the fast path understands.

    Attributes:
        shortest_edge: resize so the short side is this (aspect kept), or ``None``.
        size_hw: resize to exactly (height, width) instead, or ``None``.
        crop_hw: center-crop size, or ``None`` for no crop.
        resample: Pillow resampling filter id.
        scale: rescale factor (1/255 for 8-bit input).
        mean, std: per-channel normalization.
    """

    shortest_edge: int | None
    size_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    resample: int
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor: CLIPImageProcessorPil) -> ResizeSpec | None:
        """The spec of ``processor``, or ``None`` when it uses options the fast path lacks."""
        size, crop = processor.size, processor.crop_size
        if not (processor.do_resize and processor.do_rescale and processor.do_normalize):
            return None
        if getattr(processor, "do_pad", False) or size.longest_edge or size.max_height:
            return None
        shortest = size.shortest_edge
        size_hw = (size.height, size.width) if size.height and size.width else None
        if (shortest is None) == (size_hw is None):
            return None
        crop_hw = (crop.height, crop.width) if processor.do_center_crop else None
        if crop_hw is not None and not fits_inside(crop_hw, size_hw or (shortest, shortest)):
            return None
        return cls(
            shortest_edge=shortest,
            size_hw=size_hw,
            crop_hw=crop_hw,
            resample=int(processor.resample),
            scale=float(processor.rescale_factor),
            mean=tuple(float(m) for m in processor.image_mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in processor.image_std),  # type: ignore[arg-type]
        )

    def resized_hw(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after the resize step, as ``get_resize_output_image_size`` computes it."""
        if self.size_hw is not None:
            return self.size_hw
        assert self.shortest_edge is not None
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def crop_region(self, width: int, height: int) -> tuple[tuple[int, int], Box, slice]:
        """What to resize an image of ``width`` × ``height`` to: the (height, width) of the
        output, the source region that fills it, and the output rows the crop then keeps.

        The region spans the columns the center crop keeps (the transformers offsets) and
        every row, and the rows are cropped after. Pillow's ``box`` in the horizontal pass
        gives each output pixel the filter taps of resizing the whole width and cropping,
        without computing the columns the crop discards (25 % of the resize for a 4:3 photo,
        44 % for 16:9); in the vertical pass it does not (measured on portrait photos: up
        to 3 steps off in a fifth of the values), so rows are resized whole.
        """
        resized_h, resized_w = self.resized_hw(width, height)
        crop_h, crop_w = self.crop_hw or (resized_h, resized_w)
        top, left = (resized_h - crop_h) // 2, (resized_w - crop_w) // 2
        scale_x = width / resized_w
        box = (left * scale_x, 0.0, (left + crop_w) * scale_x, float(height))
        return (resized_h, crop_w), box, slice(top, top + crop_h)


class ExactTransform:
    """The reference preprocessing: ``CLIPImageProcessorPil`` on the fully decoded image."""

    def __init__(self, processor: CLIPImageProcessorPil) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.processor(images=[image], return_tensors="np")["pixel_values"][0]

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        return None


class FastTransform:
    """Pillow resize of the columns the crop keeps plus a table lookup per channel to normalize;
    JPEG draft decode allowed."""

    def __init__(self, spec: ResizeSpec) -> None:
        self.spec = spec
        std = np.asarray(spec.std, dtype=np.float32)
        multiplier = (spec.scale / std).astype(np.float32)
        offset = (np.asarray(spec.mean, dtype=np.float32) / std).astype(np.float32)
        # every normalized value there can be, per channel: (3, 256), computed with the same
        # float32 operations as value * multiplier - offset, so a lookup gives the same bits
        self._normalized = np.arange(256, dtype=np.float32)[None, :] * multiplier[:, None] - offset[:, None]

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        target_h, target_w = self.spec.resized_hw(width, height)
        return (target_w * DRAFT_MARGIN, target_h * DRAFT_MARGIN)

    def __call__(self, image: Image.Image) -> np.ndarray:
        spec = self.spec
        (height, width), box, rows = spec.crop_region(*image.size)
        pixels = np.asarray(image.resize((width, height), resample=spec.resample, box=box))[rows]
        normalized = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._normalized[channel], pixels[..., channel], out=normalized[channel])
        return normalized


def fits_inside(crop_hw: tuple[int, int], resized_hw: tuple[int, int]) -> bool:
    """Whether a center crop of ``crop_hw`` lies inside every image resized to at least ``resized_hw``
    (a larger crop pads, which the fast path does not do)."""
    return crop_hw[0] <= resized_hw[0] and crop_hw[1] <= resized_hw[1]


def make_transform(processor: CLIPImageProcessorPil, *, exact: bool) -> ImageTransform:
    """The fast transform for ``processor``, or the exact one when asked or when needed."""
    spec = None if exact else ResizeSpec.from_processor(processor)
    return ExactTransform(processor) if spec is None else FastTransform(spec)
