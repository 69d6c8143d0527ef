"""The engine and batcher in process, on the tiny CLIP loaded through the production path.

Through a real worker these paths are covered by the parity tests (``test_end_to_end``,
``test_job_kinds``); here are the parts a queue cannot pin down: the traced tower against
the eager one, and how groups of images are split into batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.batcher import Batcher
from worker.engine import ClipEngine
from worker.loading import LoadedModel, load_clip


@pytest.fixture(scope="module")
def loaded(tiny_clip: Path) -> LoadedModel:
    return load_clip(str(tiny_clip), device="cpu")


def pixels(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)


def test_traced_tower_matches_the_eager_one_at_any_batch_size(loaded: LoadedModel):
    traced, eager = ClipEngine(loaded), ClipEngine(loaded, trace=False)
    assert traced.traced is None, "traced on the first batch, by the thread that runs the model"
    size = loaded.model.config.vision_config.image_size
    for count in (1, 3, 17):
        batch = pixels(count, size, seed=count)
        torch.testing.assert_close(traced.image_embeddings(batch), eager.image_embeddings(batch))
    assert traced.traced is True and eager.traced is False


def test_a_group_larger_than_a_batch_is_split_and_every_image_answered(loaded: LoadedModel):
    engine = ClipEngine(loaded)
    size = loaded.model.config.vision_config.image_size
    batches = []
    batcher = Batcher(engine, max_batch=4, max_wait_ms=200, on_batch=batches.append).start()
    try:
        group = pixels(10, size)
        futures = batcher.submit_many(list(group), [("a photo of a cat.",), ("a photo of a dog.",)])
        text_only = batcher.submit(None, [("a cup.",)])
        outputs = [future.result(timeout=30) for future in futures]
        text_output = text_only.result(timeout=30)
    finally:
        batcher.stop()

    assert [stats.images for stats in batches] == [4, 4, 2]
    assert all(output.batch_size <= 4 for output in outputs)
    expected = engine.image_embeddings(group).numpy()
    np.testing.assert_allclose(np.stack([o.image_embedding for o in outputs]), expected, atol=1e-5)
    assert outputs[0].text_embeddings.shape == (2, expected.shape[1])
    assert outputs[0].text_embeddings is outputs[3].text_embeddings, "one label matrix per batch and set"
    assert text_output.image_embedding is None and text_output.text_embeddings.shape == (1, expected.shape[1])


def test_cached_text_embeddings_own_their_rows(loaded: LoadedModel):
    """A cached row is a tensor of its own, not a view that keeps its whole encoding chunk
    (up to 256 rows) alive for as long as the one prompt stays in the cache."""
    engine = ClipEngine(loaded)
    engine.text_embeddings([f"a photo of a thing {i}." for i in range(40)])
    row = engine._text_cache["a photo of a thing 7."]
    assert row.untyped_storage().nbytes() == row.numel() * row.element_size()


def test_a_failing_batch_report_does_not_stop_the_batcher(loaded: LoadedModel):
    engine = ClipEngine(loaded)
    size = loaded.model.config.vision_config.image_size

    def broken_sink(_stats) -> None:
        raise BrokenPipeError("the log sink went away")

    batcher = Batcher(engine, max_batch=2, max_wait_ms=0, on_batch=broken_sink).start()
    try:
        for seed in range(3):
            future = batcher.submit(pixels(1, size, seed=seed)[0], [("a cat.",)])
            assert future.result(timeout=30).image_embedding is not None
    finally:
        batcher.stop()


@pytest.fixture
def restore_torch_threads() -> Iterator[int]:
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def test_after_a_short_cpu_pass_the_next_runs_on_the_cores_decoders_leave(
    loaded: LoadedModel, restore_torch_threads: int
):
    size = loaded.model.config.vision_config.image_size
    torch.set_num_threads(2)
    free = {"cores": 1}
    short = ClipEngine(loaded, free_cores=lambda: free["cores"], short_pass_ms=60_000)
    short.image_embeddings(pixels(2, size))
    assert torch.get_num_threads() == 2, "the first pass is not known to be short: every core"
    short.image_embeddings(pixels(2, size))
    assert torch.get_num_threads() == 1, "a short pass while a decoder holds one of two cores"
    free["cores"] = 0
    short.image_embeddings(pixels(2, size))
    assert torch.get_num_threads() == 1, "never fewer than one thread"
    free["cores"] = 2
    short.image_embeddings(pixels(2, size))
    assert torch.get_num_threads() == 2

    free["cores"] = 1
    long = ClipEngine(loaded, free_cores=lambda: free["cores"], short_pass_ms=0)
    for _ in range(2):
        long.image_embeddings(pixels(2, size))
        assert torch.get_num_threads() == 2, "after a long pass, every core whatever decodes"


def test_cpu_passes_run_on_no_more_threads_than_the_cores_the_process_may_use(
    loaded: LoadedModel, restore_torch_threads: int
):
    size = loaded.model.config.vision_config.image_size
    torch.set_num_threads(2)
    capped = ClipEngine(loaded, cpu_threads=1)
    assert capped.cpu_threads == 1
    capped.image_embeddings(pixels(2, size))
    assert torch.get_num_threads() == 1, "a CPU quota of one core: one thread, not torch's two"
    torch.set_num_threads(2)
    assert ClipEngine(loaded, cpu_threads=8).cpu_threads == 2, "never more than torch was given"
