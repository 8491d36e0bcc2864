"""`layerprune download` without a network: one line, exit 2, no output folder (and no partial one)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from layerprune.cli import main
from layerprune.download import download, partial_dir
from layerprune.errors import LayerpruneError


def _only(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_offline_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "model"
    assert main(["download", "HuggingFaceTB/SmolLM2-135M-Instruct", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerprune: error: cannot reach the Hugging Face Hub") and "HF_ENDPOINT" in err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists() and not partial_dir(out).exists() and _only(tmp_path) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(LayerpruneError, match="repo type"):
        download("a/b", tmp_path / "o", repo_type="space")
    full = tmp_path / "full"
    full.mkdir()
    (full / "f").write_text("x")
    with pytest.raises(LayerpruneError, match="not empty"):
        download("a/b", full)


def test_unreachable_endpoint(tmp_path):
    """Online mode but nothing listening: the same one-line error, in a fresh process (the hub reads its
    environment at import)."""
    out = tmp_path / "o"
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "layerprune", "download", "a/b", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("layerprune: error: cannot reach the Hugging Face Hub") and "\n" not in err
    assert _only(tmp_path) == []
