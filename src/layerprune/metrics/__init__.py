"""Layer-importance metrics: one registry (name -> class), every score indexed by the original layer index,
higher = more important (``MetricResult.direction`` says so explicitly). See docs/scoring.md.

========== =================================================== ========== ===============================
name       definition                                          data       modes
========== =================================================== ========== ===============================
random     seeded random order                                 none       any
reverse    L - i (deepest first)                               none       any
magnitude  sum_k ||W_k||_p (p = 1|2, seed_compat: ||W_k||_p^p) none       memory, dispatch, layerwise
taylor     |W * sum dL/dW| reduced like magnitude              calib      memory, dispatch (no offload)
ppl        calibration perplexity with the layer removed       calib      memory, dispatch, layerwise
bi         1 - mean token cos(layer input, layer output)       calib      memory, dispatch, layerwise
angular    arccos(cos(X_l, X_l+n))/pi for every n; blocks      calib      memory, dispatch, layerwise
cka        1 - CKA(layer input, output); CKA matrix            calib      memory, dispatch, layerwise
========== =================================================== ========== ===============================
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    HIGHER,
    LOWER,
    METRICS,
    Metric,
    MetricResult,
    ScoreContext,
    make_metric,
    metric_names,
    parse_metric_list,
    register_metric,
)
from .magnitude import Magnitude
from .perplexity import Perplexity, remove_one_nll_naive, remove_one_nll_prefix
from .similarity import CKA, Angular, BlockInfluence
from .simple import RandomOrder, Reverse
from .taylor import Taylor, taylor_gradients

# Every module of this package registers its metrics on import: a new metric is one new module (or one class in
# an existing one) with @register_metric, nothing to list here.
for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name not in ("base", "layerwise"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["CKA", "HIGHER", "LOWER", "METRICS", "Angular", "BlockInfluence", "Magnitude", "Metric", "MetricResult",
           "Perplexity", "RandomOrder", "Reverse", "ScoreContext", "Taylor", "make_metric", "metric_names",
           "parse_metric_list", "register_metric", "remove_one_nll_naive", "remove_one_nll_prefix",
           "taylor_gradients"]
