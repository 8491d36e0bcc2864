"""GGUF export through llama.cpp's own converter: pruned llama and gemma3_text (interior removals, sliced
layer_types) convert, the GGUF has the pruned block count; --check agrees with transformers (slow)."""

from __future__ import annotations

import importlib.util

import pytest

from layerprune.cli import main
from layerprune.errors import LayerpruneError

from conftest import save_tiny_smol


def _converter():
    from layerprune.export import converter_dir

    try:
        return converter_dir(fetch=False)
    except LayerpruneError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("model_type,remove", [("llama", "1,3"), ("gemma3_text", "2")])
def test_pruned_models_convert(model_type, remove, tmp_path, smollm2_path, capsys):
    _converter()
    import gguf

    src = save_tiny_smol(tmp_path / model_type, smollm2_path, model_type)
    pruned = tmp_path / "pruned"
    assert main(["prune", str(src), "--remove", remove, "--out", str(pruned)]) == 0
    out = tmp_path / "m.gguf"
    capsys.readouterr()
    assert main(["export", str(pruned), "--gguf", str(out), "--outtype", "f16"]) == 0, capsys.readouterr().err
    reader = gguf.GGUFReader(str(out))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    blocks = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    assert blocks == 6 - len(remove.split(","))
    assert not any(t.name.startswith(f"blk.{blocks}.") for t in reader.tensors)
    # An existing file is refused without --overwrite, before converting.
    assert main(["export", str(pruned), "--gguf", str(out)]) == 2


def test_export_bad_input(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path), "--gguf", str(tmp_path / "x.gguf"), "--outtype", "q3"])
    assert e.value.code == 2
    assert main(["export", str(tmp_path), "--gguf", str(tmp_path / "x.bin")]) == 2
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed "
                    "(pip install 'layerprune[gguf]')")
def test_check_greedy_agreement_on_smollm2(tmp_path, smollm2_path):
    """The deployability check on the real SmolLM2 with an interior removal: f16, a short prompt -> the same
    greedy tokens as transformers."""
    _converter()
    from layerprune.export import check_gguf, export_gguf

    pruned = tmp_path / "p"
    assert main(["prune", str(smollm2_path), "--remove", "10,11,20", "--out", str(pruned)]) == 0
    export_gguf(pruned, tmp_path / "p.gguf", outtype="f16")
    c = check_gguf(tmp_path / "p.gguf", pruned, new_tokens=8)
    assert c["matching_prefix"] >= 6, c


def test_recipe_writes_gguf_and_records_the_command(tmp_path, smollm2_path, data_dir, monkeypatch):
    _converter()
    from layerprune.recipe import run_recipe

    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    src = save_tiny_smol(tmp_path / "llama", smollm2_path)
    r = {"model": str(src), "prune": {"metric": "reverse", "num_layers": 2}, "heal": {"method": "none"},
         "evaluate": {"tasks": [], "ppl": [], "models": []}, "measure": {"enabled": False},
         "export": {"gguf": "f16"}}
    m = run_recipe(r, tmp_path / "run", log=lambda s: None)
    assert (tmp_path / "run" / "gguf" / "model-f16.gguf").is_file()
    readme = (tmp_path / "run" / "exports" / "README.md").read_text()
    assert m["gguf"]["command"] in readme and "convert_hf_to_gguf.py" in readme
