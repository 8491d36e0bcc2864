"""Constants and value formatting shared by the report modules."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..plots import finite as _num

CITATION = """@article{lu2024reassessing,
  title   = {Reassessing Layer Pruning in LLMs: New Insights and Methods},
  author  = {Lu, Yao and Cheng, Hao and Fang, Yujie and Wang, Zeyu and Wei, Jiaheng and Xu, Dongwei and
             Xuan, Qi and Yang, Xiaoniu and Zhu, Zhaowei},
  journal = {arXiv preprint arXiv:2411.15558},
  year    = {2024}
}"""
# The Hub repository the embedded ``default`` model was converted from (for the model card's base_model).
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_MERGEKIT_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                    "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


# --------------------------------------------------------------------------------------------------------------


def _dict(x: Any) -> dict[str, Any]:
    """``x`` when it is a dict, else an empty one (manifest sections are optional)."""
    return x if isinstance(x, dict) else {}




def fmt_count(n: Any) -> str:
    """134515008 -> '134.52M' (parameters, MACs)."""
    v = _num(n)
    if v is None:
        return "–"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def _fmt(x: Any, digits: int = 2) -> str:
    v = _num(x)
    return "–" if v is None else f"{v:.{digits}f}"


def _fmt_pm(x: Any, se: Any, digits: int = 4) -> str:
    v = _num(x)
    if v is None:
        return "–"
    s = _num(se)
    return f"{v:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def _rel(value: Any, ref: Any) -> str:
    v, r = _num(value), _num(ref)
    if v is None or r is None or r == 0:
        return ""
    return f" ({(v - r) / abs(r) * 100:+.1f}%)"


def _fmt_seconds(s: Any) -> str:
    v = _num(s)
    if v is None:
        return "–"
    h, rem = divmod(int(round(v)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _layers(x: Any) -> list[int]:
    if not isinstance(x, (list, tuple)):
        return []
    return [int(i) for i in x if isinstance(i, int) and not isinstance(i, bool)]


def _layer_list(x: Sequence[int]) -> str:
    return "`[" + ", ".join(str(i) for i in x) + "]`"


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return str(v)


# --------------------------------------------------------------------------------------------------------------
# Manifest accessors
