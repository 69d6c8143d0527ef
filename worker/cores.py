"""How many CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota.

``os.cpu_count()`` counts the host's cores. In a container limited to 2 CPUs on a 64-core
host (``docker run --cpus 2``, a Kubernetes CPU limit) that is 32 times too many threads:
they are throttled in turn by the kernel instead of running. Both cgroup versions are read
(v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), along the process's cgroup
path and every parent up to the mount point (a parent's quota binds its children too).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cores(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """Cores this process may run on: its CPU affinity, capped by the tightest cgroup quota
    above it, rounded up (a quota of 1.5 CPUs keeps two threads busy). At least 1.

    Args:
        cgroup_root: where the cgroup file systems are mounted.
        proc_cgroup: the process's cgroup memberships (``/proc/self/cgroup``).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(
    *, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The tightest CPU quota, in CPUs, on this process's cgroup or a parent; ``None`` if none."""
    try:
        memberships = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in memberships:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            quotas += _quotas_along(cgroup_root, path, _read_cpu_max)
        elif "cpu" in controllers.split(","):
            mount = cgroup_root / controllers
            if not mount.is_dir():
                mount = cgroup_root / "cpu"
            quotas += _quotas_along(mount, path, _read_cfs_quota)
    return min(quotas, default=None)


def _quotas_along(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas ``read`` finds in ``path``'s directory under ``mount`` and each parent up to
    ``mount`` itself. In a container the mount is often the container's own cgroup while
    ``path`` names it as the host sees it: those directories are missing, the mount is read."""
    directory = mount / path.strip("/")
    found = []
    while True:
        quota = read(directory)
        if quota is not None:
            found.append(quota)
        if directory == mount or mount not in directory.parents:
            return found
        directory = directory.parent


def _read_cpu_max(directory: Path) -> float | None:
    """cgroup v2: ``cpu.max`` holds ``"$QUOTA $PERIOD"``, or ``"max $PERIOD"`` for no limit."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _read_cfs_quota(directory: Path) -> float | None:
    """cgroup v1: ``cpu.cfs_quota_us`` is -1 for no limit."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
