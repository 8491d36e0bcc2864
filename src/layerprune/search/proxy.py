"""Search stage 2, the proxy (no training): held-out KL(dense ‖ cut) and perplexity of every candidate, with
and without a training-free compensation map, on the one loaded model.

The dense model's input to every layer is captured once on the held-out windows; a cut is then evaluated from
its first changed layer on (the layers before it compute exactly what the dense model did), with removed
layers skipped and compensation maps applied by hooks — what folding computes. The held-out windows are
disjoint from every scoring and fitting window.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..arch import parts
from ..compensation.fold import map_hooks
from ..data.calibration import Calibration
from ..errors import LayerpruneError
from ..metrics._forward import (
    HEAD_CHUNK,
    StopForward,
    call_layer,
    capture,
    finish_fn,
    layer_hooks,
    layer_output,
    run_until_layers_done,
    target_mask,
)

DENSE_CACHE_BYTES = 1 << 30  # dense log-probs kept in memory up to this size, else recomputed per cut


class Proxy:
    """Held-out quality of cuts of ``model`` relative to the dense model (see the module docstring)."""

    @torch.no_grad()
    def __init__(self, model: Any, held: Calibration, batch_size: int):
        self.model = model
        self.layers = parts(model).layers
        self.batches = held.batches(batch_size)
        self.cap = capture(model, self.batches)
        self.finish = finish_fn(model)
        self.valid = [target_mask(mask) for _, mask in self.batches]
        self.targets = [ids[:, 1:][v] for (ids, _), v in zip(self.batches, self.valid)]
        self.tokens = sum(int(v.sum()) for v in self.valid)
        vocab = int(parts(model).head.weight.shape[0])
        self._dense: list[list[torch.Tensor]] | None = None
        if self.tokens * vocab * 4 <= DENSE_CACHE_BYTES:
            self._dense = [list(self._chunks(self.cap.final[b], b)) for b in range(len(self.batches))]
        self.dense = self._score(lambda b: self.cap.final[b])

    def _chunks(self, hidden: torch.Tensor, b: int, finish: Any = None) -> Any:
        """Log-probs at the valid positions of batch ``b``, HEAD_CHUNK tokens at a time (``finish``: the head
        of the model ``hidden`` came from; default the dense model's)."""
        finish = finish or self.finish
        h = hidden[:, :-1][self.valid[b].to(hidden.device)]
        for i in range(0, h.shape[0], HEAD_CHUNK):
            yield torch.log_softmax(finish(h[i:i + HEAD_CHUNK]).float(), -1).cpu()

    def _dense_chunks(self, b: int) -> Any:
        # Always the dense model's own head: a probed model's trained norm/head never touches the reference.
        return iter(self._dense[b]) if self._dense is not None else self._chunks(self.cap.final[b], b)

    @torch.no_grad()
    def _score(self, final: Any, upto: int | None = None, finish: Any = None) -> dict[str, float]:
        nll = kl = 0.0
        count = 0
        for b in range(upto or len(self.batches)):
            count += int(self.valid[b].sum())
            t = self.targets[b]
            i = 0
            for lp, dense in zip(self._chunks(final(b), b, finish), self._dense_chunks(b)):
                y = t[i:i + lp.shape[0]]
                i += lp.shape[0]
                nll += float(-lp.gather(-1, y.unsqueeze(-1)).sum())
                kl += float(F.kl_div(lp, dense, log_target=True, reduction="sum"))
        return {"kl": kl / count, "ppl": math.exp(nll / count), "tokens": count}

    @torch.no_grad()
    def cut(self, removed: list[int] | tuple[int, ...], maps: list[Any] | None = None, upto: int | None = None
            ) -> dict[str, float]:
        """KL and perplexity of the dense model without ``removed`` (maps: compensation applied by hooks), on
        all held-out batches or the first ``upto``."""
        rem = set(removed)
        folds = [int(block.fold_layer) for block, _, _ in maps or [] if block.fold_layer is not None]
        start = min([*rem, *folds])
        n = len(self.layers)

        def final(b: int) -> torch.Tensor:
            h = self.cap.inputs[start][b]
            for i in range(start, n):
                if i not in rem:
                    h = call_layer(self.layers[i], h, self.cap.calls[i][b])
            return h

        with map_hooks(self.model, self.layers, list(maps or [])):
            return self._score(final, upto)

    @torch.no_grad()
    def other(self, model: Any) -> dict[str, float]:
        """KL and perplexity of another model with the same tokenizer (a healed probe), by a full forward."""
        if int(parts(model).head.weight.shape[0]) != int(parts(self.model).head.weight.shape[0]):
            raise LayerpruneError("the probed model's vocabulary differs from the dense model's")
        layers = parts(model).layers
        last: list[torch.Tensor] = []

        def hook(pos: int, args: tuple, kwargs: dict, out: Any) -> None:
            if pos == len(layers) - 1:
                last.append(layer_output(out).detach())
                raise StopForward

        with layer_hooks(layers, hook):
            for ids, mask in self.batches:
                run_until_layers_done(model, ids, mask)
        return self._score(lambda b: last[b], finish=finish_fn(model))


FIT_CAPTURE_BYTES = 2 << 30  # the fitting windows' dense pass is recorded once up to this size


class FitCapture:
    """The dense pass over the fitting windows, recorded once at every layer: each candidate's fit reads its
    dense side from it (:meth:`recording`) and only runs its own pruned stream."""

    def __init__(self, model: Any, fit: Calibration, batch_size: int):
        self.batches = fit.batches(batch_size)
        self.cap = capture(model, self.batches)

    @staticmethod
    def fits_in_memory(model: Any, fit: Calibration) -> bool:
        p = parts(model)
        return (p.num_layers + 1) * fit.input_ids.numel() * int(p.embed.weight.shape[1]) * 4 <= FIT_CAPTURE_BYTES

    def recording(self, removed: list[int]) -> Any:
        """A :class:`~layerprune.compensation.stream.Recorded` for the cut ``removed``: from its first fold layer,
        with the dense output at each block's end."""
        from ..compensation.plan import plan_blocks
        from ..compensation.stream import Recorded
        from ..metrics.layerwise import Prepared

        n = len(self.cap.inputs)
        blocks = plan_blocks(removed, n)
        begin = blocks[0].start
        ends = {b.end: self.cap.inputs[b.end + 1] if b.end + 1 < n else self.cap.final for b in blocks}
        return Recorded(Prepared(self.batches, self.cap.inputs[0], self.cap.calls), begin, self.cap.inputs[begin],
                        ends)


def fit_maps(model: Any, removed: list[int], fit: Calibration, method: Any, batch_size: int,
             shared: FitCapture | None = None) -> tuple[list[Any] | None, Any]:
    """(maps for :meth:`Proxy.cut`, the fits) — or (None, why) when this cut cannot be compensated (a block at
    layer 0 of a tied model, an architecture without a fold point): the candidate stays, uncompensated.
    ``shared``: the fitting windows' recorded dense pass."""
    from ..compensation.core import fit_in_memory

    try:
        fits = fit_in_memory(model, list(removed), fit, method, batch_size=batch_size, progress=False,
                             rec=shared.recording(list(removed)) if shared is not None else None)
    except LayerpruneError as e:
        return None, str(e)
    return [(f.block, f.site, f.tensor()) for f in fits], fits


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by their best proxy KL (compensated or not), each given ``proxy_rank`` (1 = best)."""
    full = max(r["best"]["tokens"] for r in rows)
    # Candidates the successive halving dropped early rank after every fully evaluated one.
    ordered = sorted(rows, key=lambda r: (r["best"]["tokens"] < full, r["best"]["kl"]))
    for i, r in enumerate(ordered):
        r["proxy_rank"] = i + 1
    return ordered


def evaluate_all(proxy: Proxy, cands: list[Any], progress: bool, keep: int = 6) -> list[dict[str, Any]]:
    """The uncompensated proxy of every candidate, by successive halving: all of them on the first held-out
    batch, then the best ``keep`` (and at least a quarter) on all of them; the rest keep their partial numbers
    (``plain.tokens`` says on how many tokens)."""
    nb = len(proxy.batches)
    first = 1
    rows = []
    for c in tqdm(cands, desc="search: proxy", disable=not progress, leave=False):
        rows.append({**c.to_dict(), "plain": proxy.cut(c.removed, upto=first), "compensated": None})
    if first < nb:
        top = sorted(rows, key=lambda r: r["plain"]["kl"])[:max(keep, len(rows) // 4)]
        top += [r for r in rows if "reverse" in r["sources"] and r not in top]  # the baseline, always in full
        for r in tqdm(top, desc="search: proxy (all held-out)", disable=not progress, leave=False):
            r["plain"] = proxy.cut(r["removed"])
    for r in rows:
        r["best"] = {**r["plain"], "compensated": False}
    return rows


__all__ = ["FitCapture", "Proxy", "evaluate_all", "fit_maps", "rank"]
