"""Padding-free (packed) micro-batches and the frozen-prefix cache: the collator, the model check, equality with
padded and uncached training, and when each is (not) used."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from layerprune.arch import parts
from layerprune.data.instruct import (
    IGNORE_INDEX,
    PackCollator,
    PadCollator,
    build_instruct_data,
    model_inputs,
)
from layerprune.errors import LayerpruneError
from layerprune.healing import heal
from layerprune.healing.train import HealTrainer, packing_problem

from conftest import FAST, ROWS, make_tiny, save_tiny, tiny_tokenizer

FEATURES = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
            {"input_ids": [9, 10, 11], "labels": [9, 10, 11]}]


def assert_same_weights(a_dir, b_dir, src) -> None:
    """Two runs trained alike: each tensor differs by at most 2% of its update. Adam's first steps move every
    weight by about lr whatever its gradient's size, so a rounding-level gradient difference shows as a small
    fraction of the update, never as a different update."""
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    s = load_file(src / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        update = (b[k] - s[k]).abs().max() if k in s else b[k].abs().max()
        assert (a[k] - b[k]).abs().max() <= 0.02 * update + 1e-7, k


def test_pack_collator_concatenates_and_restarts_positions():
    b = PackCollator()(FEATURES)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # The first label of every sample is ignored: position 3 (sample 1's last token) must not predict token 9.
    assert b["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, 11]]
    assert b["attention_mask"].tolist() == [[1] * 7]  # for the Trainer's token count only ...
    assert "attention_mask" not in model_inputs(b) and "labels" not in model_inputs(b)  # ... never for the model
    padded = PadCollator(0)(FEATURES)
    assert set(model_inputs(padded)) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2", "gpt2"])
def test_packed_loss_and_gradients_equal_padded(tmp_path, arch):
    """Same samples, packed or padded: the response-only loss and every gradient agree."""
    model = make_tiny(arch)
    model.eval()  # no dropout, so both passes see the same function
    data = build_instruct_data(tiny_tokenizer(), rows=ROWS, val_size=4)
    rows = data.train[:4]
    trainer = HealTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                          head=parts(model).head)
    results = []
    for batch in (PadCollator(0)(rows), PackCollator()(rows)):
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l_pad, g_pad), (l_pack, g_pack) = results
    assert torch.allclose(l_pad, l_pack, rtol=1e-5)
    assert g_pad.keys() == g_pack.keys() and g_pad
    for n in g_pad:
        assert torch.allclose(g_pad[n], g_pack[n], rtol=1e-4, atol=1e-6), n


def test_probe_accepts_models_that_keep_samples_apart_and_rejects_others():
    rows = [{"input_ids": list(range(3, 17)), "labels": list(range(3, 17))},
            {"input_ids": list(range(20, 34)), "labels": list(range(20, 34))}]
    assert packing_problem(make_tiny("llama"), rows, 0) is None
    # OPT derives positions from the attention mask and ignores position_ids: packing would be wrong.
    assert "samples are not kept apart" in packing_problem(make_tiny("opt"), rows, 0)
    assert "fewer than two" in packing_problem(make_tiny("llama"), rows[:1], 0)

    class NoPositions(torch.nn.Module):  # a model whose forward takes no position_ids
        def __init__(self):
            super().__init__()
            self.inner = make_tiny("llama")

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    assert "rejected packed inputs (TypeError" in packing_problem(NoPositions(), rows, 0)


def test_heal_packs_by_default_and_matches_a_padded_run(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "llama")
    opts = dict(FAST, method="partial", data=str(data_file), max_steps=3, lr=3e-3)
    packed = heal(src, tmp_path / "packed", **opts)
    padded = heal(src, tmp_path / "padded", packing=False, **opts)
    assert packed["packing"]["used"] and not padded["packing"]["used"]
    assert packed["tokens_trained"] == padded["tokens_trained"]  # non-padding tokens counted the same way
    assert packed["val_loss_before"] == pytest.approx(padded["val_loss_before"], rel=1e-5)
    losses = [[e["loss"] for e in r["log_history"] if "loss" in e] for r in (packed, padded)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert_same_weights(tmp_path / "packed", tmp_path / "padded", src)


def test_heal_falls_back_or_refuses_where_packing_is_wrong(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "opt")
    opts = dict(FAST, method="partial", data=str(data_file), max_steps=1)
    r = heal(src, tmp_path / "auto", **opts)
    assert not r["packing"]["used"] and "samples are not kept apart" in r["packing"]["why"]
    with pytest.raises(LayerpruneError, match="--packing: packed and padded logits differ .* use --no-packing"):
        heal(src, tmp_path / "forced", packing=True, **opts)
    assert not (tmp_path / "forced").exists()
    big = heal(save_tiny(tmp_path / "src2", "llama"), tmp_path / "big", **{**opts, "cutoff_len": 8192})
    assert not big["packing"]["used"] and "8192" in big["packing"]["why"]


# ---------------------------------------------------------------------------------------- frozen-prefix cache

EPOCHS = dict(FAST, method="partial", max_steps=None, epochs=3, max_train_samples=8, lr=3e-3, eval_steps=2)


def test_prefix_cache_skips_the_frozen_layers_after_epoch_one_with_the_same_result(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "llama")
    cached = heal(src, tmp_path / "cached", data=str(data_file), **EPOCHS)
    plain = heal(src, tmp_path / "plain", data=str(data_file), prefix_cache_gb=0, **EPOCHS)
    pc = cached["prefix_cache"]
    # 8 samples, micro-batch 2: 4 micro-batches per epoch; epoch 1 computes, epochs 2 and 3 replay.
    assert pc["used"] and pc["samples"] == 8 and pc["micro_batches_computed"] == 4
    assert pc["micro_batches_replayed"] == 8 and not pc["budget_reached"]
    assert plain["prefix_cache"] == {"used": False, "why": "off (budget 0)"}
    losses = [[e["loss"] for e in r["log_history"] if "loss" in e] for r in (cached, plain)]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert_same_weights(tmp_path / "cached", tmp_path / "plain", src)


def test_prefix_cache_replay_does_no_prefix_compute():
    """In replay the frozen layers' own computation does not run; the logits are unchanged; the budget holds."""
    from layerprune.healing.prefix_cache import PrefixCache

    model = make_tiny("llama")
    inner = []
    for layer in model.model.layers[:3]:
        layer.mlp.register_forward_hook(lambda *a: inner.append(1))
    cache = PrefixCache(list(model.model.layers[:3]), 1 << 20)
    batch = PackCollator()([{"input_ids": list(range(3, 9)), "labels": list(range(3, 9)), "index": 0},
                            {"input_ids": list(range(9, 13)), "labels": list(range(9, 13)), "index": 1}])
    assert batch["sample_index"].tolist() == [0, 1]
    with torch.no_grad():
        with cache.batch(batch):
            first = model(**model_inputs(batch)).logits
        assert len(inner) == 3 and sorted(cache.store) == [0, 1] and cache.store[0].shape == (6, 32)
        with cache.batch(batch):
            second = model(**model_inputs(batch)).logits
    assert len(inner) == 3  # nothing below the first trained layer ran again
    assert torch.equal(first, second) and (cache.computed, cache.replayed) == (1, 1)

    other = make_tiny("llama")
    small = PrefixCache(list(other.model.layers[:3]), 6 * 32 * 4)  # room for sample 0 only
    with torch.no_grad(), small.batch(batch):
        other(**model_inputs(batch))
    assert list(small.store) == [0] and small.full


@pytest.mark.parametrize("opts,why", [
    (dict(method="lora"), "no frozen prefix"),
    (dict(method="partial", layers="all"), "no frozen prefix"),
    (dict(packing=False), "needs packed micro-batches"),
    (dict(epochs=1), "within one epoch"),
    (dict(max_steps=2), "within one epoch"),
    (dict(prefix_cache_gb=1e-6), "more than the budget"),  # 8 samples x ~20 tokens x 32 x 4 B > 1 KiB
])
def test_prefix_cache_is_not_used_where_it_cannot_help(tmp_path, data_file, opts, why):
    src = save_tiny(tmp_path / "src", "llama")
    r = heal(src, tmp_path / "out", data=str(data_file), **{**EPOCHS, "epochs": 2, **opts})
    assert not r["prefix_cache"]["used"] and why in r["prefix_cache"]["why"]


def test_prefix_cache_refuses_a_random_prefix(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "gpt2")  # GPT-2 layers have dropout
    r = heal(src, tmp_path / "out", data=str(data_file), **{**EPOCHS, "epochs": 2})
    assert not r["prefix_cache"]["used"] and "dropout" in r["prefix_cache"]["why"]


def test_prefix_cache_survives_a_resume(tmp_path, data_file):
    """Killed in epoch 2, resumed with an empty cache (it records again): the same result as uninterrupted."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                raise RuntimeError("killed")

    src = save_tiny(tmp_path / "src", "llama")
    opts = dict(EPOCHS, data=str(data_file))
    full = heal(src, tmp_path / "a", **opts)
    with pytest.raises(RuntimeError, match="killed"):
        heal(src, tmp_path / "b", callbacks=[Kill()], **opts)
    resumed = heal(src, tmp_path / "b", resume=True, **opts)
    assert resumed["steps"] == full["steps"] == 6 and resumed["prefix_cache"]["used"]
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-5)
    assert_same_weights(tmp_path / "b", tmp_path / "a", src)
