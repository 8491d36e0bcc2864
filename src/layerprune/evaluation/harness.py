"""Zero-shot suite through lm-evaluation-harness, in process, on an already-loaded model.

``evaluate(model, tokenizer, tasks)`` wraps the model in lm-eval's ``HFLM`` and calls ``simple_evaluate`` with a
task manager that indexes only the requested tasks (see :mod:`.tasks`). With a data folder the tasks read
local files and nothing touches the network.

``--limit N`` (``limit=N``) means N documents **per reported task**: a plain task scores its first N documents;
a group (MMLU: 57 subjects, CMMLU: 67) spreads N over its subtasks as evenly as their sizes allow (the first
documents of each subject) and reports the group score over those N. lm-eval's own ``--limit`` applies per
*subtask* (MMLU ``--limit 100`` = 5,700 documents); ``limit_per_subtask=True`` gives that behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LayerpruneError
from .tasks import SPECS, SUITE, TaskSource, fingerprint, parse_tasks

# Batch size used for "auto" on CPU: lm-eval's auto detection runs 5 forwards at up to 64 x longest request,
# minutes on a CPU, and larger batches buy almost nothing there.
CPU_AUTO_BATCH = 8
METRICS = ("acc", "acc_norm")


def _quiet_git_hash() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        return out.stdout.strip() or None
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Silence lm-eval's and datasets' INFO/WARNING chatter (not errors) unless ``verbose``."""
    if verbose:
        yield
        return
    names = ("lm_eval", "lm-eval", "datasets", "transformers")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        import datasets

        was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover - datasets always present with lm-eval
        was = None
    # lm-eval draws one progress bar per (sub)task while building requests: 130 bars for the suite.
    import functools

    import lm_eval.api.task as lm_task
    import lm_eval.evaluator as lm_evaluator

    old_tqdm = lm_task.tqdm
    lm_task.tqdm = functools.partial(old_tqdm, disable=True)
    # lm-eval records `git describe` of the working directory; outside a repository git prints "fatal: not a
    # git repository" on our stderr at every run. The same lookup, with git's stderr discarded.
    old_hash = lm_evaluator.get_git_commit_hash
    lm_evaluator.get_git_commit_hash = _quiet_git_hash
    try:
        yield
    finally:
        lm_task.tqdm = old_tqdm
        lm_evaluator.get_git_commit_hash = old_hash
        for n, lv in old.items():
            logging.getLogger(n).setLevel(lv)
        if was:
            import datasets

            datasets.enable_progress_bars()


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


SCORING = ("auto", "lm-eval", "shared-prefix")


def make_lm(model: nn.Module | str, tokenizer: Any = None, *, batch_size: int | str = "auto",
            max_batch_size: int = 64, model_args: dict[str, Any] | None = None, scoring: str = "auto") -> Any:
    """An lm-eval ``HFLM`` around ``model``.

    ``model`` is an already-loaded module (the normal case; ``parallelize`` is then impossible, an lm-eval
    restriction) or a path/Hub id that HFLM loads itself with ``model_args`` (``parallelize=True``,
    ``max_memory_per_gpu``, ``peft``, ``dtype`` ..., or data parallel under ``accelerate launch``).
    ``scoring``: ``lm-eval`` (its own batched loop), ``shared-prefix`` (:mod:`.fastlm`: each context once,
    same numbers to float rounding) or ``auto`` (shared-prefix for a loaded model on CPU, else lm-eval).
    """
    from lm_eval.models.huggingface import HFLM

    if scoring not in SCORING:
        raise LayerpruneError(f"scoring must be one of {', '.join(SCORING)}")

    kwargs = dict(model_args or {})
    if isinstance(model, (str, os.PathLike)):
        on_cpu = not torch.cuda.is_available() or str(kwargs.get("device", "")).startswith("cpu")
    else:
        if kwargs.get("parallelize"):
            raise LayerpruneError("parallelize needs the model path (lm-eval cannot re-shard a loaded model); "
                                  "pass the path instead of a loaded model")
        on_cpu = _device_of(model).type == "cpu"
    if str(batch_size).startswith("auto") and on_cpu:
        batch_size = CPU_AUTO_BATCH
    if isinstance(model, (str, os.PathLike)):
        return HFLM(pretrained=str(model), tokenizer=tokenizer, batch_size=batch_size,
                    max_batch_size=max_batch_size, **kwargs)
    if tokenizer is None:
        raise LayerpruneError("a loaded model needs its tokenizer for evaluation")
    cls = HFLM
    if scoring == "shared-prefix" or (scoring == "auto" and on_cpu):
        from .fastlm import SharedPrefixHFLM

        cls = SharedPrefixHFLM
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=max_batch_size,
               **kwargs)


def _spread(n: int, sizes: list[int]) -> list[int]:
    """Split ``n`` documents over subtasks of the given sizes as evenly as possible (water-filling)."""
    take = [0] * len(sizes)
    left = min(n, sum(sizes))
    while left > 0:
        open_ = [i for i, s in enumerate(sizes) if take[i] < s]
        share = max(1, left // len(open_))
        for i in open_:
            add = min(share, sizes[i] - take[i], left)
            take[i] += add
            left -= add
            if left == 0:
                break
    return take


def sample_plan(loaded: dict[str, Any], names: Sequence[str], limit: int | None,
                per_task: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Doc indices per leaf task so that each *requested* task (or group) scores ``limit`` documents, or
    ``per_task[name]`` where given (None: all of them)."""
    plan: dict[str, list[int]] = {}
    groups = loaded.get("groups", {})

    def first(n: int | None, size: int) -> list[int]:
        return list(range(size if n is None else min(n, size)))

    for name in names:
        n = (per_task or {}).get(name, limit)
        if name in groups:
            leaves = sorted(groups[name].get_all_tasks(), key=lambda t: t.task_name)
            sizes = [len(t.eval_docs) for t in leaves]
            for t, k in zip(leaves, _spread(sum(sizes) if n is None else n, sizes), strict=True):
                plan[t.task_name] = list(range(k))
        elif name in loaded["tasks"]:
            plan[name] = first(n, len(loaded["tasks"][name].eval_docs))
    # lm-eval treats a task missing from `samples` as "all documents": give leftovers (tags) the limit too.
    for tname, t in loaded["tasks"].items():
        plan.setdefault(tname, first(limit, len(t.eval_docs)))
    return plan


def drop_unsampled(loaded: dict[str, Any], plan: dict[str, list[int]]) -> None:
    """Remove leaf tasks with no planned documents (and groups left empty) from the loaded groups.

    lm-eval reads an empty selection as "all documents", so a group with fewer documents requested than
    subtasks must lose the unsampled subtasks instead.
    """
    from lm_eval.api.group import Group

    def prune(g: Any) -> bool:
        for child in list(g):
            if isinstance(child, Group):
                if not prune(child):
                    g.pop(child.name)
            elif not plan.get(child.task_name):
                g.pop(child.task_name)
        return len(g) > 0

    for g in list(loaded.get("groups", {}).values()):
        prune(g)
    for name in [t for t, docs in plan.items() if not docs]:
        loaded["tasks"].pop(name, None)
        plan.pop(name)


def _metric(entry: dict[str, Any], key: str) -> float | None:
    v = entry.get(f"{key},none")
    return float(v) if isinstance(v, (int, float)) else None


def summarize(res: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Per requested task: acc/acc_norm with stderr, sample count, kind; plus the unweighted mean of acc."""
    rows: dict[str, Any] = {}
    n_samples = res.get("n-samples", {})
    subtasks = res.get("group_subtasks", {})
    for name in names:
        entry = (res.get("groups") or {}).get(name) or res["results"].get(name)
        if entry is None:
            continue
        row: dict[str, Any] = {"kind": "group" if name in subtasks and subtasks[name] else "task"}
        for m in METRICS:
            v = _metric(entry, m)
            if v is not None:
                row[m] = v
                se = entry.get(f"{m}_stderr,none")
                row[f"{m}_stderr"] = float(se) if isinstance(se, (int, float)) else None
        for key, flt in (("exact_match", "strict-match"), ("exact_match_flexible", "flexible-extract")):
            v = entry.get(f"exact_match,{flt}")
            if isinstance(v, (int, float)):  # generative tasks (gsm8k): lm-eval's answer filters
                row["kind"] = "generative"
                row[key] = float(v)
                se = entry.get(f"exact_match_stderr,{flt}")
                row[f"{key}_stderr"] = float(se) if isinstance(se, (int, float)) else None
        if row["kind"] == "group":
            leaves = _leaves(name, subtasks)
            row["subtasks"] = len(leaves)
            row["n"] = sum(int(n_samples.get(t, {}).get("effective", 0)) for t in leaves)
            for m in METRICS:
                # lm-eval pools subtask stderrs and gives 'N/A' once a subtask has a single document (small
                # --limit): fall back to the binomial stderr of the pooled documents.
                if m in row and row.get(f"{m}_stderr") is None and row["n"] > 1:
                    p = row[m]
                    row[f"{m}_stderr"] = math.sqrt(p * (1 - p) / (row["n"] - 1))
                    row["stderr_note"] = "binomial over pooled documents (lm-eval pooled stderr undefined)"
        else:
            row["n"] = int(n_samples.get(name, {}).get("effective", 0))
        rows[name] = row
    return {"tasks": rows, "mean_acc": avg_acc(rows)[0], "mean_acc_over": [n for n, r in rows.items() if "acc" in r]}


def avg_acc(tasks: dict[str, Any], only: list[str] | None = None) -> tuple[float | None, float | None]:
    """The paper's Avg Acc: the mean accuracy over ``tasks`` (rows with an ``acc``; ``only``: exactly these
    tasks, None unless all are present) and its standard error (task stderrs combined as independent)."""
    names = list(only) if only is not None else [n for n, r in tasks.items() if isinstance(r, dict) and
                                                  isinstance(r.get("acc"), (int, float))]
    rows: list[dict[str, Any]] = [r for r in (tasks.get(n) for n in names) if isinstance(r, dict)
                                  and isinstance(r.get("acc"), (int, float))]
    if not rows or len(rows) != len(names):
        return None, None
    mean = sum(float(r["acc"]) for r in rows) / len(rows)
    se = math.sqrt(sum(float(r.get("acc_stderr") or 0.0) ** 2 for r in rows)) / len(rows)
    return mean, se


def _leaves(name: str, subtasks: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for child in subtasks.get(name, []):
        out.extend(_leaves(child, subtasks) if subtasks.get(child) else [child])
    return out


def predictions(res: dict[str, Any]) -> dict[str, dict[int, dict[str, int]]]:
    """Multiple-choice picks per leaf task and doc: ``{task: {doc_id: {"acc": i, "acc_norm": j}}}``.

    ``acc`` is the argmax of the summed log-likelihoods, ``acc_norm`` of the log-likelihoods divided by the
    choice's character length (lm-eval's definitions; the continuation minus its one-space target delimiter).
    Needs ``log_samples=True``.
    """
    out: dict[str, dict[int, dict[str, int]]] = {}
    for task, samples in (res.get("samples") or {}).items():
        per: dict[int, dict[str, int]] = {}
        for s in samples:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            pick = {"acc": max(range(len(lls)), key=lls.__getitem__)}
            conts = [a[1] for a in s["arguments"]]
            # One continuation per choice after a shared context (winogrande varies the context instead).
            if len({a[0] for a in s["arguments"]}) == 1 and len(conts) == len(lls):
                lens = [max(1, len(c[1:] if c.startswith(" ") else c)) for c in conts]
                normed = [ll / n for ll, n in zip(lls, lens, strict=True)]
                pick["acc_norm"] = max(range(len(normed)), key=normed.__getitem__)
            per[int(s["doc_id"])] = pick
        out[task] = per
    return out


def evaluate(model: nn.Module | str, tokenizer: Any = None, tasks: str | Sequence[str] | None = None, *,
             num_fewshot: int = 0, limit: int | float | None = None, limits: dict[str, int] | None = None,
             limit_per_subtask: bool = False, batch_size: int | str = "auto",
             data_dir: str | os.PathLike | None = None,
             model_args: dict[str, Any] | None = None, log_samples: bool = False, bootstrap_iters: int = 100000,
             scoring: str = "auto", verbose: bool = False) -> dict[str, Any]:
    """Run the lm-eval zero-shot suite on ``model`` and return a summary.

    Args:
        model: a loaded causal LM (wrapped in HFLM as is; a PEFT model works too) or a model path/Hub id that
            lm-eval loads itself with ``model_args`` (multi-GPU: ``{"parallelize": True}``).
        tokenizer: the model's tokenizer (required for a loaded model).
        tasks: comma list or sequence of lm-eval task/group names (default: the seed's 8-task suite).
        num_fewshot: few-shot examples (the seed uses 0).
        limit: documents per requested task (groups spread it over subtasks); a float < 1 is a fraction.
        limits: per-task document limits that override ``limit`` (e.g. ``{"mmlu": 114}``); integers only.
        limit_per_subtask: apply ``limit`` per leaf subtask instead, as lm-eval's own ``--limit`` does.
        data_dir: local data folder (``eval/<task>/<split>.jsonl``); None reads the Hugging Face Hub.
        log_samples: keep lm-eval's per-document records under ``"samples"`` (needed for :func:`predictions`).
        scoring: ``auto`` | ``lm-eval`` | ``shared-prefix`` (see :func:`make_lm`).

    Returns:
        ``{"tasks": {name: {acc, acc_stderr, acc_norm?, acc_norm_stderr?, n, kind}}, "mean_acc",
        "mean_acc_over", "config": {...}, "lm_eval": <lm-eval results, all subtasks>}``
        (+ ``"samples"`` with ``log_samples``).
    """
    import lm_eval

    from ..data.presets import hub_reachable

    names = parse_tasks(tasks)
    unknown = sorted(set(limits or {}) - set(names))
    if unknown:
        raise LayerpruneError(f"per-task limits for tasks not evaluated: {', '.join(unknown)}")
    if data_dir is None and not hub_reachable():
        raise LayerpruneError("no local data folder (--data-dir / $LAYERPRUNE_DATA) and the Hub is off "
                              "(HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1)")
    t0 = time.perf_counter()
    with quiet(verbose), TaskSource(names, data_dir, num_fewshot) as src:
        lm = make_lm(model, tokenizer, batch_size=batch_size, model_args=model_args, scoring=scoring)
        loaded = src.load()
        top = [loaded["groups"][n] if n in loaded.get("groups", {}) else loaded["tasks"].get(n, n) for n in names]
        kwargs: dict[str, Any] = {}
        if limit is not None or limits:
            if (limit is not None and limit <= 0) or any(not isinstance(v, int) or v < 1
                                                         for v in (limits or {}).values()):
                raise LayerpruneError("--limit must be positive (per-task limits: integers >= 1)")
            if limit_per_subtask or (isinstance(limit, float) and limit < 1):
                if limits:
                    raise LayerpruneError("per-task limits take whole documents per requested task: not with a "
                                          "fractional or per-subtask limit")
                kwargs["limit"] = limit
            else:
                kwargs["samples"] = sample_plan(loaded, names, None if limit is None else int(limit), limits)
                drop_unsampled(loaded, kwargs["samples"])
        t_load = time.perf_counter() - t0
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=top, task_manager=src.manager, num_fewshot=num_fewshot,
                                          log_samples=log_samples, bootstrap_iters=bootstrap_iters, **kwargs)
        except AssertionError as e:  # lm-eval checks configurations with asserts (e.g. generation > context)
            raise LayerpruneError(f"lm-eval refused the run: {str(e).strip().splitlines()[0]}") from None
    if res is None:  # a non-zero rank under accelerate/torchrun: rank 0 gathers and reports
        return {"tasks": {}, "mean_acc": None, "mean_acc_over": [], "rank": int(getattr(lm, "rank", 0)),
                "config": {"tasks": names}}
    summary = summarize(res, names)
    summary["config"] = {
        "tasks": names, "num_fewshot": num_fewshot, "limit": limit, **({"limits": limits} if limits else {}),
        "limit_semantics": None if not kwargs else ("per subtask (lm-eval)" if "limit" in kwargs
                                                    else "per requested task; groups spread over subtasks"),
        "batch_size": getattr(lm, "batch_size_per_gpu", batch_size),
        "scoring": "shared-prefix" if type(lm).__name__ == "SharedPrefixHFLM" else "lm-eval",
        "data": "local" if data_dir is not None else "hub",
        "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
        "data_files": fingerprint([n for n in names if n in SPECS], data_dir, num_fewshot) if data_dir else None,
        "metric_for_mean": "acc",
        "dtype": str(getattr(lm.model, "dtype", "")).replace("torch.", ""),
        "device": str(lm.device),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "seconds_task_load": round(t_load, 2),
        "seconds_total": round(time.perf_counter() - t0, 2),
        "is_default_suite": list(names) == list(SUITE),
    }
    summary["lm_eval"] = {k: res[k] for k in ("results", "groups", "group_subtasks", "n-shot", "n-samples",
                                              "versions") if k in res}
    if log_samples:
        summary["samples"] = res.get("samples", {})
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table: task | acc ± | acc_norm ± | n; then the mean of acc."""
    lines = ["| task | acc | ± | acc_norm | ± | n |", "|---|---:|---:|---:|---:|---:|"]

    def f(x: Any) -> str:
        return "" if x is None else f"{x:.4f}"

    for name, r in summary["tasks"].items():
        label = f"{name} ({r['subtasks']} subtasks)" if r.get("kind") == "group" else name
        lines.append(f"| {label} | {f(r.get('acc'))} | {f(r.get('acc_stderr'))} | {f(r.get('acc_norm'))} | "
                     f"{f(r.get('acc_norm_stderr'))} | {r.get('n', '')} |")
    if summary.get("mean_acc") is not None:
        k = len(summary["mean_acc_over"])
        lines.append(f"| **Avg Acc** (unweighted mean of acc, {k} tasks) | {f(summary['mean_acc'])} | | | | |")
    gen = {n: r for n, r in summary["tasks"].items() if r.get("kind") == "generative"}
    if gen:  # generative tasks: exact match after lm-eval's answer extraction (not part of Avg Acc)
        lines += ["", "| generative task | exact match (strict) | ± | exact match (flexible) | ± | n |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {n} | {f(r.get('exact_match'))} | {f(r.get('exact_match_stderr'))} | "
                  f"{f(r.get('exact_match_flexible'))} | {f(r.get('exact_match_flexible_stderr'))} | {r.get('n', '')} |"
                  for n, r in gen.items()]
    return "\n".join(lines) + "\n"
