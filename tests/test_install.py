"""A fresh install's contract: the checkpoint check without ``from_pretrained``, no optional heavy import on a
command that does not use it, and exactly one stderr line for a user mistake (also under torchrun)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from layerprune.errors import LayerpruneError
from layerprune.models import check_checkpoint_tensors, checkpoint_tensor_names

from conftest import ARCHS, make_tiny

OPTIONAL = ("bitsandbytes", "gradio", "selenium", "llama_cpp", "mergekit")


@pytest.fixture
def no_from_pretrained(monkeypatch):
    """The check must not go through from_pretrained, whose load hooks (device maps, kernels) change between
    transformers releases: 5.25 refused device_map='meta'."""
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("check_checkpoint_tensors called from_pretrained")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_check_accepts_every_architecture(arch, tmp_path, no_from_pretrained):
    make_tiny(arch).save_pretrained(tmp_path)
    check_checkpoint_tensors(tmp_path)


def _rewrite(folder: Path, edit) -> None:
    f = folder / "model.safetensors"
    sd = {k: v.clone() for k, v in st.load_file(f).items()}
    edit(sd)
    st.save_file(sd, f, metadata={"format": "pt"})


def test_checkpoint_check_names_missing_and_unexpected(tmp_path, no_from_pretrained):
    make_tiny("llama").save_pretrained(tmp_path)

    def edit(sd):
        del sd["model.layers.1.mlp.down_proj.weight"]
        sd["model.layers.9.extra.weight"] = torch.zeros(2)
    _rewrite(tmp_path, edit)
    with pytest.raises(LayerpruneError, match=r"1 tensor\(s\) missing: model.layers.1.mlp.down_proj.weight; "
                                              r"1 unexpected tensor\(s\): model.layers.9.extra.weight"):
        check_checkpoint_tensors(tmp_path)


def test_checkpoint_check_applies_tie_and_prefix_rules(tmp_path, no_from_pretrained):
    """A tied head need not be stored; a checkpoint saved from the base model (no ``model.`` prefix) loads in
    transformers, so it passes here too. An untied head that is absent is missing."""
    m = make_tiny("llama", tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in checkpoint_tensor_names(tmp_path / "tied")
    check_checkpoint_tensors(tmp_path / "tied")

    m.model.save_pretrained(tmp_path / "base")
    shutil.copy(tmp_path / "tied" / "config.json", tmp_path / "base" / "config.json")
    assert not any(n.startswith("model.") for n in checkpoint_tensor_names(tmp_path / "base"))
    check_checkpoint_tensors(tmp_path / "base")

    make_tiny("llama", tie_word_embeddings=False).save_pretrained(tmp_path / "untied")
    _rewrite(tmp_path / "untied", lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(LayerpruneError, match="missing: lm_head.weight"):
        check_checkpoint_tensors(tmp_path / "untied")


def test_checkpoint_check_reads_shard_index_only(tmp_path, no_from_pretrained):
    """Sharded checkpoints: names come from the index; a corrupt index is one line."""
    make_tiny("qwen2").save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    check_checkpoint_tensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(LayerpruneError, match="corrupt shard index"):
        check_checkpoint_tensors(tmp_path)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_cli_imports_no_optional_dependency(tmp_path):
    """Building every command's parser, and a command that fails on a user mistake, import none of the
    optional heavy packages (they print at import time and cost seconds)."""
    code = textwrap.dedent(f"""
        import sys
        from layerprune.cli import build_parser, main
        build_parser()
        assert main(["prune", {str(tmp_path / 'missing')!r}, "--remove", "1", "--out", {str(tmp_path / 'o')!r}]) == 2
        assert main(["heal", {str(tmp_path / 'missing')!r}, "--out", {str(tmp_path / 'o')!r}]) == 2
        print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_library_warnings_never_reach_stderr(tmp_path):
    """A warning logged by a library without a handler (as `kernels` does offline when bitsandbytes is
    imported) stays off stderr; the user mistake is the only line."""
    code = textwrap.dedent(f"""
        import logging, sys
        from layerprune.cli import main
        import layerprune.models as m
        real = m.resolve_model
        def noisy(*a, **k):
            logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check")
            return real(*a, **k)
        m.resolve_model = noisy
        sys.exit(main(["info", {str(tmp_path / 'missing')!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("layerprune: error:"), r.stderr


def test_torchrun_user_mistake_is_one_line_from_rank_zero(tmp_path):
    """Under torchrun with 2 processes, rank 0 prints the one error line and rank 1 prints nothing (torchrun's
    own agent report is torchrun's; each rank's streams are captured separately with --redirects)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    exe = Path(sys.executable).with_name("layerprune")
    logs = tmp_path / "logs"
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "--log-dir", str(logs), "--redirects", "3",
                    str(exe), "heal", str(tmp_path / "missing"), "--method", "partial", "--out", str(tmp_path / "o")],
                   capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"})
    err = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    out = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert sorted(err) == [0, 1], list(logs.rglob("*"))
    assert err[0].count("\n") == 1 and err[0].startswith("layerprune: error: model path not found"), err[0]
    assert err[1] == "" and out[0] == "" and out[1] == "", (err, out)
    assert not (tmp_path / "o").exists()
