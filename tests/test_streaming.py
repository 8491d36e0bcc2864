"""Streaming checkpoint pruning equals the in-memory path tensor for tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from layerprune.errors import LayerpruneError
from layerprune.prune import prune_checkpoint, prune_checkpoint_streaming
from layerprune.prune.streaming import INDEX_FILE

from conftest import make_tiny, tiny_tokenizer


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def _save(arch, folder, shard=None):
    model = make_tiny(arch)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kw)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch,shard", [("llama", None), ("gemma2", None), ("gpt2", None), ("opt", None),
                                        ("gpt_neox", None), ("qwen2", "40KB"), ("gemma3_text", "30KB")])
def test_streaming_equals_in_memory(arch, shard, tmp_path):
    src = _save(arch, tmp_path / "src", shard)
    if shard:
        assert (src / INDEX_FILE).is_file()
    remove = [0, 2, 3]
    prune_checkpoint(src, tmp_path / "mem", remove=remove)
    prune_checkpoint(src, tmp_path / "str", remove=remove, streaming=True)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cm = json.loads((tmp_path / "mem" / "config.json").read_text())
    cs = json.loads((tmp_path / "str" / "config.json").read_text())
    for k in ("num_hidden_layers", "n_layer", "layer_types", "max_window_layers"):
        assert cm.get(k) == cs.get(k), k
    assert (tmp_path / "str" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    ms = json.loads((tmp_path / "str" / "layerprune.json").read_text())
    mm = json.loads((tmp_path / "mem" / "layerprune.json").read_text())
    assert ms["kept_layers"] == mm["kept_layers"] == [1, 4, 5]
    assert ms["params_after"] == mm["params_after"] < ms["params_before"]
    if shard:
        index = json.loads((tmp_path / "str" / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(b)
        for f in index["weight_map"].values():
            assert (tmp_path / "str" / f).is_file()


def test_streaming_dtype_conversion_matches(tmp_path):
    src = _save("llama", tmp_path / "src")
    prune_checkpoint(src, tmp_path / "mem", remove=[5], dtype="bfloat16")
    prune_checkpoint(src, tmp_path / "str", remove=[5], dtype="bfloat16", streaming=True)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert set(a) == set(b) and all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def test_streaming_refuses_corrupt_and_partial(tmp_path):
    src = _save("llama", tmp_path / "src")
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # a partial download
    with pytest.raises(LayerpruneError, match="corrupt or partial"):
        prune_checkpoint_streaming(src, [1], tmp_path / "o")
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(LayerpruneError, match="corrupt"):
        prune_checkpoint_streaming(src, [1], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_streaming_refuses_existing_output_and_unsupported(tmp_path):
    src = _save("llama", tmp_path / "src")
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(LayerpruneError, match="not empty"):
        prune_checkpoint_streaming(src, [1], out)
    prune_checkpoint_streaming(src, [1], out, overwrite=True)
    assert not (out / "x").exists() and (out / "model.safetensors").is_file()
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mamba_like_thing"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LayerpruneError, match="unsupported architecture 'mamba_like_thing'.*llama"):
        prune_checkpoint_streaming(src, [1], tmp_path / "o2")


def test_generic_fallback_architecture_streams_like_in_memory(tmp_path):
    """An unregistered model type (BERT as a causal LM) is handled by structural discovery in both paths."""
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                     vocab_size=64, is_decoder=True)
    BertLMHeadModel(cfg).save_pretrained(tmp_path / "src")
    prune_checkpoint(tmp_path / "src", tmp_path / "mem", remove=[1])
    prune_checkpoint(tmp_path / "src", tmp_path / "str", remove=[1], streaming=True)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".layer.2." in k for k in b) and not any(".layer.3." in k for k in b)
