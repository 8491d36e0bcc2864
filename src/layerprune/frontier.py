"""The quality–size frontier: for each metric and each k, the cut, its size, speed and a cheap quality proxy.

Everything is computed on the one loaded model, without copying it: each cut is applied with
:func:`~layerprune.prune.skipped` (the in-memory surgery, restored after) — so a cut's numbers are exactly those
of the pruned checkpoint. Quality proxy: perplexity on held-out calibration windows (drawn with the scoring
windows from the same source, never scored on) and the mean per-token KL(dense ‖ pruned) there. The dense
model's log-probabilities are computed once per batch and shared by every cut.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import parts
from .budget import Sizes, fmt_count
from .data.calibration import Calibration, CalibSpec, build_calibration
from .errors import LayerpruneError
from .metrics import make_metric
from .prune import skipped
from .scoring import score
from .select import select_one_shot


@dataclass(frozen=True)
class Cut:
    metric: str
    k: int
    removed: tuple[int, ...]
    compensation: str | None = None  # a compensation method applied through hooks (fitted per cut)


@contextlib.contextmanager
def _applied(model: nn.Module, cut: Cut, maps: dict[Cut, list[Any]]) -> Iterator[None]:
    """The cut on the loaded model: the surgery (restored after), or, with compensation, the layers skipped
    at their original positions and the fitted maps applied by hooks (what folding computes)."""
    if cut.compensation is None:
        with skipped(model, cut.removed):
            yield
        return
    from .compensation.fold import map_hooks
    from .metrics._forward import skipped as skip_one

    layers = parts(model).layers
    with contextlib.ExitStack() as stack:
        for i in cut.removed:
            stack.enter_context(skip_one(layers, i))
        stack.enter_context(map_hooks(model, layers, maps[cut]))
        yield


def split_calibration(cal: Calibration, heldout: int) -> tuple[Calibration, Calibration]:
    """(scoring windows, held-out windows): the last ``heldout`` windows are never scored on."""
    n = cal.nsamples - heldout
    if heldout < 1 or n < 1:
        raise LayerpruneError(f"need at least one scoring and one held-out window (have {cal.nsamples}, held out "
                              f"{heldout})")
    info = {**cal.info, "part": "scoring"}
    return (Calibration(cal.input_ids[:n], cal.attention_mask[:n], info),
            Calibration(cal.input_ids[n:], cal.attention_mask[n:], {**cal.info, "part": "held-out"}))


@torch.no_grad()
def _quality(model: nn.Module, held: Calibration, cuts: list[Cut], maps: dict[Cut, list[Any]], batch_size: int,
             progress: bool) -> dict[Cut | None, dict[str, float]]:
    """Held-out NLL and KL to dense for the dense model (key None) and every cut."""
    device = next(model.parameters()).device
    acc: dict[Cut | None, list[float]] = {c: [0.0, 0.0] for c in [None, *cuts]}
    count = 0
    for ids, mask in tqdm(held.batches(batch_size), desc="frontier", disable=not progress, leave=False):
        ids, mask = ids.to(device), mask.to(device)
        tgt = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        dense = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float(),
                                  -1)[valid]
        t = tgt[valid]
        acc[None][0] += float(-dense.gather(-1, t.unsqueeze(-1)).sum())
        count += int(valid.sum())
        for c in cuts:
            with _applied(model, c, maps):
                lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False)
                                       .logits[:, :-1].float(), -1)[valid]
            acc[c][0] += float(-lp.gather(-1, t.unsqueeze(-1)).sum())
            acc[c][1] += float(F.kl_div(lp, dense, log_target=True, reduction="sum"))
    return {c: {"ppl": math.exp(v[0] / max(count, 1)), "kl": v[1] / max(count, 1)} for c, v in acc.items()}


def frontier(model: nn.Module, tokenizer: Any, metrics: list[str], ks: list[int], *, calib: CalibSpec | None = None,
             heldout: int = 8, protect_first: int = 0, protect_last: int = 0, batch_size: int = 4,
             measure_speed: bool = False, measure_opts: dict[str, Any] | None = None,
             metric_options: dict[str, Any] | None = None, compensation: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score ``model`` with each metric on the scoring windows, then evaluate the cut of every k in ``ks``.

    ``compensation`` (a method of :mod:`layerprune.compensation`, e.g. ``lstsq``): each cut is also evaluated
    with its map fitted on the scoring windows (a second row per cut, with the fit errors).

    Returns ``{"dense": {...}, "rows": [{metric, k, removed, params, non_embedding_params, macs, kv_cache,
    ppl, kl[, prefill_speedup, decode_speedup]}], "calibration": ...}``. The model is unchanged afterwards.
    """
    max_k = parts(model).num_layers - 1 - protect_first - protect_last
    if not ks or any(not 1 <= k <= max_k for k in ks):
        raise LayerpruneError(f"--ks must be between 1 and {max_k} for this model (got {ks})")
    if compensation is not None:
        from .compensation.methods import make_method

        if make_method(compensation).trains:
            raise LayerpruneError(f"frontier applies training-free maps through hooks; '{compensation}' trains "
                                  "weights: use lstsq (layerprune search trains its best candidates)")
    spec = calib or CalibSpec()
    full = build_calibration(tokenizer, CalibSpec(**{**spec.to_dict(), "nsamples": spec.nsamples + heldout}))
    scoring, held = split_calibration(full, heldout)
    cuts: list[Cut] = []
    scores: dict[str, Any] = {}
    for name in metrics:
        m = make_metric(name, **(metric_options or {}))
        res = score(model, [m], scoring if m.needs_calibration else None, tokenizer=tokenizer, cache=False,
                    batch_size=batch_size, progress=progress)
        r = res.results[m.label]
        scores[m.label] = r.to_dict()
        for k in ks:
            cuts.append(Cut(m.label, k, tuple(select_one_shot(r, k, protect_first=protect_first,
                                                              protect_last=protect_last, metric=m).removed)))
    maps: dict[Cut, list[Any]] = {}
    fit_errors: dict[Cut, list[Any]] = {}
    if compensation is not None and compensation != "none":
        from .compensation.core import fit_in_memory
        from .compensation.methods import make_method

        method = make_method(compensation)
        for c in tqdm(list(cuts), desc=f"frontier: fit {compensation}", disable=not progress, leave=False):
            cc = Cut(c.metric, c.k, c.removed, compensation)
            fits = fit_in_memory(model, list(c.removed), scoring, method, batch_size=batch_size, progress=False)
            maps[cc] = [(f.block, f.site, f.tensor()) for f in fits]
            fit_errors[cc] = [f.describe(parts(model).adapter) for f in fits]
            cuts.append(cc)
    quality = _quality(model, held, cuts, maps, batch_size, progress)
    sizes = Sizes.of(model)
    speed: dict[int, dict[str, float]] = {}
    if measure_speed:
        from .budget import speedup_value, time_model

        d = time_model(model, measure_opts or {})
        for c in cuts:
            if c.k not in speed and c.compensation is None:  # uniform layers: the speed of a cut depends on its size, measured once per k
                with skipped(model, c.removed):
                    t = time_model(model, measure_opts or {})
                speed[c.k] = {"prefill_speedup": speedup_value("prefill_speedup", d, t),
                              "decode_speedup": speedup_value("decode_speedup", d, t)}
    rows = [{"metric": c.metric, "k": c.k, "removed": list(c.removed), "compensation": c.compensation,
             **sizes.after(list(c.removed)), **quality[c], **speed.get(c.k, {}),
             **({"fits": fit_errors[c]} if c in fit_errors else {})} for c in cuts]
    return {"dense": {**sizes.after([]), **quality[None]}, "rows": rows, "scores": scores,
            "calibration": {"scoring": scoring.describe(), "heldout": held.describe()},
            "protect_first": protect_first, "protect_last": protect_last}


def markdown(result: dict[str, Any]) -> str:
    """The frontier as a table: one row per (metric, k), dense first."""
    speed = any("decode_speedup" in r for r in result["rows"])
    head = "| metric | k | removed | params | MACs/token | held-out PPL | KL to dense |" + \
        (" prefill × | decode × |" if speed else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    d = result["dense"]
    lines.append(f"| dense | 0 | – | {fmt_count(d['params'])} | {fmt_count(d['macs'])} | {d['ppl']:.2f} | 0 |"
                 + (" 1.00 | 1.00 |" if speed else ""))
    for r in result["rows"]:
        name = r["metric"] + (f" + {r['compensation']}" if r.get("compensation") else "")
        lines.append(f"| {name} | {r['k']} | {r['removed']} | {fmt_count(r['params'])} | "
                     f"{fmt_count(r['macs'])} | {r['ppl']:.2f} | {r['kl']:.4f} |"
                     + (f" {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} |" if speed else ""))
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """frontier.png, frontier.md and frontier.json into ``out_dir`` (each file atomically; the json last, so a
    killed write never leaves a frontier.json that blocks the re-run without its plot)."""
    from .io import check_results_target, write_results
    from .plots import plot_frontier

    out = Path(out_dir)
    check_results_target(out, "frontier", overwrite)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_frontier(result, out / "frontier.png")
    path = write_results(out, "frontier", result, f"# Quality–size frontier\n\n{markdown(result)}", overwrite)
    return {"json": path, **({"png": png} if png else {})}


__all__ = ["frontier", "markdown", "split_calibration", "write"]
