"""cliptag's producer side: the job/result contract, the client and the CLI.

Importing it never imports torch or the worker.
"""

from producer.client import Client, Job
from producer.contract import JobRequest, JobResult, parse_job
from producer.errors import CliptagError, ErrorCode, JobError, JobFailed, JobTimeout

__all__ = [
    "Client",
    "CliptagError",
    "ErrorCode",
    "Job",
    "JobError",
    "JobFailed",
    "JobRequest",
    "JobResult",
    "JobTimeout",
    "parse_job",
]
