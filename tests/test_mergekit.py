"""mergekit export honesty: for a llama-family interior removal mergekit's passthrough output equals ours
tensor for tensor; for a model with per-layer config fields the YAML says mergekit will not slice them."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from layerprune.prune import prune_checkpoint
from layerprune.report.exports import mergekit_yaml, per_layer_config_fields

from conftest import save_tiny

pytest.importorskip("mergekit")


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_mergekit_passthrough_equals_layerprune(tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    src = save_tiny(tmp_path / "src", "llama")
    kept = [0, 2, 4, 5]
    cfg = yaml.safe_load(mergekit_yaml(str(src), kept, "float32", per_layer_config_fields(str(src))))
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True, write_model_card=False))
    prune_checkpoint(src, tmp_path / "ours", remove=[1, 3])
    a, b = _tensors(tmp_path / "mk"), _tensors(tmp_path / "ours")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"] == 4


def test_per_layer_fields_are_announced(tmp_path):
    src = save_tiny(tmp_path / "g", "gemma3_text")
    fields = per_layer_config_fields(str(src))
    assert "layer_types" in fields
    text = mergekit_yaml(str(src), [0, 1, 3, 4, 5], None, fields, [2])
    assert text.startswith("# WARNING") and "layer_types" in text.splitlines()[0]
    assert "--remove 2 --streaming" in text
    yaml.safe_load(text)  # still a valid config
    assert per_layer_config_fields(str(save_tiny(tmp_path / "l", "llama"))) == []


def test_mergekit_does_not_slice_layer_types(tmp_path):
    """The limitation the warning is about, kept under test: should mergekit start slicing per-layer fields,
    this fails and the warning can go."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    src = save_tiny(tmp_path / "g", "gemma3_text")
    cfg = yaml.safe_load(mergekit_yaml(str(src), [0, 1, 3, 4, 5], "float32"))
    try:
        run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
                  MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True, write_model_card=False))
    except Exception as e:  # noqa: BLE001 - mergekit's own error type
        assert "layer_types" in str(e) or "num_hidden_layers" in str(e)
        return
    out = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert len(out.get("layer_types", [])) != out["num_hidden_layers"]  # a config that does not match
