"""cliptag's worker: CLIP loaded once per process, jobs batched into shared forward passes.

The engine modules (``config``, ``loading``, ``preprocess``, ``decode``, ``engine``,
``batcher``, ``scoring``) import neither Celery, redis nor boto3 at module level, so the
model path runs and benchmarks on a host that has only torch, transformers and pillow.
"""
