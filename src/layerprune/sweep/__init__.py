"""Sweeps: many recipes (a grid of axes over a base recipe) run as cells on this machine, Ray or Slurm, sharing
the work they have in common, and reported as one table with findings."""

from __future__ import annotations

from .core import run_cell, sweep
from .executors import EXECUTORS, make_executor, register
from .spec import Cell, Sweep, build_sweep, load_sweep

__all__ = ["EXECUTORS", "Cell", "Sweep", "build_sweep", "load_sweep", "make_executor", "register", "run_cell",
           "sweep"]
