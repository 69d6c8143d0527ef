"""The cores a worker may use, from its CPU affinity and cgroup quotas (cgroup file trees
written here: which one the test machine has is not up to the test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.cores import cgroup_cpu_quota, usable_cores

AFFINITY = len(os.sched_getaffinity(0))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_quota_along_the_path(tmp_path: Path):
    root = tmp_path / "cgroup"
    write(root / "kubepods" / "cpu.max", "150000 100000\n")
    write(root / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "400000 100000\n")
    write(tmp_path / "self-cgroup", "0::/kubepods/pod1/ctr\n")

    assert cgroup_cpu_quota(cgroup_root=root, proc_cgroup=tmp_path / "self-cgroup") == 1.5
    assert usable_cores(cgroup_root=root, proc_cgroup=tmp_path / "self-cgroup") == min(AFFINITY, 2)


def test_cgroup_v1_cpu_controller_and_no_limit(tmp_path: Path):
    root = tmp_path / "cgroup"
    write(root / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "50000\n")
    write(root / "cpu,cpuacct" / "job" / "cpu.cfs_period_us", "100000\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "limited", "4:memory:/job\n3:cpu,cpuacct:/job\n")
    write(tmp_path / "unlimited", "3:cpu,cpuacct:/\n")

    assert cgroup_cpu_quota(cgroup_root=root, proc_cgroup=tmp_path / "limited") == 0.5
    assert usable_cores(cgroup_root=root, proc_cgroup=tmp_path / "limited") == 1, "half a CPU: one thread"
    assert cgroup_cpu_quota(cgroup_root=root, proc_cgroup=tmp_path / "unlimited") is None
    assert usable_cores(cgroup_root=root, proc_cgroup=tmp_path / "unlimited") == AFFINITY


def test_a_container_whose_mount_is_its_own_cgroup_reads_the_mount(tmp_path: Path):
    """Docker without a cgroup namespace: /proc/self/cgroup names the host's path, which
    does not exist inside; the container's cgroup is the mount itself."""
    root = tmp_path / "cgroup"
    write(root / "cpu" / "cpu.cfs_quota_us", "300000\n")
    write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "self-cgroup", "2:cpu:/docker/0123abcd\n")

    assert cgroup_cpu_quota(cgroup_root=root, proc_cgroup=tmp_path / "self-cgroup") == 3.0


@pytest.mark.parametrize("content", ["", "garbage\n", "0::/missing\n"])
def test_unreadable_or_missing_cgroups_mean_no_quota(tmp_path: Path, content: str):
    write(tmp_path / "self-cgroup", content)
    assert cgroup_cpu_quota(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "self-cgroup") is None
    assert cgroup_cpu_quota(cgroup_root=tmp_path, proc_cgroup=tmp_path / "no-such-file") is None
    assert usable_cores(cgroup_root=tmp_path, proc_cgroup=tmp_path / "no-such-file") == AFFINITY
