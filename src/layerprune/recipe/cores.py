"""The main process's share of the cores while evaluation workers run beside it (recipe key ``cores``).

With ``workers`` >= 2 a recipe run evaluates models in worker processes while the main process searches,
compensates and heals. A fixed thread count wastes cores either way: one thread leaves a core idle whenever
no evaluation is running (most of a search and of a heal), and as many threads as cores oversubscribes the
machine while one is (measured on 2 cores: a heal step at 2 threads takes 1.25x as long as at 1 thread beside
a busy worker, and 0.55x as long on an idle machine). :class:`CoreShare` gives the main process the cores the
workers leave free and re-checks at forward passes, at most once per ``every_s`` seconds. torch's thread
count is per calling thread (OpenMP), so the check has to run on the main thread: a module forward pre-hook
does that without the stages knowing about it. Results do not depend on it: torch's CPU matmuls split work
by output block, so logits and gradients are bitwise equal at 1 and 2 threads (tests/test_recipe_cores.py).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class CoreShare:
    """Context manager: the main process uses ``cores - busy() * worker_threads`` torch threads (at least 1).

    ``busy`` returns how many workers are running a job now. :meth:`paused` restores the thread count the
    process had before (for timing measurements, which must not depend on what ran beside them).
    """

    def __init__(self, cores: int, busy: Callable[[], int], *, worker_threads: int = 1,
                 every_s: float = 1.0) -> None:
        self.cores, self.busy, self.worker_threads, self.every_s = cores, busy, worker_threads, every_s
        self._before = torch.get_num_threads()
        self._handle: Any = None
        self._last = float("-inf")
        self._paused = False

    def threads(self) -> int:
        """The thread count the main process should use now."""
        return max(1, self.cores - self.busy() * self.worker_threads)

    def apply(self) -> None:
        """Set the main thread's torch thread count to :meth:`threads` (now, not throttled)."""
        self._last = time.monotonic()
        n = self.threads()
        if not self._paused and n != torch.get_num_threads():
            torch.set_num_threads(n)

    def _hook(self, module: Any, args: Any) -> None:
        # Only the main thread's count matters (and only it can change it).
        if time.monotonic() - self._last >= self.every_s and threading.current_thread() is threading.main_thread():
            self.apply()

    def __enter__(self) -> CoreShare:
        self._before = torch.get_num_threads()
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        self.apply()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        torch.set_num_threads(self._before)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block the thread count is the one the process started with, and stays so."""
        self._paused = True
        now = torch.get_num_threads()
        torch.set_num_threads(self._before)
        try:
            yield
        finally:
            self._paused = False
            torch.set_num_threads(now)
            self.apply()


__all__ = ["CoreShare"]
