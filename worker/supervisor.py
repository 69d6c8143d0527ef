"""``cliptag worker --gpus 0,1,3``: one worker process per GPU, each pinned, supervised.

Each child is a plain ``cliptag worker`` with ``CUDA_VISIBLE_DEVICES`` set to its GPU, its own
Celery node name (``gpu<N>@%h``) and metrics port (``CLIPTAG_METRICS_PORT + i``). A child that
dies is started again after an exponential backoff; SIGTERM or SIGINT to the supervisor is
passed to every child (Celery's warm shutdown: finish what is in flight) and the supervisor
waits for them. ``--processes N`` supervises N children on the configured device the same way
(many-core CPU hosts, and the tests of this module on hosts without a GPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

import structlog

from producer.errors import ConfigError
from worker.logs import configure_logging

log = structlog.get_logger("cliptag.supervisor")

PR_SET_PDEATHSIG = 1
POLL_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ChildSpec:
    """One supervised worker process.

    Attributes:
        name: its node-name prefix (``gpu3``, ``cpu0``); the node is ``<name>@%h``.
        env: the environment variables it gets on top of the supervisor's.
        argv: its command line.
    """

    name: str
    env: Mapping[str, str]
    argv: Sequence[str]


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = field(default=0.0)


def cuda_device_count() -> int:
    """GPUs torch can use here (0 on a host without CUDA or with a CPU-only torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(spec: str, *, available: int) -> list[int]:
    """The GPU indices of ``--gpus`` (``all`` or ``0,1,3``) on a host with ``available`` GPUs.

    Raises:
        ConfigError: no GPU here, or an index that is malformed, repeated or absent.
    """
    if available == 0:
        raise ConfigError(
            f"--gpus {spec} needs CUDA GPUs, but torch finds none on this host; "
            "run one worker with --device cpu instead"
        )
    if spec.strip().lower() == "all":
        return list(range(available))
    gpus: list[int] = []
    for token in (part.strip() for part in spec.split(",")):
        if not token.isdigit():
            raise ConfigError(f"--gpus {spec!r}: {token!r} is not a GPU index (use 'all' or e.g. 0,1,3)")
        index = int(token)
        if index >= available:
            raise ConfigError(f"--gpus {spec!r}: GPU {index} does not exist (this host has {available})")
        if index in gpus:
            raise ConfigError(f"--gpus {spec!r}: GPU {index} is listed twice")
        gpus.append(index)
    return gpus


def child_specs(
    *,
    gpus: Sequence[int] | None,
    processes: int,
    worker_args: Sequence[str],
    metrics_port: int = 0,
) -> list[ChildSpec]:
    """The children to supervise: one per GPU in ``gpus``, else ``processes`` on the configured device.

    Args:
        gpus: physical GPU indices, or ``None`` for device-agnostic children.
        processes: how many children when ``gpus`` is ``None``.
        worker_args: ``cliptag worker`` arguments every child gets (queues, log level, Celery's).
        metrics_port: the first child's metrics port; 0 leaves metrics off.
    """
    placements: list[tuple[str, dict[str, str]]] = (
        [(f"gpu{gpu}", {"CUDA_VISIBLE_DEVICES": str(gpu), "CLIPTAG_DEVICE": "cuda"}) for gpu in gpus]
        if gpus is not None
        else [(f"cpu{index}", {}) for index in range(processes)]
    )
    specs = []
    for index, (name, env) in enumerate(placements):
        if metrics_port:
            env["CLIPTAG_METRICS_PORT"] = str(metrics_port + index)
        argv = [sys.executable, "-m", "producer.cli", "worker", "--hostname", f"{name}@%h", *worker_args]
        specs.append(ChildSpec(name=name, env=env, argv=argv))
    return specs


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor itself is killed (Linux)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: orphans stay possible
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Keeps every child running until told to stop.

    Args:
        children: what to run.
        backoff_base_s: wait before the first restart of a child; doubled on each further
            failure in a row.
        backoff_cap_s: the longest wait between restarts.
        stable_after_s: a child that ran this long before dying starts its backoff afresh.
        stop_timeout_s: after forwarding SIGTERM, how long to wait before SIGKILL.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        stable_after_s: float = 60.0,
        stop_timeout_s: float = 120.0,
    ) -> None:
        self.children = [_Child(spec) for spec in children]
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stable_after_s = stable_after_s
        self.stop_timeout_s = stop_timeout_s
        self._stop_signal: int | None = None

    def backoff(self, failures: int) -> float:
        """Seconds before restarting a child that failed ``failures`` times in a row."""
        return min(self.backoff_cap_s, self.backoff_base_s * 2 ** max(0, failures - 1))

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; 0 when every child stopped by itself in time."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info("supervisor_started", children=[child.spec.name for child in self.children])
        while self._stop_signal is None:
            now = time.monotonic()
            for child in self.children:
                if child.process is None and now >= child.restart_at:
                    self._start(child)
                elif child.process is not None and child.process.poll() is not None:
                    self._note_exit(child, now)
            time.sleep(POLL_INTERVAL_S)
        return self._stop_all(self._stop_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
        else:  # a second signal: pass it on at once (Celery's cold shutdown)
            self._forward(signum)

    def _start(self, child: _Child) -> None:
        child.process = subprocess.Popen(
            child.spec.argv,
            env={**os.environ, **child.spec.env},
            process_group=0,  # a terminal's Ctrl-C reaches the children once, through us
            preexec_fn=_die_with_parent,
        )
        child.started_at = time.monotonic()
        log.info("child_started", child=child.spec.name, pid=child.process.pid, **child.spec.env)

    def _note_exit(self, child: _Child, now: float) -> None:
        assert child.process is not None
        ran_s = now - child.started_at
        child.failures = 1 if ran_s >= self.stable_after_s else child.failures + 1
        delay = self.backoff(child.failures)
        child.restart_at = now + delay
        log.warning(
            "child_exited",
            child=child.spec.name,
            pid=child.process.pid,
            returncode=child.process.returncode,
            ran_s=round(ran_s, 1),
            restart_in_s=delay,
        )
        child.process = None

    def _forward(self, signum: int) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)

    def _stop_all(self, signum: int) -> int:
        log.info("supervisor_stopping", signal=signal.Signals(signum).name)
        self._forward(signal.SIGTERM if signum == signal.SIGINT else signum)
        deadline = time.monotonic() + self.stop_timeout_s
        clean = True
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("child_killed", child=child.spec.name, pid=child.process.pid)
                child.process.kill()
                child.process.wait()
                clean = False
        log.info("supervisor_stopped")
        return 0 if clean else 1


def run_supervisor(
    *,
    gpus: str | None,
    processes: int,
    device: str | None,
    worker_args: Sequence[str],
    metrics_port: int = 0,
) -> int:
    """``cliptag worker --gpus …`` / ``--processes N``: build the children and supervise them.

    Args:
        gpus: the ``--gpus`` value, or ``None`` for ``processes`` children on ``device``.
        processes: children without ``--gpus``.
        device: the ``--device`` value, if given; only ``cuda`` goes with ``--gpus``.
        worker_args: arguments every child's ``cliptag worker`` gets.
        metrics_port: ``CLIPTAG_METRICS_PORT`` of the first child (0: metrics off).

    Returns:
        the supervisor's exit status.
    """
    if gpus is not None and device not in (None, "", "cuda"):
        raise ConfigError(f"--gpus pins each child to one GPU; it cannot be combined with --device {device}")
    if gpus is not None and processes > 1:
        raise ConfigError("--processes is for --device hosts; --gpus runs one process per GPU")
    if any(arg in ("-n", "--hostname") or arg.startswith("--hostname=") for arg in worker_args):
        raise ConfigError("with --gpus or --processes, each child's node name is set by cliptag; drop -n")
    pinned = parse_gpus(gpus, available=cuda_device_count()) if gpus is not None else None
    configure_logging()
    specs = child_specs(gpus=pinned, processes=processes, worker_args=worker_args, metrics_port=metrics_port)
    return Supervisor(specs).run()
