"""CLI for prune/info: user mistakes give one line on stderr, exit status 2, and no output folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerprune.cli import main

from conftest import make_tiny, tiny_tokenizer


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    make_tiny("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("layerprune: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("remove,msg", [("6", "out of range"), ("-1", "negative"), ("2,2", "duplicate"),
                                        ("0-5", "cannot remove all"), ("a", "not an integer"),
                                        ("1.5", "not an integer")])
@pytest.mark.parametrize("streaming", [False, True])
def test_bad_indices(src, tmp_path, capsys, remove, msg, streaming):
    argv = ["prune", str(src), "--remove", remove, "--out", str(tmp_path / "o")] + (["--streaming"] if streaming else [])
    assert msg in _err(capsys, argv)
    assert not (tmp_path / "o").exists()


def test_missing_path_and_existing_output(src, tmp_path, capsys):
    assert "not found" in _err(capsys, ["prune", str(tmp_path / "nope"), "--remove", "1", "--out", str(tmp_path / "o")])
    out = tmp_path / "o"
    out.mkdir()
    (out / "f").write_text("x")
    assert "not empty" in _err(capsys, ["prune", str(src), "--remove", "1", "--out", str(out)])
    assert "--tail must be" in _err(capsys, ["prune", str(src), "--tail", "6", "--out", str(tmp_path / "o2")])


@pytest.mark.parametrize("streaming", [False, True])
def test_unsupported_architecture(src, tmp_path, capsys, streaming):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "not_a_real_arch"
    (src / "config.json").write_text(json.dumps(cfg))
    argv = ["prune", str(src), "--remove", "1", "--out", str(tmp_path / "o")] + (["--streaming"] if streaming else [])
    err = _err(capsys, argv)
    assert "not_a_real_arch" in err
    if streaming:
        assert "supported model types" in err and "llama" in err


def test_corrupt_checkpoint(src, tmp_path, capsys):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    _err(capsys, ["prune", str(src), "--remove", "1", "--out", str(tmp_path / "o")])
    _err(capsys, ["prune", str(src), "--remove", "1", "--out", str(tmp_path / "o"), "--streaming"])
    assert not (tmp_path / "o").exists()


def test_prune_tail_and_info(src, tmp_path, capsys):
    assert main(["prune", str(src), "--tail", "2", "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "layerprune.json").read_text())
    assert m["removed_layers"] == [4, 5] and m["method"] == "reverse" and m["original_num_layers"] == 6
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "o"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 4 and info["adapter"] == "llama" and info["layers_path"] == "model.layers"


def test_console_script_has_no_traceback(tmp_path):
    exe = [sys.executable, "-m", "layerprune"]
    r = subprocess.run(exe + ["prune", str(tmp_path / "missing"), "--remove", "1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["prune", "{m}", "--remove", "1"], ["prune", "{m}", "--remove", "1", "--streaming"],
                                  ["compensate", "{m}", "--tail", "1"], ["prune", "{m}", "--metric", "magnitude",
                                                                         "--num", "1"]])
@pytest.mark.parametrize("where", ["{m}", "{m}/sub", "{root}"])
def test_output_that_is_or_holds_the_input_is_refused(tmp_path, capsys, args, where):
    """--out equal to the input, inside it or around it would replace the model being read: refused in one
    line even with --overwrite, and the model is untouched."""
    from conftest import save_tiny

    m = save_tiny(tmp_path / "m")
    before = {f.name: f.read_bytes() for f in m.iterdir() if f.is_file()}
    capsys.readouterr()
    out = where.format(m=m, root=tmp_path)
    assert main([a.format(m=m) for a in args] + ["--out", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the input" in err, err
    assert {f.name: f.read_bytes() for f in m.iterdir() if f.is_file()} == before


def test_chat_port_refusals_come_before_the_load(tmp_path, capsys):
    """An impossible or taken port is one line at once (gradio's OSError/OverflowError came after the load)."""
    import socket

    pytest.importorskip("gradio")
    from conftest import save_tiny

    m = save_tiny(tmp_path / "m")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["chat", str(m), "--port", "99999"])
    assert e.value.code == 2 and "at most 65535" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["chat", str(m), "--port", str(port)]) == 2
        err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err


def test_compare_generate_with_empty_prompts_is_one_line(tmp_path, capsys):
    from conftest import save_tiny

    m = save_tiny(tmp_path / "m")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    capsys.readouterr()
    assert main(["compare", str(m), "--teacher", str(m), "--generate", "2", "--prompts", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no rows in" in err, err
