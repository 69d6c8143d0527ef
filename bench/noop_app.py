"""A bare Celery app on cliptag's settings with a no-op task: the framework's ceiling.

``python -m celery -A bench.noop_app worker --pool=threads`` from the repository root.
"""

from __future__ import annotations

from typing import Any

from producer.celery_conf import make_celery
from producer.config import QueueSettings

app = make_celery(QueueSettings(), main="bench-noop")


@app.task(name="bench.noop", acks_late=True)
def noop(job: dict[str, Any]) -> dict[str, Any]:
    """Answer at once with a result of the same shape as cliptag's."""
    return {"job_id": job.get("job_id"), "status": "ok"}
