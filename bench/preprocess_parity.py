"""How far the fast preprocessing path strays from the reference (CLIPImageProcessorPil).

Prints, per test image, the mean and max absolute difference in normalized pixels between
the fast path (JPEG draft decode + Pillow resize + numpy normalize) and the exact one,
and the largest softmax score difference they cause with a full-size ViT-B/32 (random
weights; see docs/benchmarks.md for what that does and does not tell).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import LABEL_SETS, SAMPLES, make_images, prompts
from worker.decode import decode_image
from worker.engine import ClipEngine
from worker.loading import load_clip
from worker.preprocess import ExactTransform, FastTransform, ResizeSpec
from worker.random_clip import build_full_size_clip
from worker.similarity import label_scores

WORKDIR = Path(__file__).parent / ".cache"


def portraits(directory: Path) -> list[Path]:
    """The sample photos turned a quarter, so that the center crop cuts rows, not columns."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in sorted(SAMPLES.glob("*.jpg")):
        path = directory / f"{sample.stem}-portrait.jpg"
        if not path.exists():
            Image.open(sample).transpose(Image.Transpose.ROTATE_90).save(path, quality=95)
        paths.append(path)
    return paths


def main() -> None:
    model_dir = WORKDIR / "vit-b-32-random"
    if not (model_dir / "config.json").exists():
        build_full_size_clip(model_dir)
    loaded = load_clip(str(model_dir), device="cpu")
    engine = ClipEngine(loaded)
    exact = ExactTransform(loaded.processor)
    spec = ResizeSpec.from_processor(loaded.processor)
    assert spec is not None
    fast = FastTransform(spec)
    samples = sorted(SAMPLES.glob("*.jpg")) + portraits(WORKDIR / "portrait")
    files = samples + make_images(WORKDIR / "images", 8)
    labels = engine.text_embeddings(prompts(LABEL_SETS[0])).numpy()
    print(f"{'image':<34} {'size':>10} {'mean |Δ|':>10} {'max |Δ|':>10} {'max Δscore':>11}")
    worst = 0.0
    for path in files:
        data = path.read_bytes()
        reference = exact(decode_image(data, max_pixels=10**9))
        candidate = fast(decode_image(data, max_pixels=10**9, draft_size=fast.draft_size))
        difference = np.abs(reference - candidate)
        embeddings = engine.image_embeddings(np.stack([reference, candidate])).numpy()
        scores = [label_scores(e, labels, engine.logit_scale, mode="softmax") for e in embeddings]
        score_delta = float(np.abs(scores[0] - scores[1]).max())
        worst = max(worst, score_delta)
        size = "×".join(map(str, Image.open(path).size))
        stats = f"{difference.mean():10.5f} {difference.max():10.4f} {score_delta:11.2e}"
        print(f"{path.name:<34} {size:>10} {stats}")
    print(f"largest score difference: {worst:.2e}")


if __name__ == "__main__":
    main()
