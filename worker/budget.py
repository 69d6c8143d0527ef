"""A counting limit that callers take and give back in any amounts (a semaphore of n at a time),
which says how much of it is in use."""

from __future__ import annotations

import threading


class Budget:
    """At most ``limit`` units in use at once, shared by threads.

    A request for more than ``limit`` units is granted when nothing else is in use, so an
    oversized request waits its turn instead of waiting forever. ``with budget:`` holds one
    unit.

    Args:
        limit: the units that may be in use at once; at least 1.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a budget needs a limit of at least 1, not {limit}")
        self.limit = limit
        self._in_use = 0
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    def acquire(self, units: int = 1) -> None:
        """Block until ``units`` fit, then take them."""
        with self._changed:
            self._changed.wait_for(lambda: self._in_use == 0 or self._in_use + units <= self.limit)
            self._in_use += units

    def release(self, units: int = 1) -> None:
        """Give back ``units`` taken before."""
        with self._changed:
            if units > self._in_use:
                raise ValueError(f"released {units} units with only {self._in_use} in use")
            self._in_use -= units
            self._changed.notify_all()

    def __enter__(self) -> Budget:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
