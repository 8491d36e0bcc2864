"""A short real run: SmolLM2-135M-Instruct with 25% of its layers removed, healed by partial fine-tuning on the
offline Alpaca sample; the validation loss must drop."""

from __future__ import annotations

import json

import pytest
import torch

from layerprune.arch import parts
from layerprune.healing import heal
from layerprune.models import load_model
from layerprune.prune import prune_checkpoint


@pytest.mark.slow
@pytest.mark.smollm2
def test_partial_heal_lowers_validation_loss(tmp_path, smollm2_path, data_dir):
    prune_checkpoint(str(smollm2_path), tmp_path / "pruned", tail=8)  # 30 -> 22 layers (25%)
    r = heal(tmp_path / "pruned", tmp_path / "healed", method="partial", layers="last3", data="alpaca",
             data_dir=str(data_dir), max_steps=24, batch_size=4, micro_batch_size=4, cutoff_len=128, lr=5e-5,
             warmup_steps=0, eval_steps=12, val_size=16, max_train_samples=256, progress=False)
    print(f"validation loss {r['val_loss_before']:.4f} -> {r['final_val_loss']:.4f}, {r['tokens_per_s']:.0f} tokens/s")
    assert r["final_val_loss"] < r["val_loss_before"] - 0.05, r
    assert r["steps"] == 24 and r["method_info"]["untied"] is True
    healed = load_model(tmp_path / "healed", dtype=torch.float32)
    p = parts(healed)
    assert not p.tied and len(p.layers) == 22
    original = load_model(smollm2_path, dtype=torch.float32)
    # The input embeddings are frozen; the untied head was trained away from them.
    assert torch.equal(p.embed.weight, parts(original).embed.weight)
    assert not torch.equal(p.head.weight, p.embed.weight)
    manifest = json.loads((tmp_path / "healed" / "layerprune.json").read_text())
    assert manifest["removed_layers"] == list(range(22, 30)) and manifest["heal"]["method"] == "partial"
