"""Efficiency measurement: analytic MACs vs the profiler, pruning arithmetic, params, the bench itself."""

from __future__ import annotations

import json

import pytest
import torch

from layerprune.measurement import (
    _inputs,
    analytic_macs,
    bench_speed,
    decode_macs,
    markdown,
    measure,
    param_counts,
    profiled_macs,
    speedup,
    weight_bytes,
)
from layerprune.prune import prune_layers

from conftest import ARCHS, make_tiny, tiny_tokenizer

# GQA with a head_dim that is not hidden/heads, and biases on q/k/v (qwen2), per the three configs.
VARIANTS = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "qwen2": dict(num_key_value_heads=2),
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("seq_len", [1, 24, 96])
def test_analytic_macs_match_profiler(arch, seq_len):
    model = make_tiny(arch, **VARIANTS[arch])
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    an = analytic_macs(model.config, seq_len)["total"]
    pr = profiled_macs(model, seq_len)
    assert abs(an - pr) / pr < 0.01, (an, pr)


@pytest.mark.parametrize("arch", ARCHS)
def test_analytic_macs_all_tested_architectures(arch):
    model = make_tiny(arch)
    an, pr = analytic_macs(model.config, 24, batch=2)["total"], profiled_macs(model, 24, batch=2)
    assert abs(an - pr) / pr < 0.01


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_pruning_reduces_layer_macs_by_k_over_l(arch):
    model = make_tiny(arch)
    L, T = model.config.num_hidden_layers, 32
    dense = analytic_macs(model.config, T)
    dense_prof = profiled_macs(model, T)
    remove = [1, 4]
    prune_layers(model, remove)
    pruned = analytic_macs(model.config, T)
    k = len(remove)
    assert pruned["layers"] * L == dense["layers"] * (L - k)  # exact integer arithmetic
    assert pruned["lm_head"] == dense["lm_head"] and pruned["per_layer"] == dense["per_layer"]
    assert dense_prof - profiled_macs(model, T) == k * dense["per_layer"]


def test_param_counts_consistent_and_pruning():
    model = make_tiny("llama")
    p = param_counts(model)
    assert p["total"] == p["embedding"] + p["head"] + p["non_embedding"]
    per_layer = sum(x.numel() for x in model.model.layers[0].parameters())
    prune_layers(model, [0, 5])
    q = param_counts(model)
    assert p["non_embedding"] - q["non_embedding"] == 2 * per_layer
    assert q["embedding"] == p["embedding"] and q["head"] == p["head"]
    tied = param_counts(make_tiny("gemma2"))
    assert tied["head"] == 0  # tied head counted once, as embedding
    assert weight_bytes(model) >= 4 * q["total"]


def test_smollm2_config_macs(smollm2_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(smollm2_path)
    cfg.num_hidden_layers = 2  # the real shapes (GQA 9/3, head_dim 64, vocab 49152); two layers keep it quick
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    an, pr = analytic_macs(cfg, 64)["total"], profiled_macs(model, 64)
    assert abs(an - pr) / pr < 0.01
    full = analytic_macs(AutoConfig.from_pretrained(smollm2_path), 64)
    assert full["lm_head"] == 64 * 576 * 49152
    assert decode_macs(cfg, 10) < analytic_macs(cfg, 1)["total"] + 2 * 9 * 11 * 64 * 2


def test_bench_speed_fixed_decode_length():
    model = make_tiny("llama")
    r = bench_speed(model, seq_len=8, batch=2, new_tokens=5, warmup=1, repeats=3, progress=False)
    for key in ("prefill_seconds", "generate_seconds"):
        s = r[key]
        assert s["n"] == 3 and 0 < s["min"] <= s["median"] <= s["max"]
    assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    assert r["prefill_peak_memory_bytes"] > 0 and r["memory_method"].startswith("sampled RSS")
    # Fixed decode length: make the first greedy token EOS, so an unforced generate stops after one token;
    # the bench still decodes all of them (it raises if generate returns fewer).
    ids = _inputs(model, 1, 4)
    first = int(model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)[0, -1])
    model.generation_config.eos_token_id = first
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] == 5
    bench_speed(model, seq_len=4, batch=1, new_tokens=3, warmup=0, repeats=1, progress=False)


def test_measure_and_speedup_bound():
    dense = make_tiny("qwen2")
    pruned = make_tiny("qwen2")
    prune_layers(pruned, [2, 3, 4])
    kw = dict(seq_len=8, batches=(1,), new_tokens=4, warmup=1, repeats=2, progress=False)
    d, p = measure(dense, **kw), measure(pruned, **kw)
    sp = speedup(d, p)
    assert sp["analytic_bound_prefill"] == pytest.approx(d["macs"]["total"] / p["macs"]["total"])
    assert 1 < sp["analytic_bound_prefill"] < 2
    row = sp["per_batch"][0]
    assert row["prefill_ratio_to_bound"] == pytest.approx(row["prefill_speedup"] / row["prefill_bound"])
    md = markdown(p, d, sp)
    assert "MACs (8 tokens)" in md and "ratio" in md
    json.dumps({"d": d, "p": p, "sp": sp})


def test_cli_bench_compare(tmp_path):
    from layerprune.cli import main

    dense_dir, pruned_dir = tmp_path / "dense", tmp_path / "pruned"
    model = make_tiny("llama")
    model.save_pretrained(dense_dir)
    prune_layers(model, [4, 5])
    model.save_pretrained(pruned_dir)
    for d in (dense_dir, pruned_dir):
        tiny_tokenizer().save_pretrained(d)
    out = tmp_path / "b"
    rc = main(["bench", str(pruned_dir), "--compare", str(dense_dir), "--seqlen", "8", "--batch", "1",
               "--new-tokens", "3", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["result"]["num_layers"] == 4 and data["dense"]["num_layers"] == 6
    assert data["speedup"]["analytic_bound_prefill"] > 1
    assert "speedup" in (out / "bench.md").read_text()
    assert torch.get_num_threads() >= 1
