"""The exact path is the reference bit for bit; the fast path stays within measured bounds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from worker.decode import decode_image
from worker.preprocess import ExactTransform, FastTransform, ResizeSpec, make_transform

SAMPLES = Path(__file__).resolve().parent.parent / "worker" / "samples"


def jpeg_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.open(SAMPLES / "rocket.jpg").convert("RGB").resize(size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil()


def test_exact_transform_is_the_reference_bit_for_bit(processor):
    image = Image.open(SAMPLES / "cat.jpg")
    reference = processor(images=[image], return_tensors="np")["pixel_values"][0]
    assert np.array_equal(
        ExactTransform(processor)(decode_image((SAMPLES / "cat.jpg").read_bytes(), max_pixels=10**8)),
        reference,
    )


def test_fast_transform_without_draft_is_within_one_8_bit_step_in_a_few_pixels(processor):
    """Resizing only the cropped region uses the same filter taps as the reference; the box
    coordinates' float rounding may move an 8-bit value by one, never more."""
    fast = make_transform(processor, exact=False)
    assert isinstance(fast, FastTransform)
    one_step = 1 / 255 / min(processor.image_std)
    for sample in sorted(SAMPLES.glob("*.jpg")):
        landscape = decode_image(sample.read_bytes(), max_pixels=10**8)
        for image in (landscape, landscape.transpose(Image.Transpose.ROTATE_90)):  # and portrait
            difference = np.abs(fast(image) - ExactTransform(processor)(image))
            assert difference.max() <= one_step + 1e-5
            assert np.count_nonzero(difference > 1e-5) <= difference.size // 1000


def test_crops_larger_than_the_resized_image_fall_back_to_the_exact_path():
    too_wide = CLIPImageProcessorPil(
        size={"height": 224, "width": 300}, crop_size={"height": 200, "width": 320}
    )
    assert ResizeSpec.from_processor(too_wide) is None
    too_tall = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 256, "width": 200})
    assert ResizeSpec.from_processor(too_tall) is None


def test_fast_transform_with_jpeg_draft_stays_close(processor):
    fast = make_transform(processor, exact=False)
    data = jpeg_bytes((1920, 1080))
    drafted = decode_image(data, max_pixels=10**8, draft_size=fast.draft_size)
    assert drafted.size == (960, 540)
    difference = np.abs(fast(drafted) - ExactTransform(processor)(decode_image(data, max_pixels=10**8)))
    assert difference.mean() < 0.01
    assert difference.max() < 0.1


def test_input_size_comes_from_the_processor_config():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336)
    pixels = make_transform(processor, exact=False)(Image.new("RGB", (500, 400)))
    assert pixels.shape == (3, 336, 336)


def test_unsupported_configs_fall_back_to_the_exact_path():
    squashing = CLIPImageProcessorPil(size={"shortest_edge": 224, "longest_edge": 300})
    assert ResizeSpec.from_processor(squashing) is None
    assert isinstance(make_transform(squashing, exact=False), ExactTransform)
