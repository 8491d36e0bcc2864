"""Reversible skipping: a cut evaluated on the loaded model equals the pruned checkpoint, and the model is
restored bit for bit."""

from __future__ import annotations

import copy

import torch

from layerprune.prune import prune_layers, skipped


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_skip_equals_pruned_and_restores_exactly(tiny):
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    cfg_before = tiny.config.to_dict()
    dense = _logits(tiny, ids)
    pruned = copy.deepcopy(tiny)
    prune_layers(pruned, [1, 3])
    want = _logits(pruned, ids)
    for _ in range(2):  # twice: the restore leaves nothing that changes a second skip
        with skipped(tiny, [1, 3]) as rec:
            assert rec.kept_layers == [0, 2, 4, 5]
            torch.testing.assert_close(_logits(tiny, ids), want, rtol=0, atol=0)
    after = tiny.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert tiny.config.to_dict() == cfg_before
    torch.testing.assert_close(_logits(tiny, ids), dense, rtol=0, atol=0)


def test_skip_restores_after_an_error(tiny):
    n = tiny.config.to_dict()
    try:
        with skipped(tiny, [0]):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert tiny.config.to_dict() == n
