"""Core proofs 1-3 on the real SmolLM2-135M-Instruct (30 layers, tied embeddings)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune.arch import parts
from layerprune.models import build_manifest, load, save_pruned
from layerprune.prune import prune_layers
from test_surgery import _logits, _skip_hooks

pytestmark = pytest.mark.smollm2
REMOVE = [5, 11, 23, 24, 25, 26, 27, 28]


def test_smollm2_prune_skip_generate_reload(smollm2_path, tmp_path):
    model, tok = load(smollm2_path, dtype="float32")
    assert parts(model).tied and parts(model).num_layers == 30
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    hooks = _skip_hooks(model, REMOVE)
    expected = _logits(model, ids)
    for h in hooks:
        h.remove()
    rec = prune_layers(model, REMOVE)
    got = _logits(model, ids)
    assert torch.equal(got, expected)

    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        a = model.generate(ids, use_cache=True, **kw)
        b = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(a, b)

    save_pruned(model, tok, tmp_path / "out", build_manifest(str(smollm2_path), rec))
    re, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert parts(re).tied and parts(re).num_layers == 22
    assert torch.equal(_logits(re.eval(), ids), got)
