"""The search stage: the best cut for a budget, chosen by evidence (candidates → proxy → probe → final heal).

Public API::

    from layerprune.search import SearchConfig, search
    record = search("default", "runs/best", "params=0.816", heal={"max_steps": 100, "lr": 2e-3})
"""

from .candidates import Candidate
from .config import SearchConfig
from .core import search, search_cut

__all__ = ["Candidate", "SearchConfig", "search", "search_cut"]
