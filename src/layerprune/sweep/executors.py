"""Where a sweep's cells run: this machine's processes, a Ray cluster, or Slurm (submitit). Every executor
runs the same :func:`run_cell` into the same cell folders, so a sweep started with one can be finished with
another. Adding one: a class with ``name`` and ``map(fn, jobs)`` and a :func:`register` line."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ..errors import LayerpruneError

EXECUTORS: dict[str, type[Executor]] = {}


def register(cls: type[Executor]) -> type[Executor]:
    EXECUTORS[cls.name] = cls
    return cls


class Executor:
    """Runs ``fn(**job)`` for every job; returns the results in job order."""

    name = "base"

    def __init__(self, settings: dict[str, Any], workers: int, folder: Path):
        self.settings, self.workers, self.folder = settings, workers, folder
        self.cpus = int(settings.get("cpus_per_cell", 1))
        self.gpus = float(settings.get("gpus_per_cell", 0))

    @classmethod
    def check(cls) -> None:
        """Refuse (one line) when the engine is not installed, before any cell runs."""

    def map(self, fn: Callable[..., dict[str, Any]], jobs: list[dict[str, Any]],
            done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        raise NotImplementedError


def _threads(n: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def _worker(n: int) -> None:
    """A local worker: ``n`` threads, and SIGTERM as Ctrl-C (a stopped cell removes its temporary folders)."""
    _threads(n)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _in_worker(fn: Callable[..., dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
    try:
        return fn(**job)
    except KeyboardInterrupt:  # stopped (its temporary folders removed on the way here): the worker ends too
        os._exit(143)


def _stop(pool: ProcessPoolExecutor, grace_s: float = 30.0) -> None:
    """Cancel the queued cells and stop the running ones now (the pool's own shutdown would wait for them, and
    a stopped sweep would leave its workers running). ``--resume`` continues each where it stopped."""
    # ProcessPoolExecutor has no public way to stop busy workers before Python 3.14 (terminate_workers); its
    # shutdown forgets them, so they are taken first.
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()


@register
class SerialExecutor(Executor):
    """Cells one after another in this process (debugging, profiling; a crash takes the sweep with it)."""

    name = "serial"

    def map(self, fn: Callable[..., dict[str, Any]], jobs: list[dict[str, Any]],
            done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        out = []
        for job in jobs:
            out.append(fn(**job))
            done(out[-1])
        return out


@register
class LocalExecutor(Executor):
    """``workers`` processes on this machine (concurrent.futures, spawned: no state shared with the parent)."""

    name = "local"

    def map(self, fn: Callable[..., dict[str, Any]], jobs: list[dict[str, Any]],
            done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        import multiprocessing as mp

        out: list[dict[str, Any] | None] = [None] * len(jobs)
        pool = ProcessPoolExecutor(max_workers=min(self.workers, max(1, len(jobs))), mp_context=mp.get_context("spawn"),
                                   initializer=_worker, initargs=(self.cpus,))
        try:
            futures = {pool.submit(_in_worker, fn, job): i for i, job in enumerate(jobs)}
            for f in as_completed(futures):
                out[futures[f]] = f.result()
                done(out[futures[f]])  # type: ignore[arg-type]
        except BaseException:  # Ctrl-C, SIGTERM (the CLI raises it as Ctrl-C), a dead worker
            _stop(pool)
            raise
        pool.shutdown()
        return [r for r in out if r is not None]


@register
class RayExecutor(Executor):
    """One Ray task per cell (``num_cpus``/``num_gpus`` from the sweep file); ``executor.address`` joins a
    running cluster, else a local Ray instance with ``workers × cpus_per_cell`` CPUs is started."""

    name = "ray"

    @classmethod
    def check(cls) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise LayerpruneError("the ray executor needs Ray: pip install 'layerprune[ray]'") from None

    def map(self, fn: Callable[..., dict[str, Any]], jobs: list[dict[str, Any]],
            done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        import ray

        address = self.settings.get("address")
        # No usage-stats upload (offline machines wait for it to time out) and no token prompt for a local instance.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        started = not ray.is_initialized()
        if started and not address:
            # Ray starts its workers at niceness 15: on a busy machine every other process preempts the cells
            # (15x the local executor's wall time here beside two other jobs; 0 puts them level with them).
            os.environ.setdefault("RAY_worker_niceness", "0")
        if started:
            kw: dict[str, Any] = {"address": address} if address else {"num_cpus": self.workers * self.cpus}
            with _own_sigterm():
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
        try:
            task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus)(_in_ray(fn, self.cpus))
            refs = {task.remote(**job): i for i, job in enumerate(jobs)}
            out: list[dict[str, Any] | None] = [None] * len(jobs)
            pending = list(refs)
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    r = ray.get(ready[0])
                    out[refs[ready[0]]] = r
                    done(r)
            except BaseException:  # Ctrl-C / SIGTERM: stop this sweep's tasks (also on a cluster it joined)
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
            return [r for r in out if r is not None]
        finally:
            if started:
                ray.shutdown()


@contextlib.contextmanager
def _own_sigterm() -> Iterator[None]:
    """Keep this process's SIGTERM handler across ``ray.init`` (which installs one that exits at once): the
    CLI's stops the sweep like Ctrl-C, and the ``finally`` below shuts the local instance down."""
    main = threading.current_thread() is threading.main_thread()
    prev = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, prev)


def _in_ray(fn: Callable[..., dict[str, Any]], cpus: int) -> Callable[..., dict[str, Any]]:
    def run(**job: Any) -> dict[str, Any]:
        _threads(cpus)
        return fn(**job)

    return run


@register
class SlurmExecutor(Executor):
    """A submitit job array on Slurm (partition, time, GPUs from ``executor.slurm``); ``slurm.cluster: local``
    runs the same array through submitit's local executor (tests, a workstation)."""

    name = "slurm"

    @classmethod
    def check(cls) -> None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise LayerpruneError("the slurm executor needs submitit: pip install 'layerprune[slurm]'") from None

    def map(self, fn: Callable[..., dict[str, Any]], jobs: list[dict[str, Any]],
            done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        import submitit

        s = dict(self.settings.get("slurm") or {})
        cluster = s.pop("cluster", None)
        ex = submitit.AutoExecutor(folder=str(self.folder / "submitit"), cluster=cluster)
        params: dict[str, Any] = {"timeout_min": int(s.pop("time_min", 60)), "cpus_per_task": self.cpus,
                                  "slurm_array_parallelism": self.workers}
        if cluster != "local":
            params.update({f"slurm_{k}": v for k, v in s.items()})
            if self.gpus:
                params["gpus_per_node"] = int(self.gpus)
        ex.update_parameters(**params)
        submitted = ex.map_array(_call, [fn] * len(jobs), jobs)
        out = []
        try:
            for j in submitted:
                r = j.result()
                done(r)
                out.append(r)
        except BaseException:  # Ctrl-C / SIGTERM: the array's jobs are cancelled too (scancel); --resume goes on
            for j in submitted:
                j.cancel(check=False)
            raise
        return out


def _call(fn: Callable[..., dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
    return fn(**job)


def make_executor(name: str, settings: dict[str, Any], workers: int, folder: Path) -> Executor:
    try:
        cls = EXECUTORS[name]
    except KeyError:
        raise LayerpruneError(f"unknown executor '{name}'; choose one of {', '.join(EXECUTORS)}") from None
    cls.check()
    return cls(settings, workers, folder)


__all__ = ["EXECUTORS", "Executor", "make_executor", "register"]
