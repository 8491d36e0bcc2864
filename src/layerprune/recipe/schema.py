"""The recipe schema: every key, its type and default, in one table. Validation errors name the key."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from ..errors import LayerpruneError
from ..options import field_default, parse_scalar

SEARCH = "search"  # prune.metric value that runs the search stage instead of one metric
GIVEN = "given"  # what chose the cut when prune.remove names it

# Marker types for the schema table.
OPT_STR = (str, type(None))
OPT_INT = (int, type(None))
OPT_NUM = (int, float, type(None))
LIST_STR = "list[str]"
LIST_INT = "list[int]"

# key -> (accepted types, default). Nested dicts are sections. This table is the documentation of record
# (docs/recipes.md mirrors it).
SCHEMA: dict[str, Any] = {
    "name": (str, "recipe"),
    "model": (str, "default"),  # local folder, Hub id, or an embedded name: "default" (SmolLM2-135M-Instruct), "gemma3-270m"
    "seed": (int, 42),
    "dtype": (str, "float32"),  # load dtype for scoring/pruning/evaluation
    "data_dir": (OPT_STR, None),  # offline data folder; default $LAYERPRUNE_DATA, else the Hub
    # Processes: with 2 or more, the evaluations of dense, pruned and compensated run in worker processes
    # beside compensation and healing (give each process one thread: OMP_NUM_THREADS=1 on 2 cores).
    "workers": (int, 1),
    # Cores the run may use (null: leave torch's thread count alone): the main process's torch threads; with
    # workers >= 2, the cores the busy evaluation workers leave free, re-checked at forward passes (recipe/cores.py).
    "cores": (OPT_INT, None),
    "prune": {
        "metric": (str, "reverse"),
        "num_layers": (OPT_INT, None),  # how many layers to remove ...
        "ratio": (OPT_NUM, 0.25),  # ... or which fraction (rounded down: 25% of 26 layers is 6, as in the paper)
        "target": (OPT_STR, None),  # ... or a budget: params=0.8, macs=5G, kv_cache=18KB (analytic kinds)
        # ... or the layers themselves, chosen elsewhere (e.g. a search's winner): no scoring; the metric is unused
        "remove": (LIST_INT, []),
        "metric_params": (dict, {}),  # e.g. {p: 1, seed_compat: false}
        "protect_first": (int, 0),
        "protect_last": (int, 0),
        "calib": (str, "c4"),
        "calib_split": (OPT_STR, None),
        "nsamples": (int, 10),
        "seqlen": (int, 128),
        "stability": (int, 0),  # bootstrap resamples of the ranking (0: off); see docs/scoring.md
        "stability_calib": (LIST_STR, []),  # further calibration sources to compare the ranking on (Kendall tau)
        "similarity": (bool, True),  # also compute the CKA layer-similarity matrix (for the report's heat map)
        "iterative": (bool, False),  # score -> prune step -> heal -> re-score ... until the target
        "step": (int, 1),
    },
    "compensate": "CompensationConfig",  # generated below from layerprune.compensation.CompensationConfig
    "heal": "HealConfig",  # generated below from layerprune.healing.config.HealConfig (recipe fields)
    "evaluate": {
        "models": (LIST_STR, ["dense", "pruned", "compensated", "healed"]),
        "tasks": (LIST_STR, ["mmlu", "cmmlu", "piqa", "openbookqa", "winogrande", "hellaswag", "arc_easy",
                             "arc_challenge"]),
        "limit": (OPT_INT, None),
        "task_limits": (dict, {}),  # per-task limits over `limit`, e.g. {mmlu: 114} (the study's MMLU budget)
        "num_fewshot": (int, 0),
        "batch_size": (int, 8),
        "ppl": (LIST_STR, ["wikitext2"]),
        "ppl_seqlen": (int, 128),
        "ppl_max_tokens": (OPT_INT, None),
        # Agreement with the dense model on held-out text (KL(dense||model), top-1 agreement), per dataset.
        "compare": (LIST_STR, []),
        "compare_max_tokens": (OPT_INT, 16384),
        # Generation: lm-eval generative tasks (gsm8k: exact match after its answer extraction) and greedy
        # agreement with the dense model on held-out instructions (exact match, common prefix, ROUGE-L).
        "generative": {
            "tasks": (LIST_STR, []),
            "limit": (OPT_INT, None),
            "agreement": (int, 0),  # prompts (0: off)
            "new_tokens": (int, 64),
        },
    },
    "measure": {
        "enabled": (bool, True),
        "seqlen": (int, 64),
        "batch": (LIST_INT, [1]),
        "new_tokens": (int, 32),
        "repeats": (int, 3),
    },
    "export": {
        "gguf": (OPT_STR, None),  # f16 / bf16 / q8_0 / f32: also write RUN/gguf/model-<type>.gguf (llama.cpp)
    },
}


def _schema_types(hint: Any) -> Any:
    """Accepted recipe types for a config field's type hint."""
    import types
    import typing

    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    out: list[type] = []
    for a in args:
        a = typing.get_origin(a) or a
        out += [int, float] if a is float else [a]
    return tuple(dict.fromkeys(out)) if len(out) > 1 else out[0]


def _section_from_config(cls: type, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A schema section from a config dataclass: every field meant for recipes, its types and default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("recipe") is False:
            continue
        default = field_default(f)
        out[f.name] = (_schema_types(hints[f.name]), (defaults or {}).get(f.name, default))
    return out


def _compensation_section() -> dict[str, Any]:
    from ..compensation import CompensationConfig

    # Recipes compensate only when asked: "none" keeps older recipes' results unchanged.
    return _section_from_config(CompensationConfig, {"method": "none"})


def _heal_section() -> dict[str, Any]:
    from ..healing.config import HealConfig

    return _section_from_config(HealConfig)


def _search_section() -> dict[str, Any]:
    from ..search.config import SearchConfig

    return _section_from_config(SearchConfig)


SCHEMA["compensate"] = _compensation_section()
SCHEMA["heal"] = _heal_section()
# Read when prune.metric is "search" (the search chooses the cut and whether to compensate it).
SCHEMA["search"] = _search_section()


def _type_name(types: Any) -> str:
    if isinstance(types, str):
        return types
    names = [t.__name__.replace("NoneType", "null") for t in (types if isinstance(types, tuple) else (types,))]
    return " or ".join(names)


def _check(value: Any, types: Any, key: str) -> Any:
    if isinstance(types, str):  # list[str] / list[int]
        inner = str if types == LIST_STR else int
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [v.strip() for v in str(value).split(",") if v.strip()] if inner is str else [value]
        if not isinstance(value, list) or not all(isinstance(v, inner) and not isinstance(v, bool) for v in value):
            raise LayerpruneError(f"recipe: '{key}' must be a {types}, got {value!r}")
        return value
    tt = types if isinstance(types, tuple) else (types,)
    if isinstance(value, str) and float in tt:
        # PyYAML reads "1e-5" (no dot) as a string: accept it as the number it plainly is.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and bool not in tt:
        raise LayerpruneError(f"recipe: '{key}' must be {_type_name(types)}, got {value!r}")
    if not isinstance(value, tt):
        raise LayerpruneError(f"recipe: '{key}' must be {_type_name(types)}, got {value!r}")
    return value


def _validate(data: Any, schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise LayerpruneError(f"recipe: '{prefix.rstrip('.') or 'recipe'}' must be a mapping")
    out: dict[str, Any] = {}
    for k in data:
        if k not in schema:
            raise LayerpruneError(f"recipe: unknown key '{prefix}{k}'")
    for k, spec in schema.items():
        if isinstance(spec, dict):
            out[k] = _validate(data.get(k) if data.get(k) is not None else {}, spec, f"{prefix}{k}.")
        elif k in data:
            out[k] = _check(data[k], spec[0], f"{prefix}{k}")
        else:
            out[k] = copy.deepcopy(spec[1])
    return out


# Smallest value of numeric keys (None, where allowed, means "off" or "all"): checked before the first stage,
# so a bad value never surfaces after score, prune and heal.
MINIMUM: dict[str, int] = {
    "prune.nsamples": 1, "prune.seqlen": 2, "prune.protect_first": 0, "prune.protect_last": 0,
    "evaluate.limit": 1, "evaluate.num_fewshot": 0, "evaluate.batch_size": 1, "evaluate.ppl_seqlen": 2,
    "evaluate.ppl_max_tokens": 2, "evaluate.generative.limit": 1, "evaluate.generative.agreement": 0,
    "evaluate.generative.new_tokens": 1, "evaluate.compare_max_tokens": 2, "measure.seqlen": 1,
    "measure.new_tokens": 1, "measure.repeats": 1,
}


def _get(rec: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        rec = rec[part]
    return rec


def _check_minimums(rec: dict[str, Any]) -> None:
    for key, low in MINIMUM.items():
        v = _get(rec, key)
        if v is not None and v < low:
            raise LayerpruneError(f"recipe: '{key}' must be >= {low}, got {v}")
    if any(b < 1 for b in rec["measure"]["batch"]):
        raise LayerpruneError(f"recipe: 'measure.batch' must be >= 1 in every entry, got {rec['measure']['batch']}")


def _check_task_limits(e: dict[str, Any]) -> None:
    for task, n in e["task_limits"].items():
        if task not in e["tasks"]:
            raise LayerpruneError(f"recipe: 'evaluate.task_limits' names '{task}', which is not in evaluate.tasks")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise LayerpruneError(f"recipe: 'evaluate.task_limits.{task}' must be an integer >= 1, got {n!r}")


def validate(data: Any) -> dict[str, Any]:
    """Fill defaults and check every key and type; raises a one-line LayerpruneError naming the key."""
    rec = _validate(data if data is not None else {}, SCHEMA, "")
    _check_minimums(rec)
    _check_task_limits(rec["evaluate"])
    if rec["prune"]["stability"] == 1 or rec["prune"]["stability"] < 0:
        raise LayerpruneError("recipe: 'prune.stability' is a number of resamples: 0 (off) or at least 2")
    if rec["export"]["gguf"] is not None:
        from ..export import OUTTYPES

        if rec["export"]["gguf"] not in OUTTYPES:
            raise LayerpruneError(f"recipe: 'export.gguf' must be one of {', '.join(OUTTYPES)}")
    if rec["workers"] < 1:
        raise LayerpruneError("recipe: 'workers' must be >= 1")
    if rec["cores"] is not None and rec["cores"] < 1:
        raise LayerpruneError("recipe: 'cores' must be >= 1 (or null)")
    p = rec["prune"]
    if p["target"] is not None:
        from ..budget import ANALYTIC, Target

        t = Target.parse(p["target"])
        if t.kind not in ANALYTIC:
            raise LayerpruneError(f"recipe: 'prune.target' {t.kind} is measured; recipes take {', '.join(ANALYTIC)} "
                                  "(use 'layerprune prune --target' for measured speedups)")
        if p["num_layers"] is not None:
            raise LayerpruneError("recipe: give prune.num_layers or prune.target, not both")
    if p["num_layers"] is not None and p["num_layers"] < 1:
        raise LayerpruneError("recipe: 'prune.num_layers' must be >= 1")
    if p["num_layers"] is None and not (p["ratio"] and 0 < p["ratio"] < 1):
        raise LayerpruneError("recipe: 'prune.ratio' must be in (0, 1) when prune.num_layers is not set")
    if p["step"] < 1:
        raise LayerpruneError("recipe: 'prune.step' must be >= 1")
    _check_given_cut(p)
    if p["metric"] == SEARCH:
        _validate_search(rec)
    else:
        from ..metrics.base import make_metric

        try:
            make_metric(p["metric"], **p["metric_params"])
        except LayerpruneError as e:
            raise LayerpruneError(f"recipe: prune.metric: {e}") from None
        check_search_section(rec)
    bad = set(rec["evaluate"]["models"]) - {"dense", "pruned", "compensated", "healed"}
    if bad:
        raise LayerpruneError(f"recipe: 'evaluate.models' has unknown entries {sorted(bad)}; use dense, pruned, "
                              "compensated, healed")
    from ..compensation import CompensationConfig
    from ..healing.config import HealConfig
    from ..healing.methods import METHODS

    h = rec["heal"]
    if h["method"] != "none":
        if h["method"] not in METHODS:
            raise LayerpruneError(f"recipe: unknown heal.method '{h['method']}'; choose one of "
                                  f"{', '.join([*METHODS, 'none'])}")
        try:
            HealConfig.from_kwargs(**{k: v for k, v in h.items() if v is not None})
        except LayerpruneError as e:
            raise LayerpruneError(f"recipe: heal: {e}") from None
    try:
        CompensationConfig.from_kwargs(**rec["compensate"])
    except LayerpruneError as e:
        raise LayerpruneError(f"recipe: compensate: {e}") from None
    if rec["compensate"]["method"] != "none" and p["iterative"]:
        raise LayerpruneError("recipe: compensation after iterative pruning is not supported (set "
                              "compensate.method: none or prune.iterative: false)")
    return rec


def _check_given_cut(p: dict[str, Any]) -> None:
    """``prune.remove`` names the cut itself: no metric chooses, so no budget or iteration may ask one to."""
    if not p["remove"]:
        return
    if p["metric"] == SEARCH or p["iterative"] or p["target"] is not None:
        raise LayerpruneError("recipe: prune.remove names the cut itself; it does not go with prune.metric: search, "
                              "prune.iterative or prune.target")
    if p["num_layers"] is not None and p["num_layers"] != len(p["remove"]):
        raise LayerpruneError(f"recipe: prune.num_layers ({p['num_layers']}) differs from the {len(p['remove'])} "
                              "layers of prune.remove")
    if len(set(p["remove"])) != len(p["remove"]) or min(p["remove"]) < 0:
        raise LayerpruneError("recipe: prune.remove must list distinct layer indices >= 0")


def _validate_search(rec: dict[str, Any]) -> None:
    """``prune.metric: search`` needs a budget (prune.target), one-shot pruning, and a valid search section; the
    search decides compensation itself with ``search.compensation``."""
    p = rec["prune"]
    if p["target"] is None:
        raise LayerpruneError("recipe: prune.metric: search needs prune.target (e.g. params=0.8)")
    if p["iterative"]:
        raise LayerpruneError("recipe: prune.metric: search is one-shot (set prune.iterative: false)")
    if rec["compensate"]["method"] != "none":
        raise LayerpruneError("recipe: prune.metric: search decides compensation per candidate; set "
                              "search.compensation instead of compensate.method")
    check_search_section(rec)


def check_search_section(rec: dict[str, Any]) -> None:
    """The search section's values, whether or not the recipe searches (a wrong key is never ignored)."""
    from ..search.config import SearchConfig

    try:
        SearchConfig.from_kwargs(**rec["search"])
    except LayerpruneError as e:
        raise LayerpruneError(f"recipe: {e}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (YAML-parsed values) to raw recipe data."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise LayerpruneError(f"override '{item}' must look like key=value (e.g. heal.max_steps=50)")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LayerpruneError(f"override '{key}': '{part}' is not a section")
        node[parts[-1]] = parse_scalar(value)
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read, override and validate a recipe YAML file."""
    from ..io import read_yaml

    p = Path(path)
    data = read_yaml(p, "recipe")
    if data is None:
        raise LayerpruneError(f"recipe {p} is empty (an empty file would run the whole default pipeline); "
                              "write at least 'model:' and 'prune:'")
    return validate(apply_overrides(data, overrides or []))
