"""Selection: k lowest, protection, contiguous blocks for angular, ratio -> k, iterative (SLEB-style)."""

from __future__ import annotations

import copy

import pytest
import torch

from layerprune.arch import parts
from layerprune.errors import LayerpruneError
from layerprune.metrics import MetricResult, remove_one_nll_naive
from layerprune.pipeline import iterative_prune
from layerprune.prune import prune_layers
from layerprune.scoring import score
from layerprune.select import protected_layers, resolve_k, select_layers, select_one_shot
from test_metrics import calib, zero_residual

from conftest import make_tiny


def test_resolve_k():
    assert resolve_k(32, ratio=0.25) == 8
    assert resolve_k(30, ratio=0.25) == 7  # floor: never more than the ratio asks
    assert resolve_k(26, ratio=0.25) == 6  # the paper's 6 of Gemma2's 26
    assert resolve_k(10, k=3) == 3
    for kw in ({"k": 0}, {"k": 10}, {"ratio": 0.0}, {"ratio": 1.0}, {"ratio": 0.01}, {}, {"k": 2, "ratio": 0.5}):
        with pytest.raises(LayerpruneError):
            resolve_k(10, **kw)


def test_k_lowest_with_ties_and_protection():
    r = MetricResult("bi", [0.5, 0.1, 0.3, 0.1, 0.9, 0.2])
    assert r.removal_order() == [1, 3, 5, 2, 0, 4]
    assert select_layers(r, 2) == [1, 3]
    assert select_layers(r, 3) == [1, 3, 5]
    assert protected_layers(6, 2, 1) == {0, 1, 5}
    assert select_layers(r, 2, protect_first=2, protect_last=1) == [2, 3]
    with pytest.raises(LayerpruneError, match="not protected"):
        select_layers(r, 3, protect_first=3, protect_last=1)


def test_protection_does_not_apply_to_reverse_and_random():
    r = MetricResult("reverse", [6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    assert select_layers(r, 2, protect_last=2) == [4, 5]


def test_scores_of_removed_layers_are_none_and_never_selected():
    r = MetricResult("bi", [0.5, None, 0.3, None, 0.9, 0.2])
    assert r.kept == [0, 2, 4, 5]
    assert select_layers(r, 2) == [2, 5]


def test_angular_selects_best_contiguous_block():
    blocks = {2: [0.4, 0.3, 0.05, 0.2, 0.01, None]}  # d(start, 2); start 4 covers layers 4,5
    r = MetricResult("angular", [0.1] * 6, block_scores=blocks)
    assert select_layers(r, 2) == [4, 5]
    assert select_layers(r, 2, protect_last=1) == [2, 3]
    # In a pruned model contiguity is in the current order: kept [0,1,3,4,5], start 1 = layers 1 and 3.
    r2 = MetricResult("angular", [0.1, 0.1, None, 0.1, 0.1, 0.1], block_scores={2: [0.5, 0.01, None, 0.3, 0.4, None]})
    assert select_layers(r2, 2) == [1, 3]


def test_angular_finds_an_identity_block_in_a_model():
    model = make_tiny("llama")
    for i in (3, 4):
        zero_residual(parts(model).layers[i])
    res = score(model, ["angular"], calib(), progress=False)["angular"]
    assert res.block_scores[2][3] == 0.0
    assert select_layers(res, 2) == [3, 4]
    assert select_one_shot(res, 2).removed == [3, 4]


def test_iterative_magnitude_equals_one_shot():
    """Magnitude of a layer does not depend on the others, so re-scoring cannot change the choice."""
    model = make_tiny("qwen2", num_hidden_layers=8)
    one = select_layers(score(model, ["magnitude"], None, progress=False)["magnitude"], 3)
    seen = []
    rec, sel = iterative_prune(model, "magnitude", 3, step=1, progress=False,
                               on_step=lambda m, st, kept: seen.append((st.removed, kept, parts(m).num_layers)))
    assert sel.removed == rec.removed_layers == one
    assert len(sel.steps) == 3 and [s[2] for s in seen] == [7, 6, 5]
    assert seen[-1][1] == rec.kept_layers == [i for i in range(8) if i not in one]
    assert model.config.num_hidden_layers == 5


def test_iterative_reverse_is_the_tail_and_steps_are_sized():
    model = make_tiny("llama")
    rec, sel = iterative_prune(model, "reverse", 3, step=2, progress=False)
    assert rec.removed_layers == [3, 4, 5] and [s.removed for s in sel.steps] == [[4, 5], [3]]
    assert sel.order == [5, 4, 3]


def test_iterative_ppl_equals_a_manual_sleb_loop():
    model = make_tiny("llama")
    cal = calib(n=3)
    ref = copy.deepcopy(model)
    kept = list(range(6))
    manual = []
    for _ in range(2):  # SLEB: remove the layer whose removal hurts least, re-score, repeat
        nll, _, _, _ = remove_one_nll_naive(ref, cal, progress=False)
        pos = min(range(len(nll)), key=lambda i: (nll[i], i))
        manual.append(kept.pop(pos))
        prune_layers(ref, [pos])
    rec, sel = iterative_prune(model, "ppl", 2, step=1, calib=cal, progress=False)
    assert sel.order == manual and rec.removed_layers == sorted(manual)
    # Step 2 scored the pruned model: the removed layer has no score, the others are indexed as original.
    assert sel.steps[1].result.scores[manual[0]] is None
    with torch.no_grad():
        x = cal.input_ids
        assert torch.allclose(model(input_ids=x).logits, ref(input_ids=x).logits)


def test_iterative_bad_step():
    with pytest.raises(LayerpruneError, match="--step"):
        iterative_prune(make_tiny("llama"), "reverse", 2, step=0, progress=False)
