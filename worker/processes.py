"""Start and stop a private ``redis-server`` and ``cliptag worker`` subprocesses.

Used by ``cliptag demo``, the test suite and the benchmarks, so all three run the real
parts the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from producer.errors import CliptagError


class ProcessError(CliptagError):
    """A helper process could not be started; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class RedisServer:
    """A private ``redis-server`` on a free port.

    Args:
        data_dir: where it keeps its files; a temporary directory when ``None``.
        persistent: turn on the append-only file, so a restart keeps the data.
        port: the port; a free one when ``None``.
    """

    def __init__(
        self, *, data_dir: Path | None = None, persistent: bool = False, port: int | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ProcessError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.persistent = persistent
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="cliptag-redis-")
        self.data_dir = data_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--save", ""]
        )
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--logfile",
                str(self.data_dir / "redis.log"),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ProcessError(
                    f"redis-server did not start on port {self.port}; see {self.data_dir}/redis.log"
                )
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()


class WorkerProcess:
    """A ``cliptag worker`` subprocess, started and waited for until it consumes.

    Args:
        env: ``CLIPTAG_*`` settings for it, on top of this process's environment.
        log_path: where its stdout and stderr go.
        args: more ``cliptag worker`` arguments.
        command: the Python arguments to run instead of ``-m producer.cli worker``
            (another Celery app, for the benchmarks' bare no-op worker).
    """

    READY_MARK = "ready."

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        log_path: Path,
        args: tuple[str, ...] = (),
        command: tuple[str, ...] = ("-m", "producer.cli", "worker"),
    ) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.args = args
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 180.0) -> WorkerProcess:
        """Start it and return once Celery reports ready (the model is loaded by then)."""
        self._log = self.log_path.open("ab")
        self._log_start = self._log.tell()
        self.process = subprocess.Popen(
            [sys.executable, *self.command, *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while self.READY_MARK not in self._output_since_start():
            if self.process.poll() is not None:
                self._log.close()
                raise ProcessError(f"worker exited with {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                self._log.close()
                raise ProcessError(f"worker not ready after {timeout} s: {self.log_tail()}")
            time.sleep(0.1)
        return self

    def _output_since_start(self) -> str:
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, *, timeout: float = 60.0) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL if it does not exit in ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as when a host dies: nothing is acknowledged or cleaned up."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
